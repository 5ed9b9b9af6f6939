"""ExposureDiffusion against the same-backbone regression baseline, with the paper's protocol.

Every run is trained by ``lowlight.train.train`` (Ray Train) from the same Parquet crops (64 x 64
packed raw, 128 sRGB px) with the same budget (steps, per-worker batch, lr with a cosine schedule,
workers, seed): one optimizer step of ExposureDiffusion costs ``train_steps`` network evaluations,
one of regression costs one, as in the paper ("the same settings"). Both methods draw a fresh noisy
input from the long exposure at every step (``--noises``: P+G, the paper's 29.52 -> 33.04 dB row, and
ELD) at a ratio drawn in [20, 300], with random flips (``lowlight.methods.short_exposure``).

Runs (``--backbones`` x ``--noises`` x methods): regression and ExposureDiffusion with its defaults
(the released code's: 3 evaluations in training, uniform training exposures, photon map, X_T for ELD,
next state redrawn from X_T, L1 + branch losses, learned step weights); the headline setting (the
first backbone and noise) is trained with every seed of ``--seeds`` and also with the paper's Eq. 10
next state (``exposure_diffusion_accumulate``). Pipeline:

1. the SID-shaped raw set: ``--photos extended`` (the photos ``lowlight photos`` extracted, split by
   its manifest), ``--images DIR`` (1/7 of the photos held out), or the 7 skimage.data photos;
2. ``lowlight.data.preprocess.preprocess`` to Parquet (``raw_in``, ``raw_gt``; evaluation images as
   grids of crops that tile them);
3. each run trained from scratch, or evaluated as it is with ``--reuse-runs`` when it finished;
4. evaluation on ``--eval-splits`` (default: test): every image stitched from its crops and scored
   whole, per ratio (x100/x250/x300): raw PSNR/SSIM without and with the least-squares brightness
   correction of the paper's protocol (``_ls``; the released ``IlluminanceCorrect``), and sRGB
   PSNR/SSIM rendered with each image's wb/ccm. ExposureDiffusion for k = 1..``--sweep-steps``
   inference steps, each the mean over ``--inference-seeds``; its main rows use its configured
   ``infer_steps`` (3). ``exposure_diffusion_ls_oracle`` is the released code's test procedure: each
   step's prediction rescaled by its least-squares fit to the ground truth, an ORACLE (it reads the
   answer), reported for comparison with the paper only, at k = ``--ed-infer-steps`` (every k with
   ``--oracle-sweep``). Per-image results are cached under
   ``--out``/eval, so a rerun only evaluates what is new.

The gain is ED - regression raw PSNR at x300, per image (paired: same image, same training seed,
then averaged over training seeds), with a bootstrap 95% interval over images (10,000 resamples).

Cost (CPU seconds per worker step at batch 8 on 64 x 64 crops, one thread, measured on the shared
2-core VM under load, so upper bounds): nafnet-1 regression 0.08, ExposureDiffusion 0.24 (pg) /
0.27 (eld); nafnet-l4-w16 regression 0.31, ExposureDiffusion 1.1 (pg) / 1.5 (eld). The defaults
(4000 steps x 2 workers, 11 runs) train in about 10 CPU-hours and evaluate in 1-2 more;
``--backbones nafnet-1,nafnet-l4-w8`` about halves the larger backbone's share.

    .venv/bin/python benchmarks/exposure_diffusion.py [--photos extended] [--steps 4000]
        [--backbones nafnet-1,nafnet-l4-w16] [--noises pg,eld] [--seeds 0,1] [--reuse-runs]
        [--out WORKDIR] [--json PATH (default benchmarks/results/exposure_diffusion.json)]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from common import (
    RESULTS_DIR,
    bootstrap_ci,
    build_bench_samples,
    finished_run,
    load_at_start,
    print_table,
    train_run,
    write_result,
)

from lowlight.checkpoint import load_method
from lowlight.config import Config, SamplesConfig, load_config
from lowlight.data.parquet import read_split
from lowlight.data.preprocess import preprocess
from lowlight.data.samples import build_samples, photos_from_dir
from lowlight.methods import EnhanceOptions, Method
from lowlight.metrics import least_squares_rescale, psnr, ssim
from lowlight.models import isp

METRICS = ("psnr", "ssim", "psnr_ls", "ssim_ls", "psnr_srgb", "ssim_srgb")
EVAL_COLUMNS = ("record_id", "ratio", "iso", "crop_y", "crop_x", "raw_in", "raw_gt", "wb", "ccm")
ED, REG = "exposure_diffusion", "regression"


@dataclass(frozen=True)
class RunSpec:
    method: str
    backbone: str
    noise: str
    seed: int
    next_state: str | None = None  # ExposureDiffusion's variants; None: its default
    step_weights: str | None = None

    @property
    def label(self) -> str:
        """The row name in the tables: the method, and the variant when it is not the default."""
        if self.next_state == "accumulate":
            return f"{self.method}_accumulate"
        return f"{self.method}_equal_weights" if self.step_weights == "equal" else self.method

    @property
    def setting(self) -> str:
        return f"{self.backbone}/{self.noise}"

    @property
    def name(self) -> str:
        return f"{self.label}-{self.backbone}-{self.noise}-s{self.seed}"


def plan_runs(args) -> list[RunSpec]:
    runs = []
    for b_index, backbone in enumerate(args.backbones):
        for n_index, noise in enumerate(args.noises):
            headline = b_index == 0 and n_index == 0
            for seed in args.seeds if headline else args.seeds[:1]:
                runs += [RunSpec(REG, backbone, noise, seed), RunSpec(ED, backbone, noise, seed)]
            if headline and args.accumulate_variant:
                runs.append(RunSpec(ED, backbone, noise, args.seeds[0], next_state="accumulate"))
            if headline and args.equal_weights_variant:
                runs.append(RunSpec(ED, backbone, noise, args.seeds[0], step_weights="equal"))
    return runs


# ---------------------------------------------------------------- data and training

def build_raw_set(args, work: Path) -> tuple[Path, str]:
    """The SID-shaped raw set (built once, then reused); returns its root and a label of the source."""
    if args.photos == "extended":
        return build_bench_samples(work, 1, args.max_side, extended_photos=args.photos_dir), args.photos_dir
    if args.images is None:
        return build_bench_samples(work, 1, args.max_side), "skimage.data"
    source = Path(args.images).resolve()
    key = hashlib.sha256(repr((str(source), sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source.iterdir()))).encode())
    out = work / f"samples-{key.hexdigest()[:10]}-{args.max_side}"
    build_samples(out, photos=photos_from_dir(source), max_side=args.max_side, progress=False)
    return out / "raw", str(source)


def base_config(args, root: Path, parquet: Path) -> Config:
    return load_config("sample_raw", [
        f"dataset.root={root}", "model.pretrained=tiny", "model.vae=null",
        f"preprocess.output={parquet}", f"preprocess.crop_size={args.crop_size}",
        f"preprocess.crops_per_image={args.crops_per_image}", "preprocess.eval_crop=grid",
        "preprocess.columns=[raw_in, raw_gt]", f"preprocess.seed={args.data_seed}",
        f"ray.num_cpus={args.num_cpus}",
        f"train.data={parquet}", f"train.storage_path={Path(args.out).resolve() / 'runs'}",
        f"train.num_workers={args.num_workers}", f"train.cpus_per_worker={args.cpus_per_worker}",
        f"train.batch_size={args.batch_size}", f"train.steps={args.steps}", f"train.lr={args.lr}",
        "train.schedule=cosine", f"train.warmup_steps={args.warmup_steps}",
        f"train.checkpoint_every={args.val_every}", f"train.val_every={args.val_every}",
    ])


def run_config(cfg: Config, spec: RunSpec, args) -> Config:
    run = cfg.model_copy(deep=True)
    run.method.name, run.method.backbone = spec.method, spec.backbone
    run.method.options = {"noise": spec.noise}
    if spec.method == ED:
        run.method.options |= {"train_steps": args.ed_train_steps, "infer_steps": args.ed_infer_steps}
        if spec.next_state:
            run.method.options["next_state"] = spec.next_state
        if spec.step_weights:
            run.method.options["step_weights"] = spec.step_weights
    run.train.seed, run.train.name = spec.seed, f"bench-{spec.name}"
    return run


# ---------------------------------------------------------------- evaluation

def read_eval_rows(parquet: Path, splits: list[str]) -> dict[str, np.ndarray]:
    parts = [read_split(str(parquet), split, list(EVAL_COLUMNS)) for split in splits]
    return {c: np.concatenate([p[c] for p in parts]) for c in EVAL_COLUMNS}


def images_of(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """record id -> the indices of its crops."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rid in enumerate(rows["record_id"]):
        groups[str(rid)].append(i)
    return {k: np.array(v) for k, v in sorted(groups.items())}


def stitch(tiles: np.ndarray, rows: dict[str, np.ndarray], index: np.ndarray) -> torch.Tensor:
    """Put one image's raw crops back where they came from (crop corners are in sRGB pixels)."""
    th, tw = tiles.shape[-2:]
    ys, xs = rows["crop_y"][index] // 2, rows["crop_x"][index] // 2
    image = np.zeros((tiles.shape[1], int(ys.max()) + th, int(xs.max()) + tw), np.float32)
    for i, y, x in zip(index, ys, xs, strict=True):
        image[:, y:y + th, x:x + tw] = tiles[i]
    return torch.from_numpy(image)[None]


def predict_rows(method: Method, rows: dict[str, np.ndarray], opts: EnhanceOptions,
                 batch_size: int) -> np.ndarray:
    out = []
    for s in range(0, len(rows["record_id"]), batch_size):
        batch = {k: torch.from_numpy(np.asarray(rows[k][s:s + batch_size], dtype=np.float32))
                 for k in ("raw_in", "raw_gt", "ratio", "iso", "wb", "ccm")}
        out.append(method.predict(batch, opts).float().numpy())
    return np.concatenate(out)


def score(tiles: np.ndarray, rows: dict[str, np.ndarray], images: dict[str, np.ndarray]) -> dict[str, dict]:
    """{record id: {metric: value}} for every image, scored whole."""
    out = {}
    for rid, index in images.items():
        pred, gt = stitch(tiles, rows, index), stitch(rows["raw_gt"], rows, index)
        corrected = least_squares_rescale(pred, gt)
        first = index[0]
        wb, ccm = torch.from_numpy(rows["wb"][first])[None], torch.from_numpy(rows["ccm"][first])[None]
        pred_srgb, gt_srgb = isp.render(pred, wb, ccm), isp.render(gt, wb, ccm)
        out[rid] = {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt),
                    "psnr_ls": psnr(corrected, gt), "ssim_ls": ssim(corrected, gt),
                    "psnr_srgb": psnr(pred_srgb, gt_srgb), "ssim_srgb": ssim(pred_srgb, gt_srgb)}
    return out


def mean_over(scored: list[dict[str, dict]]) -> dict[str, dict]:
    """Per image, the mean of each metric over several predictions (inference seeds)."""
    return {rid: {m: float(np.mean([s[rid][m] for s in scored])) for m in METRICS} for rid in scored[0]}


def evaluate_run(ckpt: str, rows: dict, images: dict, args, cache: Path) -> dict:
    """{variant: {k: {record id: {metric: value}}}}, cached in ``cache`` under the evaluation settings."""
    weights = Path(ckpt) / "model.safetensors"  # a retrained run at the same path is evaluated again
    key = {"checkpoint": str(Path(ckpt).resolve()), "weights_mtime_ns": weights.stat().st_mtime_ns,
           "splits": args.eval_splits, "sweep": args.sweep_steps, "seeds": args.inference_seeds,
           "oracle_sweep": args.oracle_sweep, "infer_steps": args.ed_infer_steps,
           "images": sorted(images)}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved["scores"]
    _, method = load_method(ckpt)

    def scored(opts: EnhanceOptions) -> dict[str, dict]:
        return score(predict_rows(method, rows, opts, args.eval_batch), rows, images)

    if method.name != ED:
        scores = {"default": {"1": scored(EnhanceOptions())}}
    else:
        scores = {}
        sweep = list(range(1, args.sweep_steps + 1))
        oracle_ks = sweep if args.oracle_sweep else [args.ed_infer_steps]
        for variant, oracle, ks in (("default", "off", sweep), ("ls_oracle", "inference", oracle_ks)):
            method.options = method.options.model_copy(update={"ls_oracle": oracle})
            scores[variant] = {str(k): mean_over([scored(EnhanceOptions(steps=k, seed=s))
                                                  for s in range(args.inference_seeds)]) for k in ks}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "scores": scores}))
    return scores


def input_scores(rows: dict, images: dict) -> dict[str, dict]:
    amplified = np.clip(rows["raw_in"] * rows["ratio"][:, None, None, None], 0, 1).astype(np.float32)
    return score(amplified, rows, images)


# ---------------------------------------------------------------- aggregation

def per_ratio(per_image: dict[str, dict], ratio_of: dict[str, str], metric: str) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for rid, values in per_image.items():
        groups[ratio_of[rid]].append(values[metric])
    return {r: float(np.mean(v)) for r, v in sorted(groups.items(), key=lambda kv: float(kv[0]))}


def seed_mean(per_images: list[dict[str, dict]]) -> dict[str, dict]:
    """Per image, the mean over training seeds."""
    return mean_over(per_images) if len(per_images) > 1 else per_images[0]


def setting_summary(specs: list[RunSpec], scores: dict[str, dict], inputs: dict, ratio_of: dict,
                    args) -> dict:
    """Tables of one backbone/noise setting: per-ratio means, PSNR vs k, the paired ED - regression gain."""
    main_k = str(args.ed_infer_steps)
    rows: dict[str, dict[str, dict]] = {"input": inputs}
    sweeps: dict[str, dict[str, dict[str, dict]]] = {}
    by_label: dict[str, list[RunSpec]] = defaultdict(list)
    for spec in specs:
        by_label[spec.label].append(spec)
    for label, group in by_label.items():
        variants = ("default", "ls_oracle") if group[0].method == ED else ("default",)
        for variant in variants:
            name = label if variant == "default" else f"{label}_ls_oracle"
            runs = [scores[s.name][variant] for s in group]
            ks = sorted(runs[0], key=int)
            sweeps[name] = {k: seed_mean([r[k] for r in runs]) for k in ks}
            rows[name] = sweeps[name][main_k if group[0].method == ED else ks[0]]
    out = {m: {name: per_ratio(per_image, ratio_of, m) for name, per_image in rows.items()} for m in METRICS}
    out["psnr_vs_steps"] = {name: {k: float(np.mean([v["psnr"] for v in per_image.values()]))
                                   for k, per_image in sweep.items()} for name, sweep in sweeps.items()}
    out["psnr_vs_steps_by_ratio"] = {
        name: {k: per_ratio(per_image, ratio_of, "psnr") for k, per_image in sweep.items()}
        for name, sweep in sweeps.items()}
    top = max(set(ratio_of.values()), key=float)
    paired = [s for s in by_label[ED] if any(r.seed == s.seed for r in by_label[REG])]
    if paired:
        reg_of = {r.seed: r for r in by_label[REG]}
        per_seed = [{rid: scores[s.name]["default"][main_k][rid]["psnr"]
                     - scores[reg_of[s.seed].name]["default"]["1"][rid]["psnr"] for rid in ratio_of}
                    for s in paired]
        at_top = [rid for rid in sorted(ratio_of) if ratio_of[rid] == top]
        diffs = np.array([np.mean([d[rid] for d in per_seed]) for rid in at_top])
        out["gain_ci"] = {"ratio": top, "metric": "psnr", "k": int(main_k), **bootstrap_ci(diffs),
                          "training_seeds": [s.seed for s in paired]}
    return out


# ---------------------------------------------------------------- report

def print_report(result: dict) -> None:
    for setting, summary in result["settings"].items():
        ratios = list(summary["psnr"]["input"])
        for suffix, domain in (("", "raw"), ("_ls", "raw, least-squares corrected"), ("_srgb", "sRGB")):
            headers = ["method", *(f"PSNR x{r}" for r in ratios), *(f"SSIM x{r}" for r in ratios)]
            table = [[name, *(summary["psnr" + suffix][name][r] for r in ratios),
                      *(summary["ssim" + suffix][name][r] for r in ratios)] for name in summary["psnr"]]
            k = result["exposure_diffusion_infer_steps"]
            print_table(headers, table, f"{setting}: {domain} (ED at k = {k})")
        sweep = summary["psnr_vs_steps"]
        ks = sorted({k for v in sweep.values() for k in v}, key=int)
        print_table(["method", *(f"k={k}" for k in ks)],
                    [[n, *(v.get(k) for k in ks)] for n, v in sweep.items()],
                    f"{setting}: raw PSNR (all images) vs inference steps k")
        if "gain_ci" in summary:
            g = summary["gain_ci"]
            print(f"{setting}: ED - regression raw PSNR at x{g['ratio']}: {g['mean']:+.2f} dB, 95% bootstrap "
                  f"interval [{g['low']:+.2f}, {g['high']:+.2f}] over {g['images']} images")


def parse_list(cast):
    return lambda s: [cast(x) for x in s.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", choices=("default", "extended"), default="default",
                   help="extended: the set `lowlight photos` extracted (--photos-dir), split by its manifest")
    p.add_argument("--photos-dir", default=SamplesConfig().photos_dir)
    p.add_argument("--images", default=None, help="folder of photos instead (1/7 held out)")
    p.add_argument("--max-side", type=int, default=512, help="long side of the photos, sRGB pixels")
    p.add_argument("--backbones", type=parse_list(str), default=["nafnet-1", "nafnet-l4-w16"],
                   help="the first is the headline backbone")
    p.add_argument("--noises", type=parse_list(str), default=["pg", "eld"],
                   help="the first is the headline noise")
    p.add_argument("--seeds", type=parse_list(int), default=[0, 1],
                   help="training seeds of the headline setting")
    p.add_argument("--no-accumulate-variant", dest="accumulate_variant", action="store_false",
                   help="skip the paper's Eq. 10 next-state run of the headline setting")
    p.add_argument("--equal-weights-variant", action="store_true",
                   help="also train the headline setting with equal per-step loss weights (seed 0)")
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr (cosine decay to 0)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--crop-size", type=int, default=128, help="sRGB pixels (packed raw crops are half)")
    p.add_argument("--crops-per-image", type=int, default=32, help="random crops per training image")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the crops")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs each worker reserves")
    p.add_argument("--num-cpus", type=int, default=(os.cpu_count() or 1) + 1,
                   help="logical CPUs of the local Ray cluster (default cores + 1: room for the data read)")
    p.add_argument("--val-every", type=int, default=None,
                   help="validate + checkpoint every N steps (default steps/10)")
    p.add_argument("--ed-train-steps", type=int, default=3,
                   help="ExposureDiffusion network evaluations in training")
    p.add_argument("--ed-infer-steps", type=int, default=3, help="ExposureDiffusion steps of the main tables")
    p.add_argument("--sweep-steps", type=int, default=5, help="evaluate k = 1..N inference steps")
    p.add_argument("--inference-seeds", type=int, default=3,
                   help="ExposureDiffusion scores: mean over N seeds")
    p.add_argument("--oracle-sweep", action="store_true",
                   help="evaluate the LS oracle at every k (default: at --ed-infer-steps only)")
    p.add_argument("--eval-splits", type=parse_list(str), default=["test"])
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="out/bench/exposure_diffusion",
                   help="work folder (samples, Parquet, runs, cached evaluations)")
    p.add_argument("--json", default=str(RESULTS_DIR / "exposure_diffusion.json"), help="result file")
    p.add_argument("--reuse-runs", action="store_true",
                   help="evaluate runs under --out that already finished --steps and continue unfinished "
                        "ones from their latest checkpoint, instead of retraining them")
    args = p.parse_args()
    args.val_every = args.val_every or max(1, args.steps // 10)
    if args.sweep_steps < args.ed_infer_steps:
        p.error(f"--sweep-steps {args.sweep_steps} must reach --ed-infer-steps {args.ed_infer_steps}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = load_at_start()
    work = Path(args.out).resolve()
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    t = time.perf_counter()
    root, source = build_raw_set(args, work)
    print(f"raw set ready in {time.perf_counter() - t:.1f} s: {root}")
    parquet = work / f"parquet-{root.parent.name}-c{args.crop_size}-n{args.crops_per_image}-s{args.data_seed}"
    cfg = base_config(args, root, parquet)
    summary = preprocess(cfg)
    print(summary.line())

    specs = plan_runs(args)
    runs = {}
    for spec in specs:
        run_cfg = run_config(cfg, spec, args)
        reused = finished_run(run_cfg) if args.reuse_runs else None
        if not reused:
            print(f"training {spec.name}: {args.steps} steps, batch {args.batch_size} x "
                  f"{args.num_workers} workers")
        runs[spec.name] = reused or train_run(run_cfg, resume=args.reuse_runs)
        seconds = runs[spec.name]["seconds"]
        took = "reused" if reused else "resumed" if seconds is None else f"{seconds:.1f} s"
        print(f"{spec.name}: {took}, checkpoint {runs[spec.name]['checkpoint']}")
    ray.shutdown()

    torch.set_num_threads(args.eval_threads)
    rows = read_eval_rows(parquet, args.eval_splits)
    images = images_of(rows)
    ratio_of = {rid: str(round(float(rows["ratio"][index[0]]))) for rid, index in images.items()}
    t = time.perf_counter()
    scores = {s.name: evaluate_run(runs[s.name]["checkpoint"], rows, images, args,
                                   work / "eval" / f"{s.name}.json") for s in specs}
    inputs = input_scores(rows, images)
    eval_seconds = time.perf_counter() - t

    settings = {}
    for spec in specs:
        settings.setdefault(spec.setting, [])
        settings[spec.setting].append(spec)
    summaries = {name: setting_summary(group, scores, inputs, ratio_of, args)
                 for name, group in settings.items()}
    headline = specs[0].setting
    head = summaries[headline]
    params = {}
    for spec in specs:
        if spec.setting == headline and spec.label not in params:
            _, method = load_method(runs[spec.name]["checkpoint"])
            params[spec.label] = sum(p.numel() for p in method.parameters())
    counts = defaultdict(int)
    for r in ratio_of.values():
        counts[r] += 1
    seconds = {s.name: runs[s.name]["seconds"] for s in specs}
    result = {
        "backbone": specs[0].backbone,
        "noise": specs[0].noise,
        **{m: head[m] for m in METRICS},
        "psnr_vs_steps": head["psnr_vs_steps"],
        "psnr_vs_steps_by_ratio": head["psnr_vs_steps_by_ratio"],
        "gain_ci_300": ({k: head["gain_ci"][k] for k in ("low", "high", "mean")}
                        if "gain_ci" in head else None),
        "test_images": {"scenes": len({rid.split("_")[0] for rid in ratio_of}),
                        "per_ratio": dict(sorted(counts.items())), "splits": args.eval_splits},
        "train_images_per_s": {s.label: runs[s.name]["images_per_s"] for s in specs
                               if s.setting == headline and s.seed == specs[0].seed},
        "train_images_per_s_runs": {s.name: runs[s.name]["images_per_s"] for s in specs},
        "params": params,
        "settings": summaries,
        "exposure_diffusion_infer_steps": args.ed_infer_steps,
        "notes": {"ls": "_ls: scaled by the least-squares factor to the ground truth before scoring (the "
                        "paper's protocol); *_ls_oracle rows rescale every inference step the same way (the "
                        "released test code): both read the ground truth",
                  "gain": "ED - regression raw PSNR at the highest ratio, paired per image and training "
                          "seed, bootstrap 95% interval over images",
                  "regression_steps": "regression makes one network evaluation: one value at k = 1"},
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "num_workers": args.num_workers,
                   "global_batch": args.batch_size * args.num_workers, "crop_size": args.crop_size,
                   "lr": args.lr,
                   "schedule": "cosine", "warmup_steps": args.warmup_steps, "seeds": args.seeds,
                   "ed_train_steps": args.ed_train_steps, "cpus_per_worker": args.cpus_per_worker,
                   "ray_num_cpus": args.num_cpus, "train_seconds": seconds},
        "data": {"source": source, "max_side": args.max_side, "crops_per_image": args.crops_per_image,
                 "eval_crops": len(rows["record_id"]), "parquet": os.path.relpath(parquet)},
        "checkpoints": {s.name: os.path.relpath(runs[s.name]["checkpoint"]) for s in specs},
        "eval_seconds": eval_seconds,
        "load_average_at_start": load,
    }
    print_report(result)
    path = write_result("exposure_diffusion", result, args.json)
    side = path.with_name(path.stem + "_per_image.json")
    side.write_text(json.dumps({"ratio": ratio_of, "input": inputs, "runs": scores}) + "\n")
    print(f"wrote {side}")


if __name__ == "__main__":
    main()
