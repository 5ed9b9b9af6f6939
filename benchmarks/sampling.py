"""Seconds per image for the latent-diffusion sampler against steps and denoiser tile size, and one
full-size enhancement of a 4000 x 6000 RAW (time and peak memory).

The method is ``--method`` (default ``lacontrolnet``) on the ``--pretrained`` bundle (default the
tiny one; a real SD directory or hub id times real weights). Weights do not change the speed, so
an untrained method is timed; for the large RAW it is saved as a checkpoint first and enhanced
through ``lowlight.enhance.enhance_file``, exactly as ``lowlight enhance`` does, in a child
process whose peak resident memory is read back with ``getrusage``.

    .venv/bin/python benchmarks/sampling.py [--size 512] [--steps 10,20,50] [--tiles 16,32,64]
        [--large-steps 10] [--skip-large] [--pretrained tiny] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import RESULTS_DIR, load_at_start, machine_info, print_table, write_result
from skimage import data as skdata

from lowlight import checkpoint
from lowlight.config import Config, MethodConfig, ModelConfig
from lowlight.data.raw import pack_mosaic, unpack_mosaic
from lowlight.data.unprocess import CameraProfile, mosaic, unprocess, write_dng
from lowlight.enhance import enhance_file
from lowlight.methods import EnhanceOptions, build_method
from lowlight.models.sd import SDBundle

LARGE_RATIO = 100


def build_method_for(args) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ModelConfig(pretrained=args.pretrained, vae_tile=args.vae_tile)
    return build_method(MethodConfig(name=args.method, domain="srgb"), 3, model).eval()


def seconds_per_image(method, image: torch.Tensor, opts: EnhanceOptions, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        method.enhance({"srgb_in": image}, opts)
        best = min(best, time.perf_counter() - tick)
    return best


def write_large_dng(path: Path, size: tuple[int, int]) -> None:
    """A dark (height, width) DNG: a real photo, upscaled, unprocessed to camera raw, 1/LARGE_RATIO exposure."""
    profile = CameraProfile.load()
    photo = cv2.resize(skdata.astronaut(), size[::-1], interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255
    packed = pack_mosaic(mosaic(unprocess(photo, profile), profile.pattern), profile.pattern) / LARGE_RATIO
    black = float(np.mean(profile.black_cells))
    adu = np.rint(packed * (profile.white_level - black) + black).astype(np.uint16)
    write_dng(path, unpack_mosaic(adu, profile.pattern), profile, iso=3200, exposure_time=0.01)


def _enhance_large(ckpt: str, dng: str, out: str, steps: int, result) -> None:
    """In the child: the enhancement, counting whole-image VAE encodes and the encoder runs they make
    (one per VAE tile, plus the untiled GroupNorm-statistics pass)."""
    encodes, encoder_runs = [], []
    whole_image_encode = SDBundle.encode

    def counted_encode(bundle, images):
        encodes.append(tuple(images.shape))
        hook = bundle.vae.encoder.register_forward_hook(lambda *_: encoder_runs.append(1))
        try:
            return whole_image_encode(bundle, images)
        finally:
            hook.remove()

    SDBundle.encode = counted_encode
    report = enhance_file(ckpt, dng, out, EnhanceOptions(steps=steps), ratio=LARGE_RATIO)
    result.put({"seconds": report.seconds, "height": report.height, "width": report.width,
                "input_encodes": len(encodes), "encoder_runs": len(encoder_runs)})


def large_run(args, method, workdir: Path) -> dict:
    dng, ckpt, out = workdir / "large.dng", workdir / "checkpoint", workdir / "large.png"
    write_large_dng(dng, tuple(int(v) for v in args.large_size.split("x")))
    cfg = Config(method=MethodConfig(name=args.method, domain="srgb"),
                 model=ModelConfig(pretrained=args.pretrained, vae_tile=args.vae_tile))
    checkpoint.save(ckpt, cfg, method, 3, {})
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=_enhance_large, args=(str(ckpt), str(dng), str(out), args.large_steps, queue))
    child.start()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"the large enhancement failed (exit code {child.exitcode})")
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {**queue.get(), "peak_rss_gib": round(peak_gib, 2), "steps": args.large_steps,
            "output_bytes": out.stat().st_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="lacontrolnet")
    p.add_argument("--pretrained", default="tiny")
    p.add_argument("--size", type=int, default=512, help="square sRGB test image side")
    p.add_argument("--steps", default="10,20,50")
    p.add_argument("--tiles", default="16,32,64", help="denoiser tile sides in latent px (at 20 steps)")
    p.add_argument("--tile-steps", type=int, default=20)
    p.add_argument("--vae-tile", type=int, default=512, help="VAE tile side in px")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--large-steps", type=int, default=10)
    p.add_argument("--large-size", default="4000x6000", help="HxW of the full-size RAW")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--large-only", action="store_true", help="add the large run to an existing --json result")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores; 1 is steadier when other work shares the machine)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    load = load_at_start()
    torch.set_num_threads(args.threads or machine_info()["cores_usable"])
    method = build_method_for(args)
    if args.large_only:
        path = Path(args.json) if args.json else RESULTS_DIR / "sampling.json"
        result = json.loads(path.read_text())
        result["large"] = large_result(args, method)
        write_result("sampling", result, path)
        return
    photo = cv2.resize(skdata.astronaut(), (args.size, args.size), interpolation=cv2.INTER_AREA)
    image = torch.from_numpy(photo.astype(np.float32) / 255 / 8).permute(2, 0, 1)[None]  # a dark input
    latent = args.size // 8
    steps = [int(s) for s in args.steps.split(",")]
    per_steps = {str(s): seconds_per_image(method, image, EnhanceOptions(steps=s, tile=latent), args.repeats)
                 for s in steps}
    tiles = [int(t) for t in args.tiles.split(",")]
    tiled = {str(t): seconds_per_image(method, image, EnhanceOptions(steps=args.tile_steps, tile=t), args.repeats)
             for t in tiles}
    print_table(["steps", "s/image"], [[s, f"{v:.2f}"] for s, v in per_steps.items()],
                title=f"{args.method} ({args.pretrained}), {args.size}x{args.size}, one tile")
    print_table(["tile (latent px)", "s/image"], [[t, f"{v:.2f}"] for t, v in tiled.items()],
                title=f"{args.tile_steps} steps, overlap min(16, tile/2) latent px")
    result = {"method": args.method, "pretrained": args.pretrained, "image_size": [args.size, args.size],
              "seconds_per_image": per_steps, "tiled_seconds": tiled, "tile_steps": args.tile_steps,
              "vae_tile": args.vae_tile, "torch_threads": torch.get_num_threads(),
              "load_average_at_start": load}
    if not args.skip_large:
        result["large"] = large_result(args, method)
    write_result("sampling", result, args.json)


def large_result(args, method) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        large = large_run(args, method, Path(tmp))
    print_table(["image", "steps", "seconds", "peak RSS GiB", "input encodes", "encoder runs"],
                [[f"{large['height']}x{large['width']} RAW", large["steps"], f"{large['seconds']:.0f}",
                  large["peak_rss_gib"], large["input_encodes"], large["encoder_runs"]]],
                title="full-size enhancement (lowlight.enhance)")
    return large


if __name__ == "__main__":
    main()
