"""The Serve application: a model deployment per checkpoint behind one ingress replica that serves the
API and the Gradio page (``/ui``). ``app_builder`` is the import path for ``serve run`` and
``serve deploy serve/config.yaml``; ``start`` is what ``lowlight serve`` runs.

The ingress builds its FastAPI app in ``__serve_build_asgi_app__`` (a Gradio Blocks cannot be pickled, so it
cannot be built at import time) and stays at one replica: Gradio's queue endpoints must reach the same
process. Scale the model deployments instead.
"""

from __future__ import annotations

import os

import gradio as gr
import ray
from ray import serve
from ray.serve import Application

from lowlight import storage
from lowlight.serving.api import build_api
from lowlight.serving.model import EnhanceModel
from lowlight.serving.router import Router
from lowlight.serving.settings import ModelDeployment, ServeArgs
from lowlight.serving.ui import build_ui

APP_NAME = "lowlight"
INGRESS_MAX_ONGOING = 64  # a Gradio page load alone makes about 45 requests


@serve.deployment(num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    def __init__(self, handles: dict, settings: dict):
        self.settings = ServeArgs.model_validate(settings)
        self.router = Router(handles)

    async def __serve_build_asgi_app__(self):
        app = build_api(self.router, self.settings.limits)
        if not self.settings.ui.enabled:
            return app
        infos = await self.router.infos()
        auth = tuple(self.settings.ui.auth.split(":", 1)) if self.settings.ui.auth else None
        return gr.mount_gradio_app(app, build_ui(self.router, infos, self.settings), path="/ui", auth=auth)


def model_options(d: ModelDeployment) -> dict:
    """Serve options of a model deployment; a GPU per replica when asked and the cluster has one."""
    gpus = 1 if d.gpu == "auto" and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    options = {"max_ongoing_requests": d.max_ongoing_requests, "max_queued_requests": d.max_queued_requests,
               "health_check_period_s": d.health_check_period_s,
               "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": gpus}}
    if d.autoscaling_config is not None:
        options["autoscaling_config"] = d.autoscaling_config
    else:
        options["num_replicas"] = d.num_replicas
    return options


def absolute(path: str) -> str:
    """Local paths as the builder's working directory sees them: replicas may run elsewhere."""
    return path if storage.is_remote(path) or os.path.isabs(path) else os.path.abspath(path)


def app_builder(args: dict) -> Application:
    settings = ServeArgs.model_validate(args)
    for entry in settings.models:
        entry.checkpoint = absolute(entry.checkpoint)
    settings.ui.examples = [absolute(pattern) for pattern in settings.ui.examples]
    options = model_options(settings.model_deployment)
    handles = {entry.name: EnhanceModel.options(name=f"model-{entry.name}", **options).bind(
        entry.model_dump(), settings.limits.model_dump(), settings.batching.model_dump(), settings.endpoint_url)
        for entry in settings.models}
    return Ingress.bind(handles, settings.model_dump())


def start(settings: ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Run the application on the connected Ray cluster; returns its URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app_builder(settings.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/"
