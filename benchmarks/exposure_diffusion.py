"""ExposureDiffusion against the single-step regression baseline: quality per ratio, steps and speed.

Both methods get the same backbone, budget (steps, per-worker batch, lr with a cosine schedule,
crop size), the same Parquet crops and the same seed, and are trained by ``lowlight.train.train``
(Ray Train). Pipeline:

1. the SID-shaped sample raw set (``lowlight.data.samples.build_samples``: skimage photos, or every
   photo in ``--images DIR`` through the same unprocess + calibrated-noise synthesis), short
   exposures at ``--ratios`` (100/250/300);
2. ``lowlight.data.preprocess.preprocess`` to Parquet with ``preprocess.columns=[raw_in, raw_gt]``
   (no latents, so no fitted VAE: the tiny bundle's VAE only names the files) and
   ``eval_crop=grid``: a training image gives ``--crops-per-image`` random crops, a val/test image
   the grid of crops that tiles it;
3. ``regression`` then ``exposure_diffusion`` trained from those rows (each from scratch: a
   previous run of the same name under ``--out``/runs is deleted, as Ray would resume it);
4. both checkpoints reloaded with ``lowlight.checkpoint.load_method``; ``method.predict`` runs over
   every val + test crop, the crops are stitched back into the image they tile, and each image is
   scored as a whole, then averaged per ratio. ExposureDiffusion is also swept over
   ``EnhanceOptions(steps=1..--sweep-steps)``; its main rows use its configured ``infer_steps``.
   Regression has no steps: its psnr_vs_steps is one value repeated (it does not depend on k).
   The default photos give 1 val + 1 test scene, i.e. 2 held-out images per ratio: use
   ``--images DIR`` with more photos (1/7 of them are held out) for tighter numbers.

Scores: PSNR/SSIM on packed raw (4 x H/2 x W/2, as the paper reports) and on sRGB rendered with
``lowlight.models.isp.render`` from each image's own ``wb``/``ccm`` (the two can disagree in sign:
raw PSNR weighs bright pixels, sRGB's tone curve lifts the shadows where noise lives).
``--ls-correction`` first scales every prediction (the input too) by the scalar ``a`` minimising
``||a * pred - gt||^2`` on raw, removing a global brightness error, and renders the scaled raw.
"input" is the amplified noisy input ``clip(raw_in * ratio, 0, 1)``.

Defaults (every one is a flag), chosen to finish in about 20-30 minutes on 2 CPU cores while giving
regression a real chance to beat the input by >= 3 dB at x300:

* backbone ``nafnet-1`` (0.29 M parameters): about 0.1 s per regression step at batch 8 on 64 x 64
  packed crops on one core; ExposureDiffusion with T=2 training steps costs about 2x that;
* crop 128 sRGB px (64 x 64 packed raw), 32 crops per training image (480 training rows);
* 4000 steps, batch 8 per worker, lr 1e-3 with cosine decay, grad clip 1.0, seed 0;
* 2 Ray Train workers of 1 torch thread each (DDP, global batch 16). On 2 cores two
  single-thread processes beat one process with 2 threads: the convolutions are too small to split
  well across threads, and 2 OpenMP threads collapse as soon as anything else runs on the machine
  (measured here with other work running: nafnet-1, batch 8, 1 thread 0.1 s/step, 2 threads
  2.3-3.0 s/step), while the DDP all-reduce of ~1 MB of gradients per step is cheap;
* the local Ray cluster declares one logical CPU more than the machine has (``--num-cpus``, default
  cores + 1). Ray Train keeps its workers' CPUs out of Ray Data's budget, and the parquet reader's
  ListFiles task asks for a whole CPU (``train.read_split``'s 0.1 CPU does not reach it), so with
  2 workers x 1 CPU on a 2-CPU cluster the read of the training split is never scheduled and the
  run hangs ("Cluster resources are not enough to run any task from ...ReadFilesParquetV2"). The
  spare logical CPU only runs that brief read; the workers keep 1 CPU and 1 OpenMP thread each;
* ExposureDiffusion options: train_steps T=2, infer_steps 2, loss l1, paired noise (the Parquet's
  raw_in is X_T).

    .venv/bin/python benchmarks/exposure_diffusion.py [--images DIR] [--steps 4000] [--backbone nafnet-1]
        [--batch-size 8] [--lr 1e-3] [--crop-size 128] [--num-workers 2] [--ls-correction]
        [--out WORKDIR] [--json PATH (default benchmarks/results/exposure_diffusion.json)]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from common import RESULTS_DIR, build_bench_samples, load_at_start, print_table, write_result

from lowlight.checkpoint import load_method
from lowlight.config import Config, load_config
from lowlight.data.parquet import tensor_column
from lowlight.data.preprocess import preprocess
from lowlight.data.samples import build_samples, photos_from_dir
from lowlight.methods import EnhanceOptions, Method
from lowlight.metrics import psnr, ssim
from lowlight.models import isp
from lowlight.train import train

METHODS = ("regression", "exposure_diffusion")
EVAL_SPLITS = ("val", "test")
EVAL_COLUMNS = ("id", "record_id", "ratio", "iso", "crop_y", "crop_x", "raw_in", "raw_gt", "wb", "ccm")


def ratio_key(ratio: float) -> str:
    """A record's ratio comes from SID-style file names (two significant digits), so round it."""
    return str(round(ratio))


def build_raw_set(args, work: Path) -> tuple[Path, str]:
    """The SID-shaped raw set (built once, then reused); returns its root and a label of the source."""
    ratios = tuple(args.ratios)
    if args.images is None and ratios == (100, 250, 300):
        return build_bench_samples(work, 1, args.max_side), "skimage.data"
    source = Path(args.images).resolve() if args.images else None
    photos = photos_from_dir(source) if source else None
    key = hashlib.sha256(repr((str(source), ratios, sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source.iterdir()) if source else None)).encode())
    out = work / f"samples-{key.hexdigest()[:10]}-{args.max_side}"
    build_samples(out, photos=photos, ratios=ratios, max_side=args.max_side, progress=False)
    return out / "raw", str(source) if source else "skimage.data"


def base_config(args, root: Path, parquet: Path) -> Config:
    return load_config("sample_raw", [
        f"dataset.root={root}", "model.pretrained=tiny", "model.vae=null",
        f"preprocess.output={parquet}", f"preprocess.crop_size={args.crop_size}",
        f"preprocess.crops_per_image={args.crops_per_image}", "preprocess.eval_crop=grid",
        "preprocess.columns=[raw_in, raw_gt]", "preprocess.records_per_shard=4096", f"preprocess.seed={args.seed}",
        f"ray.num_cpus={args.num_cpus}",
        f"method.backbone={args.backbone}", *([f"method.width={args.width}"] if args.width else []),
        f"train.data={parquet}", f"train.storage_path={work_dir(args) / 'runs'}",
        f"train.num_workers={args.num_workers}", f"train.cpus_per_worker={args.cpus_per_worker}", f"train.batch_size={args.batch_size}",
        f"train.steps={args.steps}", f"train.lr={args.lr}", "train.schedule=cosine",
        f"train.warmup_steps={args.warmup_steps}", f"train.seed={args.seed}",
        f"train.checkpoint_every={args.val_every}", f"train.val_every={args.val_every}",
    ])


def work_dir(args) -> Path:
    return Path(args.out).resolve()


def method_config(cfg: Config, name: str, args) -> Config:
    run = cfg.model_copy(deep=True)
    run.method.name = name
    run.method.options = ({"train_steps": args.ed_train_steps, "infer_steps": args.ed_infer_steps}
                          if name == "exposure_diffusion" else {})
    run.train.name = f"bench-{name}"
    return run


def finished_run(cfg: Config) -> dict | None:
    """A run of this name that already reached its last step (``--reuse-runs``): evaluate it as it is.
    Its wall time is unknown, so only the in-run images/s (from its metrics) is reported."""
    final = Path(cfg.train.storage_path) / cfg.train.name / f"checkpoint_{cfg.train.steps:07d}"
    if not (final / "metrics.json").exists():
        return None
    metrics = json.loads((final / "metrics.json").read_text())
    return {"checkpoint": str(final), "seconds": None, "metrics": metrics,
            "images_per_s": metrics.get("images_per_s"), "images_per_s_end_to_end": None}


def train_method(cfg: Config) -> dict:
    """Train from scratch (a leftover run of the same name would resume and finish at once)."""
    shutil.rmtree(Path(cfg.train.storage_path) / cfg.train.name, ignore_errors=True)
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    tc = cfg.train
    images = tc.steps * tc.batch_size * tc.grad_accum * tc.num_workers
    return {"checkpoint": result.checkpoint, "seconds": seconds, "metrics": result.metrics,
            "images_per_s": result.metrics.get("images_per_s"), "images_per_s_end_to_end": images / seconds}


# ---------------------------------------------------------------- evaluation

def read_eval_rows(parquet: Path) -> dict[str, np.ndarray]:
    """The val + test rows (grid crops of the held-out images) as numpy arrays."""
    files = sorted(parquet.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f, columns=list(EVAL_COLUMNS), filters=[("split", "in", EVAL_SPLITS)])
                              for f in files])
    if table.num_rows == 0:
        raise RuntimeError(f"no {'/'.join(EVAL_SPLITS)} rows in {parquet}")
    rows = {c: table.column(c).to_numpy() for c in ("id", "record_id", "ratio", "iso", "crop_y", "crop_x")}
    for c in ("raw_in", "raw_gt", "wb", "ccm"):
        rows[c] = tensor_column(table, c).astype(np.float32)
    return rows


def predict_rows(method: Method, rows: dict[str, np.ndarray], opts: EnhanceOptions, batch_size: int) -> np.ndarray:
    out = []
    for s in range(0, len(rows["id"]), batch_size):
        batch = {k: torch.from_numpy(np.asarray(rows[k][s:s + batch_size], dtype=np.float32))
                 for k in ("raw_in", "raw_gt", "ratio", "iso", "wb", "ccm")}
        out.append(method.predict(batch, opts).float().numpy())
    return np.concatenate(out)


def stitch(tiles: np.ndarray, rows: dict[str, np.ndarray], index: np.ndarray) -> torch.Tensor:
    """Put one image's raw crops back where they came from (crop corners are in sRGB pixels)."""
    th, tw = tiles.shape[-2:]
    ys, xs = rows["crop_y"][index] // 2, rows["crop_x"][index] // 2
    image = np.zeros((tiles.shape[1], int(ys.max()) + th, int(xs.max()) + tw), np.float32)
    for i, y, x in zip(index, ys, xs, strict=True):
        image[:, y:y + th, x:x + tw] = tiles[i]
    return torch.from_numpy(image)[None]


def images_of(rows: dict[str, np.ndarray]) -> list[np.ndarray]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rid in enumerate(rows["record_id"]):
        groups[rid].append(i)
    return [np.array(groups[k]) for k in sorted(groups)]


def score(pred_tiles: np.ndarray, rows: dict[str, np.ndarray], ls: bool) -> dict[str, dict[str, list[float]]]:
    """{metric: {ratio: [per-image value]}} for psnr/ssim on raw and on rendered sRGB."""
    out: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in ("psnr", "ssim", "psnr_srgb", "ssim_srgb")}
    for index in images_of(rows):
        pred, gt = stitch(pred_tiles, rows, index), stitch(rows["raw_gt"], rows, index)
        if ls:
            a = (pred * gt).sum() / (pred * pred).sum().clamp_min(1e-12)
            pred = (a * pred).clamp(0, 1)
        first = index[0]
        wb, ccm = torch.from_numpy(rows["wb"][first])[None], torch.from_numpy(rows["ccm"][first])[None]
        pred_srgb, gt_srgb = isp.render(pred, wb, ccm), isp.render(gt, wb, ccm)
        key = ratio_key(float(rows["ratio"][first]))
        out["psnr"][key].append(psnr(pred, gt))
        out["ssim"][key].append(ssim(pred, gt))
        out["psnr_srgb"][key].append(psnr(pred_srgb, gt_srgb))
        out["ssim_srgb"][key].append(ssim(pred_srgb, gt_srgb))
    return out


def means(scores: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {m: {r: float(np.mean(v)) for r, v in sorted(per.items(), key=lambda kv: float(kv[0]))}
            for m, per in scores.items()}


def overall(scores: dict[str, dict[str, list[float]]], metric: str) -> float:
    return float(np.mean([x for v in scores[metric].values() for x in v]))


def evaluate(checkpoints: dict[str, str], rows: dict[str, np.ndarray], args) -> dict:
    torch.set_num_threads(args.eval_threads)
    amplified = np.clip(rows["raw_in"] * rows["ratio"][:, None, None, None], 0, 1).astype(np.float32)
    input_scores = score(amplified, rows, args.ls_correction)
    per_method = {"input": means(input_scores)}
    vs_steps: dict[str, dict[str, float]] = {}
    vs_steps_srgb: dict[str, dict[str, float]] = {}
    vs_steps_by_ratio: dict[str, dict] = {}
    params, infer_steps = {}, {}
    sweep = range(1, args.sweep_steps + 1)
    for name, ckpt in checkpoints.items():
        _, method = load_method(ckpt)
        params[name] = sum(p.numel() for p in method.parameters())
        if name == "exposure_diffusion":
            infer_steps[name] = method.options.infer_steps
            by_k = {k: score(predict_rows(method, rows, EnhanceOptions(steps=k, seed=args.seed), args.eval_batch),
                             rows, args.ls_correction) for k in sorted({*sweep, method.options.infer_steps})}
            main = by_k[method.options.infer_steps]
            vs_steps[name] = {str(k): overall(by_k[k], "psnr") for k in sweep}
            vs_steps_by_ratio = {str(k): {m: means(by_k[k])[m] for m in ("psnr", "psnr_srgb")} for k in sweep}
            vs_steps_srgb[name] = {str(k): overall(by_k[k], "psnr_srgb") for k in sweep}
        else:
            main = score(predict_rows(method, rows, EnhanceOptions(seed=args.seed), args.eval_batch), rows,
                         args.ls_correction)
            # One network evaluation whatever k: the same value at every step count.
            vs_steps[name] = dict.fromkeys(map(str, sweep), overall(main, "psnr"))
            vs_steps_srgb[name] = dict.fromkeys(map(str, sweep), overall(main, "psnr_srgb"))
        per_method[name] = means(main)
    counts = {r: len(v) for r, v in sorted(input_scores["psnr"].items(), key=lambda kv: float(kv[0]))}
    return {"per_method": per_method, "psnr_vs_steps": vs_steps, "psnr_vs_steps_srgb": vs_steps_srgb,
            "ed_psnr_by_ratio_vs_steps": vs_steps_by_ratio,
            "params": params, "infer_steps": infer_steps, "images_per_ratio": counts}


# ---------------------------------------------------------------- report

def print_report(result: dict, ratios: list[str], order: list[str]) -> None:
    ls = " (least-squares brightness correction)" if result["ls_correction"] else ""
    for domain, suffix in (("packed raw", ""), ("sRGB (isp.render with the image's wb/ccm)", "_srgb")):
        headers = ["method", *(f"PSNR x{r}" for r in ratios), *(f"SSIM x{r}" for r in ratios)]
        rows = [[name, *(result["psnr" + suffix][name][r] for r in ratios),
                 *(result["ssim" + suffix][name][r] for r in ratios)] for name in order]
        print_table(headers, rows, f"held-out images on {domain}{ls}; images per ratio "
                                   f"{result['data']['images_per_ratio']}")
    sweep = list(next(iter(result["psnr_vs_steps"].values())))
    rows = [[name, *(result["psnr_vs_steps"][name][k] for k in sweep), *(result["psnr_vs_steps_srgb"][name][k]
                                                                         for k in sweep)]
            for name in result["psnr_vs_steps"]]
    print_table(["method", *(f"raw k={k}" for k in sweep), *(f"sRGB k={k}" for k in sweep)], rows,
                "PSNR (all held-out images) vs inference steps k; regression has no steps (constant)")
    by_k = result["exposure_diffusion_by_ratio_vs_steps"]
    rows = [[k, *(by_k[k]["psnr"][r] for r in ratios), *(by_k[k]["psnr_srgb"][r] for r in ratios)] for k in by_k]
    print_table(["ED steps k", *(f"raw x{r}" for r in ratios), *(f"sRGB x{r}" for r in ratios)], rows,
                "exposure_diffusion PSNR per ratio vs inference steps")
    b = result["budget"]
    rows = [[name, result["params"][name], b["seconds"][name], result["train_images_per_s"][name],
             result["train_images_per_s_end_to_end"][name]] for name in METHODS]
    print_table(["method", "params", "train s", "img/s (last interval)", "img/s (incl. startup)"], rows,
                f"training: {result['backbone']}, {b['steps']} steps x batch {b['batch_size']} x "
                f"{b['num_workers']} workers, crop {b['crop_size']}, lr {b['lr']} cosine")
    top = ratios[-1]
    for name in METHODS:
        raw = result["psnr"][name][top] - result["psnr"]["input"][top]
        srgb = result["psnr_srgb"][name][top] - result["psnr_srgb"]["input"][top]
        note = "  <- raw and sRGB disagree in sign" if raw * srgb < 0 else ""
        print(f"{name} vs input at x{top}: {raw:+.2f} dB raw, {srgb:+.2f} dB sRGB{note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=None, help="folder of photos to synthesise the raw set from (default: skimage)")
    p.add_argument("--ratios", type=lambda s: [int(x) for x in s.split(",")], default=[100, 250, 300])
    p.add_argument("--max-side", type=int, default=512, help="long side of the photos, sRGB pixels")
    p.add_argument("--backbone", default="nafnet-1", help="'unet' or a NAFNet preset (nafnet-1, nafnet-small, ...)")
    p.add_argument("--width", type=int, default=None, help="backbone width (default: the preset's)")
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr (cosine decay to 0)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--crop-size", type=int, default=128, help="sRGB pixels (packed raw crops are half)")
    p.add_argument("--crops-per-image", type=int, default=32, help="random crops per training image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs each worker reserves")
    p.add_argument("--worker-threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the Ray workers (default: Ray's, the worker's CPUs, i.e. 1)")
    p.add_argument("--num-cpus", type=int, default=(os.cpu_count() or 1) + 1,
                   help="logical CPUs of the local Ray cluster (default cores + 1: room for the data read)")
    p.add_argument("--val-every", type=int, default=None, help="validate + checkpoint every N steps (default steps/10)")
    p.add_argument("--ed-train-steps", type=int, default=2, help="ExposureDiffusion T in training")
    p.add_argument("--ed-infer-steps", type=int, default=2, help="ExposureDiffusion steps for the main table")
    p.add_argument("--sweep-steps", type=int, default=5, help="psnr_vs_steps for k = 1..N")
    p.add_argument("--ls-correction", action="store_true", help="scale each prediction by its least-squares "
                   "brightness factor before scoring")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="out/bench/exposure_diffusion", help="work folder (samples, Parquet, runs)")
    p.add_argument("--json", default=str(RESULTS_DIR / "exposure_diffusion.json"), help="result file")
    p.add_argument("--reuse-runs", action="store_true",
                   help="evaluate runs under --out that already finished --steps instead of retraining them")
    args = p.parse_args()
    args.val_every = args.val_every or max(1, args.steps // 10)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker_threads:  # a local cluster's workers inherit the driver's env; Ray keeps a set value
        os.environ["OMP_NUM_THREADS"] = str(args.worker_threads)
    load = load_at_start()
    work = work_dir(args)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    t = time.perf_counter()
    root, source = build_raw_set(args, work)
    print(f"raw set ready in {time.perf_counter() - t:.1f} s: {root}")
    parquet = work / f"parquet-{root.parent.name}-c{args.crop_size}-n{args.crops_per_image}-s{args.seed}"
    cfg = base_config(args, root, parquet)
    t = time.perf_counter()
    summary = preprocess(cfg)
    preprocess_seconds = time.perf_counter() - t
    print(summary.line())

    runs = {}
    for name in METHODS:
        run_cfg = method_config(cfg, name, args)
        print(f"training {name}: {args.backbone}, {args.steps} steps, batch {args.batch_size} x "
              f"{args.num_workers} workers")
        reused = finished_run(run_cfg) if args.reuse_runs else None
        runs[name] = reused or train_method(run_cfg)
        took = "reused" if reused else f"{runs[name]['seconds']:.1f} s"
        print(f"{name}: {took}, checkpoint {runs[name]['checkpoint']}")

    rows = read_eval_rows(parquet)
    t = time.perf_counter()
    ev = evaluate({name: r["checkpoint"] for name, r in runs.items()}, rows, args)
    eval_seconds = time.perf_counter() - t
    order = ["input", *METHODS]
    ratios = list(ev["images_per_ratio"])
    train_rows = pq.ParquetDataset(sorted(parquet.glob("part-*.parquet")), filters=[("split", "=", "train")]).read(
        columns=["id"]).num_rows
    result = {
        "backbone": args.backbone,
        "psnr": {m: ev["per_method"][m]["psnr"] for m in order},
        "ssim": {m: ev["per_method"][m]["ssim"] for m in order},
        "psnr_srgb": {m: ev["per_method"][m]["psnr_srgb"] for m in order},
        "ssim_srgb": {m: ev["per_method"][m]["ssim_srgb"] for m in order},
        "psnr_vs_steps": ev["psnr_vs_steps"],
        "psnr_vs_steps_srgb": ev["psnr_vs_steps_srgb"],
        "exposure_diffusion_by_ratio_vs_steps": ev["ed_psnr_by_ratio_vs_steps"],
        "psnr_vs_steps_note": "mean over all held-out images; regression makes one network evaluation, so its "
                              "value is the same at every k",
        "exposure_diffusion_infer_steps": ev["infer_steps"].get("exposure_diffusion"),
        "ls_correction": args.ls_correction,
        "train_images_per_s": {m: runs[m]["images_per_s"] for m in METHODS},
        "train_images_per_s_end_to_end": {m: runs[m]["images_per_s_end_to_end"] for m in METHODS},
        "params": ev["params"],
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "num_workers": args.num_workers,
                   "global_batch": args.batch_size * args.num_workers, "crop_size": args.crop_size, "lr": args.lr,
                   "schedule": "cosine", "warmup_steps": args.warmup_steps, "seed": args.seed,
                   "cpus_per_worker": args.cpus_per_worker, "ray_num_cpus": args.num_cpus,
                   "worker_threads": args.worker_threads or max(1, int(args.cpus_per_worker)),
                   "ed_train_steps": args.ed_train_steps, "seconds": {m: runs[m]["seconds"] for m in METHODS}},
        "data": {"source": source, "ratios": args.ratios, "max_side": args.max_side,
                 "crops_per_image": args.crops_per_image, "train_rows": train_rows,
                 "eval_splits": list(EVAL_SPLITS), "eval_crops": len(rows["id"]),
                 "images_per_ratio": ev["images_per_ratio"], "parquet": os.path.relpath(parquet)},
        "train_final_metrics": {m: runs[m]["metrics"] for m in METHODS},
        "checkpoints": {m: os.path.relpath(runs[m]["checkpoint"]) for m in METHODS},
        "preprocess_seconds": preprocess_seconds,
        "eval_seconds": eval_seconds,
        "load_average_at_start": load,
    }
    print_report(result, ratios, order)
    write_result("exposure_diffusion", result, args.json)


if __name__ == "__main__":
    main()
