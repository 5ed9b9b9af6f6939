"""The HTTP API (FastAPI; OpenAPI docs at /docs): /health, /models, POST /enhance."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse

from lowlight.serving.router import Router
from lowlight.serving.settings import Limits


def build_api(router: Router, limits: Limits) -> FastAPI:
    app = FastAPI(title="lowlight", description="Low-light image enhancement with trained diffusion models. "
                  "POST an sRGB image or a RAW file to /enhance; the Gradio demo is at /ui.")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": router.names}

    @app.get("/models")
    async def models() -> list[dict]:
        """Each served model: its method, input kind, training metrics and the options it honours (with
        its defaults)."""
        return list((await router.infos()).values())

    @app.post("/enhance")
    async def enhance(file: Annotated[UploadFile, File(description="PNG/JPEG/TIFF, or a RAW file (DNG, ARW, ...)")],
                      model: Annotated[str | None, Form(description="a name from /models (default: the first)")] = None,
                      steps: Annotated[str | None, Form()] = None, guidance: Annotated[str | None, Form()] = None,
                      seed: Annotated[str | None, Form()] = None,
                      ratio: Annotated[str | None, Form(description="RAW input: exposure ratio")] = None,
                      tile: Annotated[str | None, Form()] = None,
                      color_fix: Annotated[str | None, Form()] = None) -> JSONResponse:
        """The enhanced PNG (base64) with the options used, the seconds taken and no-reference scores."""
        name = file.filename or "upload"
        data = await file.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            return JSONResponse({"error": f"'{name}' is over this server's limit of {limits.max_bytes} bytes"}, 413)
        params = {"steps": steps, "guidance": guidance, "seed": seed, "ratio": ratio, "tile": tile,
                  "color_fix": color_fix}
        result = await router.enhance(model, data, name, params)
        if not result["ok"]:
            return JSONResponse({"error": result["error"]}, result["status"])
        return JSONResponse(result["report"] | {"png_base64": base64.b64encode(result["png"]).decode()})

    return app
