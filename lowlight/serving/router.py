"""What the HTTP API and the Gradio UI share inside the ingress: the model handles, their descriptions,
and one enhancement call with the retry a dead replica needs."""

from __future__ import annotations

import asyncio
import logging

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from lowlight.serving.model import progress_board

log = logging.getLogger(__name__)


class Router:
    def __init__(self, handles: dict[str, DeploymentHandle]):
        self.handles = handles
        self._infos: dict[str, dict] | None = None
        self.board = progress_board()

    @property
    def names(self) -> list[str]:
        return list(self.handles)

    async def infos(self) -> dict[str, dict]:
        """Each model's description (asked once: it does not change while the application runs)."""
        if self._infos is None:
            infos = await asyncio.gather(*(h.info.remote() for h in self.handles.values()))
            self._infos = dict(zip(self.handles, infos, strict=True))
        return self._infos

    async def enhance(self, model: str | None, data: bytes, filename: str, params: dict,
                      request_id: str | None = None, with_input: bool = False) -> dict:
        """The model's answer ({"ok": True, ...} or a refusal with its HTTP status). A replica that dies
        with the request is retried once on its replacement; a second death is a 503. Serve's own
        back-pressure error (max_queued_requests) is left to propagate: the ingress maps it to 503."""
        name = model or self.names[0]
        if name not in self.handles:
            return {"ok": False, "status": 404, "error": f"unknown model '{name}'; this server has {self.names}"}
        for attempt in (1, 2):
            try:
                return await self.handles[name].enhance.remote(data, filename, params, request_id, with_input)
            except RayActorError as e:
                log.warning("model '%s': replica died during a request (attempt %d): %s", name, attempt, e)
        return {"ok": False, "status": 503, "error": f"model '{name}': its replica died twice; try again shortly"}

    async def progress(self, request_id: str) -> tuple[int, int] | None:
        return await self.board.get.remote(request_id)

    def forget(self, request_id: str) -> None:
        self.board.forget.remote(request_id)
