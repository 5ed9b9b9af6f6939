"""Real Stable Diffusion layouts at their real sizes, built offline: do they load and run?

For SD 1.5 and SD 2.1-base, the diffusers classes are built with the released configs' sizes
(UNet 860 M parameters, VAE 84 M; random weights, seeded), saved with ``save_pretrained`` in the
diffusers folder layout without ``text_encoder/``, with a ``prompt_embedding.safetensors`` (a random
[1, 77, D] tensor: CLIP cannot be downloaded here, and the loading path is what is tested). Each layout
is then loaded by ``SDBundle`` inside ``lacontrolnet`` (UNet frozen, ControlNet trained) in a fresh
child process that runs one training step (AdamW, batch 1, 512 px) and one DDIM step of ``predict``
on a 512 px image, and reports the seconds of each and its peak resident memory (``getrusage``).

CPU, fp32 (what a CPU-only machine runs); GPUs run the same code with bf16 frozen parts.

    .venv/bin/python benchmarks/real_sd_layout.py [--layouts sd15,sd21-base] [--work out/bench/real_sd]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import time
from pathlib import Path

import torch
from common import load_at_start, print_table, write_result

SIZE = 512  # px; 64 x 64 latents, SD's training resolution

# The released configs' sizes (diffusers' UNet2DConditionModel / AutoencoderKL arguments).
UNETS = {
    "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8},
    "sd21-base": {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
}


def build_layout(name: str, directory: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    from lowlight.models import prompt

    torch.manual_seed(0)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **UNETS[name])
    unet.save_pretrained(staging / "unet")
    dim = unet.config.cross_attention_dim
    del unet
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215).save_pretrained(staging / "vae")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1, set_alpha_to_one=False).save_pretrained(staging / "scheduler")
    (staging / prompt.PROMPT_EMBEDDING_FILE).write_bytes(prompt.to_bytes(torch.randn(1, prompt.PROMPT_LENGTH, dim)))
    staging.rename(directory)


def _run(directory: str, result) -> None:
    """In the child: load, one training step, one DDIM step."""
    from lowlight.config import MethodConfig, ModelConfig
    from lowlight.methods import EnhanceOptions, build_method

    tick = time.perf_counter()
    method = build_method(MethodConfig(name="lacontrolnet", domain="srgb"), 3, ModelConfig(pretrained=directory))
    loaded = time.perf_counter() - tick
    g = torch.Generator().manual_seed(0)
    batch = {"z_in": torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g),
             "z_gt": torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g),
             "srgb_in": torch.rand(1, 3, SIZE, SIZE, generator=g), "srgb_gt": torch.rand(1, 3, SIZE, SIZE, generator=g)}
    optimizer = torch.optim.AdamW(list(method.trainable_parameters()), lr=1e-5)
    tick = time.perf_counter()
    loss, _ = method(batch, torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    train_step = time.perf_counter() - tick
    tick = time.perf_counter()
    image = method.predict({"srgb_in": batch["srgb_in"]}, EnhanceOptions(steps=1))
    ddim_step = time.perf_counter() - tick
    params = {name: sum(p.numel() for p in getattr(method, name).parameters()) for name in ("unet", "controlnet", "vae")}
    result.put({"load_s": round(loaded, 1), "train_step_s": round(train_step, 1), "ddim_step_s": round(ddim_step, 1),
                "loss": float(loss), "finite_output": bool(torch.isfinite(image).all()),
                "parameters_m": {k: round(v / 1e6, 1) for k, v in params.items()}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="sd15,sd21-base")
    p.add_argument("--work", type=Path, default=Path("out/bench/real_sd"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    load = load_at_start()
    context = multiprocessing.get_context("spawn")
    runs = {}
    for name in args.layouts.split(","):
        directory = args.work / name
        if not directory.exists():
            tick = time.perf_counter()
            build_layout(name, directory)
            print(f"{name}: built in {time.perf_counter() - tick:.0f} s -> {directory}")
        queue = context.Queue()
        child = context.Process(target=_run, args=(str(directory), queue))
        child.start()
        child.join()
        if child.exitcode:
            raise RuntimeError(f"{name}: the child failed (exit code {child.exitcode})")
        # RUSAGE_CHILDREN holds the largest child so far: runs go from the smaller layout to the larger
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        runs[name] = {**queue.get(), "peak_rss_gib": round(peak, 2)}
    print_table(["layout", "UNet M", "ControlNet M", "VAE M", "load s", "train step s", "DDIM step s", "peak RSS GiB"],
                [[n, r["parameters_m"]["unet"], r["parameters_m"]["controlnet"], r["parameters_m"]["vae"], r["load_s"],
                  r["train_step_s"], r["ddim_step_s"], r["peak_rss_gib"]] for n, r in runs.items()],
                title=f"lacontrolnet on real-size SD layouts, CPU fp32, batch 1, {SIZE} px")
    write_result("real_sd_layout", {"load_average_at_start": load, "size": SIZE, "runs": runs}, args.json)


if __name__ == "__main__":
    main()
