"""Start or join the Ray cluster a stage runs on."""

from __future__ import annotations

import os

import ray

from lowlight import console
from lowlight.config import RayConfig

# Workers of a local cluster must see the same S3 endpoint/credentials and offline switches as the driver.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "HF_HUB_OFFLINE", "LOWLIGHT_CACHE", "TORCH_HOME", "HF_HOME")


def ensure_ray(cfg: RayConfig) -> None:
    if ray.is_initialized():
        return
    # Before ray.init, which logs through them; by now the stage has imported ray.data (it configures its
    # own logger on import). After it, the workers' lines that Ray forwards to this driver.
    console.route_ray_loggers()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Joining a cluster (e.g. inside `ray job submit`): the job's runtime env already applies,
        # and passing our own would conflict with it.
        ray.init(address=address, log_to_driver=True)
    else:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": env} if env else None, log_to_driver=True)
    console.capture_worker_logs()


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
