"""The Gradio demo: upload a file or pick a sample, choose a model and its settings, compare before and
after, read the scores, download the result. It calls the models through the same ``Router`` as the API.
"""

from __future__ import annotations

import asyncio
import glob
import tempfile
import uuid
from pathlib import Path

import gradio as gr

from lowlight.serving.router import Router
from lowlight.serving.settings import ServeArgs

AUTO = "model default"


def example_files(patterns: list[str], limit: int) -> dict[str, str]:
    """label -> path of the sample files the patterns match (relative patterns from the working directory)."""
    found = sorted({p for pattern in patterns for p in glob.glob(pattern) if Path(p).is_file()})[:limit]
    return {f"{Path(p).parent.parent.name}/{Path(p).name}": p for p in found}


def describe(info: dict) -> str:
    takes = "RAW files (DNG, ARW, NEF, CR2, ...)" if info["domain"] == "raw" else "sRGB images (PNG, JPEG, TIFF)"
    psnr = info["metrics"].get("val_psnr")
    trained = f"; validation PSNR {psnr:.2f} dB" if isinstance(psnr, float) else ""
    return f"**{info['name']}**: `{info['method']}` ({info['backbone']}) takes {takes}{trained}."


def build_ui(router: Router, infos: dict[str, dict], settings: ServeArgs) -> gr.Blocks:
    examples = example_files(settings.ui.examples, settings.ui.max_examples)
    first = infos[router.names[0]]
    work = Path(tempfile.mkdtemp(prefix="lowlight-ui-"))

    def controls(name: str):
        options = infos[name]["options"]
        return (describe(infos[name]),
                gr.update(visible="steps" in options, value=options.get("steps") or 1),
                gr.update(visible="guidance_scale" in options, value=options.get("guidance_scale") or 1.0),
                gr.update(visible=infos[name]["domain"] == "raw"),
                gr.update(visible="color_fix" in options))

    # Gradio injects progress tracking through this default; it is its documented idiom.
    async def run(name, upload, example, steps, guidance, ratio, seed, color_fix,
                  progress=gr.Progress()):  # noqa: B008
        path = upload or examples.get(example or "")
        if not path:
            raise gr.Error("Upload a file or pick an example first.")
        options = infos[name]["options"]
        params = {"seed": int(seed or 0), "ratio": ratio or None,
                  "steps": int(steps) if "steps" in options else None,
                  "guidance": guidance if "guidance_scale" in options else None,
                  "color_fix": None if color_fix == AUTO else color_fix}
        request_id = uuid.uuid4().hex
        task = asyncio.ensure_future(router.enhance(name, Path(path).read_bytes(), Path(path).name, params,
                                                    request_id, with_input=True))
        progress(0, desc="waiting for a model replica")
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            state = await router.progress(request_id)
            if state and not task.done():
                progress(state, desc=f"{name}: step {state[0]} of {state[1]}", unit="steps")
        router.forget(request_id)
        result = task.result()
        if not result["ok"]:
            raise gr.Error(result["error"])
        stem = f"{Path(path).stem}-{name}-{request_id[:8]}"
        before, after = work / f"{stem}-input.png", work / f"{stem}.png"
        before.write_bytes(result["input_png"])
        after.write_bytes(result["png"])
        report = result["report"]
        scores = {k: round(v, 4) if isinstance(v, float) else v for k, v in report["scores"].items()}
        run_info = {k: report[k] for k in ("model", "method", "options", "ignored_options", "ratio", "width", "height")}
        run_info["seconds"] = round(report["seconds"], 2)
        return (str(before), str(after)), scores, str(after), run_info

    with gr.Blocks(title="lowlight") as ui:
        gr.Markdown("# lowlight\nEnhance a dark photo with a trained model. RAW models take the sensor data "
                    "(DNG, ARW, ...); sRGB models take ordinary images.")
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(router.names, value=router.names[0], label="Model")
                about = gr.Markdown(describe(first))
                upload = gr.File(label="Upload an image or RAW file", type="filepath", elem_id="upload")
                example = gr.Dropdown(list(examples), value=None, label="...or pick a sample file")
                steps = gr.Slider(1, min(settings.limits.max_steps, 100), step=1, label="Steps",
                                  value=first["options"].get("steps") or 1, visible="steps" in first["options"])
                guidance = gr.Slider(0, 10, step=0.5, label="Guidance ω",
                                     value=first["options"].get("guidance_scale") or 1.0,
                                     visible="guidance_scale" in first["options"])
                ratio = gr.Slider(0, min(settings.limits.max_ratio, 500), step=1, value=0,
                                  label="Exposure ratio (RAW; 0 = automatic)", visible=first["domain"] == "raw")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                color_fix = gr.Radio([AUTO, "none", "adain", "wavelet"], value=AUTO, label="Colour fix",
                                     visible="color_fix" in first["options"])
                go = gr.Button("Enhance", variant="primary", elem_id="enhance")
            with gr.Column():
                compare = gr.ImageSlider(label="Before / after", type="filepath", elem_id="compare")
                scores = gr.JSON(label="No-reference scores", elem_id="scores")
                download = gr.File(label="Download the result", elem_id="download")
                details = gr.JSON(label="Run")
        model.change(controls, model, [about, steps, guidance, ratio, color_fix])
        go.click(run, [model, upload, example, steps, guidance, ratio, seed, color_fix],
                 [compare, scores, download, details], concurrency_limit=settings.ui.concurrency_limit)
    return ui
