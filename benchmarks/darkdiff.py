"""DarkDiff against the SD baselines it compares with (SD Concat, SD ControlNet), its residual VAE
against a plain fine-tuned VAE, and the rows of its ablation Tables 4-6, with the tiny bundle and one
training budget for every run, on the SID-shaped raw sample set.

Every run is trained by ``lowlight.train.train`` (Ray Train) with the same steps, per-worker batch,
learning rate (cosine, warmup), workers and seed:

1. the raw set (``--raw-root``, or built from the skimage.data photos / ``--photos extended``);
2. Parquet A (``lowlight.data.preprocess``, the fitted tiny VAE ``--vae``): raw_in, raw_gt, lrgb_in,
   srgb_in, srgb_gt and sRGB latents. The SD baselines train on it, as do DarkDiff's stage-1 VAEs;
3. stage 1 for each VAE an ablation row needs (residual LRGB->sRGB; plain; Raw->Raw; Raw->sRGB), then
   stage 2's latents made with that VAE (``preprocess.latents_from``), then stage 2 for each row of
   ``lowlight/configs/ablations/darkdiff.yaml``;
4. evaluation on the test split's centre crops of Parquet A (the same images for every method):
   sRGB PSNR/SSIM against the rendered target (a raw output rendered by the simple ISP and
   demosaiced x2 to the target's size), LPIPS when its weights are cached; DDIM ``--infer-steps`` at
   each method's configured guidance; stage 1's own mapping (noisy input -> VAE -> sRGB) for the
   residual-vs-plain comparison. Differences are paired per image with a bootstrap 95 % interval.

A run that reached its last step is reused, an unfinished one resumes (``--reuse-runs``), so the
benchmark can be stopped and started again.

    .venv/bin/python benchmarks/darkdiff.py [--raw-root DIR | --photos extended] [--steps 150]
        [--rows full,no_residual_vae,...] [--reuse-runs] [--out out/bench/darkdiff]
        [--json PATH (default benchmarks/results/darkdiff.json)]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    RESULTS_DIR,
    add_budget_arguments,
    bootstrap_ci,
    build_bench_samples,
    load_at_start,
    machine_info,
    print_table,
    repo_relative,
    trained_checkpoint,
    write_result,
)

from lowlight.ablations import load_ablations
from lowlight.checkpoint import load_method
from lowlight.config import load_config
from lowlight.data.parquet import read_split
from lowlight.data.preprocess import preprocess
from lowlight.iqa import lpips_loss_or_none
from lowlight.methods import EnhanceOptions
from lowlight.metrics import psnr, ssim

BASELINES = ("sd_concat", "sd_controlnet")
EVAL_COLUMNS = ("record_id", "raw_in", "raw_gt", "lrgb_in", "srgb_in", "srgb_gt", "z_in", "ratio", "wb", "ccm")
PARQUET_A_COLUMNS = "[raw_in, raw_gt, lrgb_in, srgb_in, srgb_gt, z_in, z_gt]"


def common_overrides(args, root: Path) -> list[str]:
    """The one budget and the shared data settings of every run."""
    return [f"dataset.root={root}", "model.pretrained=tiny", f"preprocess.crop_size={args.crop_size}",
            f"preprocess.crops_per_image={args.crops_per_image}", f"ray.num_cpus={args.num_cpus}",
            f"train.storage_path={Path(args.out).resolve() / 'runs'}", f"train.num_workers={args.num_workers}",
            f"train.batch_size={args.batch_size}", f"train.steps={args.steps}", f"train.lr={args.lr}",
            f"train.warmup_steps={args.warmup_steps}", f"train.checkpoint_every={args.checkpoint_every}",
            f"train.val_every={args.checkpoint_every}", "train.val_batches=2", "train.val_images=4",
            f"train.seed={args.seed}", f"method.options.steps={args.infer_steps}"]


def parquet_a(args, root: Path) -> list[str]:
    """Preprocess Parquet A; returns the overrides that name it and the fitted VAE."""
    out = Path(args.out).resolve() / "parquet-a"
    overrides = [*common_overrides(args, root), f"model.vae={args.vae}", f"preprocess.output={out}",
                 f"train.data={out}", f"preprocess.columns={PARQUET_A_COLUMNS}"]
    preprocess(load_config("darkdiff_vae", overrides))
    return overrides


def train_all(args, root: Path) -> dict[str, str]:
    """{run: checkpoint} for the baselines, the stage-1 VAEs and the stage-2 rows."""
    a_overrides = parquet_a(args, root)
    rows = load_ablations("darkdiff")
    chosen = args.rows or list(rows)
    checkpoints: dict[str, str] = {}
    for name in BASELINES:
        cfg = load_config("darkdiff_vae", [*a_overrides, f"method.name={name}", "method.domain=srgb",
                                           "method.options={}", f"method.options.steps={args.infer_steps}",
                                           f"train.name=bench-{name}"])
        checkpoints[name] = trained_checkpoint(cfg, args)
    vaes: dict[tuple[str, ...], str] = {}
    trained: dict[tuple, str] = {}  # rows with the same overrides (Table 4's "no region attention" is Table 6's
    for row_name in chosen:         # "concat") train once
        row = rows[row_name]
        key = tuple(row.vae)
        same = trained.get((key, tuple(row.latents), tuple(row.diffusion)))
        if same:
            checkpoints[f"darkdiff:{row_name}"] = same
            continue
        if key not in vaes:
            label = "vae-" + ("default" if not key else row_name)
            cfg = load_config("darkdiff_vae", [*a_overrides, *row.vae, f"train.name=bench-{label}"])
            vaes[key] = trained_checkpoint(cfg, args)
            checkpoints[label] = vaes[key]
        latents = Path(args.out).resolve() / ("latents-" + ("default" if not key else row_name))
        stage2 = [*common_overrides(args, root), f"model.vae={vaes[key]}", f"model.init_from={vaes[key]}",
                  f"preprocess.output={latents}", f"train.data={latents}", *row.latents]
        preprocess(load_config("darkdiff", stage2))
        cfg = load_config("darkdiff", [*stage2, *row.diffusion, f"train.name=bench-darkdiff-{row_name}"])
        checkpoints[f"darkdiff:{row_name}"] = trained[(key, tuple(row.latents), tuple(row.diffusion))] = trained_checkpoint(cfg, args)
    return checkpoints


def eval_rows(data: Path, split: str, limit: int | None) -> dict[str, np.ndarray]:
    return read_split(str(data), split, list(EVAL_COLUMNS), limit=limit)


def srgb_output(method, batch: dict[str, torch.Tensor], target: torch.Tensor, opts: EnhanceOptions) -> torch.Tensor:
    """The method's sRGB output at the target's size (a raw output's render is half size: demosaiced x2)."""
    image = method.to_srgb(method.predict(batch, opts).float(), batch).clamp(0, 1)
    if image.shape[-2:] != target.shape[-2:]:
        image = F.interpolate(image, size=target.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)
    return image


def evaluate(checkpoint: str, rows: dict[str, np.ndarray], args, lpips) -> dict[str, list[float]]:
    """Per-image sRGB PSNR/SSIM (and LPIPS) of one checkpoint, cached beside it."""
    cache = Path(checkpoint) / f"bench-eval-{args.eval_split}-{args.infer_steps}.json"
    ids = [str(r) for r in rows["record_id"]]
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["ids"] == ids:
            return saved["scores"]
    _, method = load_method(checkpoint)
    opts = EnhanceOptions(steps=args.infer_steps)
    scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}
    for start in range(0, len(ids), args.eval_batch):
        batch = {k: torch.from_numpy(np.asarray(rows[k][start:start + args.eval_batch], dtype=np.float32))
                 for k in EVAL_COLUMNS if k != "record_id"}
        target = batch["srgb_gt"]
        with torch.no_grad():
            image = srgb_output(method, batch, target, opts)
        for i in range(len(image)):
            scores["psnr"].append(psnr(image[i:i + 1], target[i:i + 1]))
            scores["ssim"].append(ssim(image[i:i + 1], target[i:i + 1]))
            if lpips is not None:
                scores["lpips"].append(float(lpips(image[i:i + 1], target[i:i + 1]).mean()))
    cache.write_text(json.dumps({"ids": ids, "scores": scores}))
    return scores


def summary(per_image: dict[str, dict[str, list[float]]], ablation_names: list[str]) -> dict:
    mean = {run: {m: (float(np.mean(v)) if v else None) for m, v in s.items()} for run, s in per_image.items()}
    full = "darkdiff:full"
    result = {
        "psnr": {name: mean[key]["psnr"] for name, key in (("darkdiff", full), *((b, b) for b in BASELINES))},
        "ssim": {name: mean[key]["ssim"] for name, key in (("darkdiff", full), *((b, b) for b in BASELINES))},
        "lpips": {name: mean[key]["lpips"] for name, key in (("darkdiff", full), *((b, b) for b in BASELINES))},
        "residual_vae_psnr": mean["vae-default"]["psnr"], "plain_vae_psnr": mean["vae-no_residual_vae"]["psnr"],
        "residual_vae_ssim": mean["vae-default"]["ssim"], "plain_vae_ssim": mean["vae-no_residual_vae"]["ssim"],
        "stage1_vaes": {run: mean[run] for run in mean if run.startswith("vae-")},
        "ablations": {name: {"psnr": mean[f"darkdiff:{name}"]["psnr"], "ssim": mean[f"darkdiff:{name}"]["ssim"]}
                      for name in ablation_names},
    }
    paired = {f"darkdiff - {b}": (full, b) for b in BASELINES}
    paired["residual - plain VAE"] = ("vae-default", "vae-no_residual_vae")
    result["psnr_difference_ci"] = {label: bootstrap_ci(np.array(per_image[a]["psnr"]) - np.array(per_image[b]["psnr"]))
                                    for label, (a, b) in paired.items()}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench/darkdiff")
    p.add_argument("--raw-root", help="an existing SID-shaped raw set (e.g. the ExposureDiffusion benchmark's)")
    p.add_argument("--photos", choices=["default", "extended"], default="default")
    p.add_argument("--photos-dir", default="out/photos/extended")
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--rows", type=lambda s: s.split(","), help="ablation rows (default: all; full and "
                   "no_residual_vae are needed for the headline figures)")
    add_budget_arguments(p, eval_batch=16)
    p.add_argument("--checkpoint-every", type=int, default=150)
    p.add_argument("--eval-split", default="test")
    p.add_argument("--json", default=str(RESULTS_DIR / "darkdiff.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("ray").setLevel(logging.WARNING)
    if not Path(args.vae, "config.json").exists():
        raise SystemExit(f"--vae {args.vae}: no fitted VAE there; run `make run` or `lowlight fit-vae` first")
    load = load_at_start()
    started = time.time()
    work = Path(args.out).resolve()
    if args.raw_root:
        root = Path(args.raw_root).resolve()
    else:
        root = build_bench_samples(work, 1, args.max_side, args.photos_dir if args.photos == "extended" else None)
    checkpoints = train_all(args, root)
    rows = eval_rows(work / "parquet-a", args.eval_split, args.eval_limit)
    lpips = lpips_loss_or_none()
    per_image = {}
    for run_name, ckpt in checkpoints.items():
        print(f"evaluating {run_name}", flush=True)
        per_image[run_name] = evaluate(ckpt, rows, args, lpips)
    ablation_names = [k.split(":", 1)[1] for k in checkpoints if k.startswith("darkdiff:")]
    result = summary(per_image, ablation_names)
    result |= {"images": len(rows["record_id"]), "split": args.eval_split, "lpips_available": lpips is not None,
               "raw_root": repo_relative(root), "checkpoints": {k: repo_relative(v) for k, v in checkpoints.items()}, "seconds": round(time.time() - started),
               "settings": {k: v for k, v in vars(args).items() if k != "json"}, "machine": machine_info(),
               "load_at_start": load}
    print_table(["run", "PSNR", "SSIM", "LPIPS"],
                [[name, f"{np.mean(s['psnr']):.2f}", f"{np.mean(s['ssim']):.4f}",
                  f"{np.mean(s['lpips']):.4f}" if s["lpips"] else "n/a"] for name, s in per_image.items()],
                title=f"sRGB on {len(rows['record_id'])} {args.eval_split} crops, {args.steps} steps each")
    for label, ci in result["psnr_difference_ci"].items():
        print(f"{label}: {ci['mean']:+.2f} dB [{ci['low']:+.2f}, {ci['high']:+.2f}] over {ci['images']} images")
    print(f"wrote {write_result('darkdiff', result, args.json)}")


if __name__ == "__main__":
    main()
