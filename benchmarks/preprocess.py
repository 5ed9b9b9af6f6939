"""Ray Data preprocessing against a plain single-process loop, on SID-sized RAW pairs.

Data: a SID-shaped tree (``Sony/{long,short}/*.dng`` + ``Sony_*_list.txt``) of ``--width`` x
``--height`` DNGs (default 4256x2848, the Sony A7S2's sensor) made by the project's own
unprocessing (``lowlight.data.samples.build_samples`` from the skimage photos scaled up to the sensor
size), with ``--shorts-per-long`` short exposures per long one (SID's Sony set averages about 12).
A run of N records uses ``--scenes`` scenes; a run of 4N records uses four times as many.

Variants, each run in a fresh subprocess pinned to as many cores as its budget, so CPU time and
peak memory are its own:

* ``single``: the plain loop: ``decode_group`` per record group, ``LatentEncoder`` on its crops,
  Parquet files of ``preprocess.file_bytes`` (``write_file``); torch, OpenCV and OpenMP (LibRaw) at
  ``--threads`` threads.
* ``ray-<k>``: ``lowlight.data.preprocess.preprocess`` on a local Ray of k CPUs (the repo defaults:
  on CPU-only clusters, one fused decode+encode actor per CPU and a write stage of zero-CPU tasks);
  ``--unfused`` adds ``ray-2-unfused``: decode tasks and a separate VAE actor, the GPU clusters' shape.

A run is timed from the child's start to its exit, what a user waits for (interpreter start,
imports, ``ray.init``, actor start-up and VAE loading are fixed cost; the child also reports the
time from listing the records to the last file, and ``ray.init`` apart). Reported per variant:
fixed cost and marginal rows/s from the runs of N and 4N records (time = fixed + rows / rate),
marginal CPU-seconds per row (all the child's processes), peak PSS, each the median of
``--repeats`` runs that alternate between variants. A run during which other processes used more
than ``--max-other-share`` of the CPUs is discarded and run again (``--keep-disturbed`` keeps it,
flagged, for smoke runs on a shared machine). Every run's rows are compared, column by column,
with the single process's of the same size: they must be identical (``ray-2-unfused``'s latents
may differ by one float16 step: its VAE batches mix record groups, which changes the last bits of
CPU convolutions).

    .venv/bin/python benchmarks/preprocess.py                 # full run (results/preprocess.json)
    .venv/bin/python benchmarks/preprocess.py --smoke --keep-disturbed   # small images: exercises every
        # path in ~5 minutes on 2 quiet cores (each child pays ~13 s of torch + diffusers imports), but
        # its N and 4N runs are too small to resolve the marginal rate
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import CpuShare, PeakMemory, load_at_start, print_table, write_result

VARIANTS = ("single", "ray-2", "ray-1")
UNFUSED = "ray-2-unfused"  # --unfused: decode tasks and a separate VAE actor (the GPU clusters' shape) on 2 CPUs
# scenes = 2: the run of N already has a record group per actor of ray-2, so N and 4N start the same actors.
SMOKE = {"width": 1064, "height": 712, "shorts_per_long": 2, "scenes": 2, "crop_size": 128, "crops_per_image": 2,
         "repeats": 1}
FULL = {"width": 4256, "height": 2848, "shorts_per_long": 6, "scenes": 2, "crop_size": 512, "crops_per_image": 8,
        "repeats": 3}


# ----------------------------------------------------------------------------- data


def to_sensor_size(load, height: int, width: int) -> np.ndarray:
    """A photo centre-cropped to the sensor's aspect ratio and resized to it."""
    import cv2

    img = load()
    img = img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
    h, w = img.shape[:2]
    if w / h > width / height:
        cw = round(h * width / height)
        img = img[:, (w - cw) // 2:(w - cw) // 2 + cw]
    else:
        ch = round(w * height / width)
        img = img[(h - ch) // 2:(h - ch) // 2 + ch]
    return cv2.resize(np.ascontiguousarray(img), (width, height), interpolation=cv2.INTER_CUBIC)


def sensor_photos(count: int, height: int, width: int) -> list:
    """``count`` skimage photos (cycled, renamed) at the sensor's size, loaded when their scene is built."""
    from lowlight.data.samples import Photo, default_photos

    base = default_photos()
    return [Photo(f"{base[i % len(base)].name}-{i}", partial(to_sensor_size, base[i % len(base)].load, height, width))
            for i in range(count)]


def build_tree(work: Path, scenes: int, shorts: int, height: int, width: int) -> tuple[Path, Path]:
    """(root of N records, root of 4N records): the 4N tree is built (resumably) once; the N tree
    hard-links the first ``scenes`` scenes' files and lists only them."""
    from lowlight.data.samples import build_samples

    full = work / f"sid-{width}x{height}-k{shorts}-s{4 * scenes}"
    ratios = tuple(int(r) for r in np.geomspace(60, 300, shorts).round()) if shorts > 1 else (100,)
    summary = build_samples(full, photos=sensor_photos(4 * scenes, height, width), ratios=ratios,
                            max_side=max(height, width), progress=False)
    keep = list(summary["scenes"])[:scenes]
    small = work / f"{full.name}-first{scenes}"
    for lst in (full / "raw").glob("Sony_*_list.txt"):
        lines = [line for line in lst.read_text().splitlines() if Path(line.split()[0]).name[:5] in keep]
        for line in lines:
            for rel in line.split()[:2]:
                src, dst = full / "raw" / rel, small / "raw" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    os.link(src, dst)
        (small / "raw").mkdir(parents=True, exist_ok=True)
        (small / "raw" / lst.name).write_text("".join(f"{line}\n" for line in lines))
    return small / "raw", full / "raw"


# ----------------------------------------------------------------------------- one run (child process)


def make_config(spec: dict):
    from lowlight.config import DEFAULT_COLUMNS, load_config

    return load_config("sample_raw", [
        f"dataset.root={spec['root']}", f"model.pretrained={spec['pretrained']}", "model.vae=null",
        f"preprocess.output={spec['output']}", f"preprocess.crop_size={spec['crop_size']}",
        f"preprocess.crops_per_image={spec['crops_per_image']}", f"preprocess.columns={list(DEFAULT_COLUMNS)}",
        f"ray.num_cpus={spec['cpus']}", *(["preprocess.fuse_decode_encode=false"] if spec["variant"] == UNFUSED else [])])


def run_single(spec: dict) -> dict:
    """The pipeline's work as one plain loop in this process."""
    import cv2
    import torch

    from lowlight.data.decode import decode_group, group_by_target
    from lowlight.data.layouts import dataset_records
    from lowlight.data.parquet import VaeStamp, output_row_bytes, to_table, write_file
    from lowlight.data.preprocess import LatentEncoder, decode_options, resolve_columns
    from lowlight.models import sd

    torch.set_num_threads(spec["cpus"])
    cv2.setNumThreads(spec["cpus"])
    cfg = make_config(spec)
    pre = cfg.preprocess
    start = time.perf_counter()
    records = [r.to_dict() for r in dataset_records(cfg.dataset)]
    columns = resolve_columns(cfg, "raw")
    vae = sd.load_vae(cfg.model.pretrained)
    stamp = VaeStamp(sd.fingerprint(vae), float(vae.config.scaling_factor))
    encode = LatentEncoder(cfg.model, None, columns, stamp, pre.vae_batch_size)
    rows_per_file = max(1, pre.file_bytes // output_row_bytes(columns, pre.crop_size, "raw"))
    pending: list[dict[str, np.ndarray]] = []
    files = rows = 0

    def flush(upto: int) -> None:
        nonlocal pending, files
        merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        write_file(to_table({k: v[:upto] for k, v in merged.items()}, stamp),
                   str(Path(pre.output) / f"part-{files:05d}.parquet"), pre.row_group_bytes)
        files += 1
        rest = {k: v[upto:] for k, v in merged.items()}
        pending = [rest] if len(rest["id"]) else []

    for group in group_by_target(records):
        result = decode_group(group, **decode_options(cfg, columns))
        if result.num_rows:
            pending.append(encode(result.rows))
            rows += result.num_rows
        while pending and sum(len(p["id"]) for p in pending) >= rows_per_file:
            flush(rows_per_file)
    if pending:
        flush(sum(len(p["id"]) for p in pending))
    return {"seconds": time.perf_counter() - start, "rows": rows, "records": len(records)}


def run_ray(spec: dict) -> dict:
    import logging

    import ray

    from lowlight.data.preprocess import preprocess
    from lowlight.raycluster import ensure_ray

    cfg = make_config(spec)
    t = time.perf_counter()
    ensure_ray(cfg.ray)
    ray_init = time.perf_counter() - t
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    start = time.perf_counter()
    summary = preprocess(cfg)
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"seconds": seconds, "rows": summary.rows, "ray_init_seconds": ray_init}


def child(spec: dict) -> None:
    os.sched_setaffinity(0, spec["cores"])  # everything this run starts (Ray's processes too) inherits it
    result = run_single(spec) if spec["variant"] == "single" else run_ray(spec)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent


def launch(spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if spec["variant"] == "single":
        env["OMP_NUM_THREADS"] = str(spec["cpus"])  # LibRaw's OpenMP; Ray sets it per worker itself
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    start = time.perf_counter()
    with CpuShare() as cpu, PeakMemory() as memory:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, text=True, check=False,
                              capture_output=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{spec['variant']} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_seconds": time.perf_counter() - start, **cpu.record(),
            "peak_pss_mib": memory.peak_bytes / 2**20}


def read_rows(output: Path) -> pa.Table:
    table = pq.read_table(sorted(output.glob("part-*.parquet")))
    return table.sort_by("id")


def differences(reference: pa.Table, other: pa.Table, latent_rounding: bool = False) -> dict[str, str]:
    """Columns whose values differ (with the largest difference for tensors); empty when identical.
    With ``latent_rounding``, latents may differ by one float16 step of their magnitude (float32 results
    that differ in the last bits, rounded to float16), plus float16's smallest normal step near zero."""
    if reference.column("id").to_pylist() != other.column("id").to_pylist():
        return {"id": f"{reference.num_rows} vs {other.num_rows} rows, or other ids"}
    out = {}
    for name in reference.column_names:
        a, b = reference.column(name).combine_chunks(), other.column(name).combine_chunks()
        if isinstance(a.type, pa.FixedShapeTensorType):
            x, y = (v.to_numpy_ndarray().astype(np.float32) for v in (a, b))
            gap = np.abs(x - y)
            allowed = 2**-10 * np.maximum(np.abs(x), np.abs(y)) + 2**-14 if latent_rounding and name.startswith(
                "z_") else 0.0
            if np.any(gap > allowed):
                out[name] = f"max |diff| {gap.max():.3g}"
        elif not a.equals(b):
            out[name] = "values differ"
    return out


def summarise(runs: list[dict], variant: str) -> dict:
    """Medians at N and 4N, then the fit time = fixed + rows / rate and the marginal CPU per row."""
    mine = {size: [r for r in runs if r["variant"] == variant and r["size"] == size] for size in ("N", "4N")}
    med = {size: {k: statistics.median(r[k] for r in rs) for k in ("wall_seconds", "own_cpu_seconds", "peak_pss_mib")}
           for size, rs in mine.items()}
    rows = {size: rs[0]["rows"] for size, rs in mine.items()}
    extra_rows = rows["4N"] - rows["N"]
    rate = extra_rows / (med["4N"]["wall_seconds"] - med["N"]["wall_seconds"])
    return {"rows_N": rows["N"], "rows_4N": rows["4N"], "seconds_N": med["N"]["wall_seconds"],
            "seconds_4N": med["4N"]["wall_seconds"], "marginal_rows_per_s": rate,
            "fixed_s": med["N"]["wall_seconds"] - rows["N"] / rate,
            "cpu_s_per_row": (med["4N"]["own_cpu_seconds"] - med["N"]["own_cpu_seconds"]) / extra_rows,
            "peak_pss_mib_4N": med["4N"]["peak_pss_mib"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help=f"small, quick settings: {SMOKE}")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--shorts-per-long", type=int, help="short exposures (records) per long one (a record group)")
    p.add_argument("--scenes", type=int, help="scenes (record groups) in the run of N records; 4N uses 4x")
    p.add_argument("--crop-size", type=int)
    p.add_argument("--crops-per-image", type=int)
    p.add_argument("--repeats", type=int, help="accepted runs per variant and size (median)")
    p.add_argument("--threads", type=int, default=2, help="the single process's threads = the larger Ray's CPUs")
    p.add_argument("--pretrained", default="tiny", help="'tiny', a hub id or a local diffusers dir with vae/")
    p.add_argument("--max-other-share", type=float, default=0.05, help="discard runs disturbed more than this")
    p.add_argument("--max-attempts", type=int, default=3, help="runs per accepted run before giving up")
    p.add_argument("--keep-disturbed", action="store_true", help="keep disturbed runs (flagged) instead")
    p.add_argument("--unfused", action="store_true", help=f"also time '{UNFUSED}': decode tasks + a VAE actor")
    p.add_argument("--out", default="out/bench/preprocess", help="work folder (data, outputs)")
    p.add_argument("--result", help="JSON path (default: results/preprocess.json; smoke: <out>/smoke.json)")
    args = p.parse_args()
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    load = load_at_start()
    work = Path(args.out).resolve()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < args.threads:
        raise SystemExit(f"--threads {args.threads} needs as many cores; this process may use {len(cores)}")
    t = time.perf_counter()
    roots = dict(zip(("N", "4N"), build_tree(work, args.scenes, args.shorts_per_long, args.height, args.width),
                     strict=True))
    print(f"data ready in {time.perf_counter() - t:.0f} s: {roots['4N']}")
    variants = (*VARIANTS, UNFUSED) if args.unfused else VARIANTS
    budgets = {"single": args.threads, "ray-2": args.threads, "ray-1": 1, UNFUSED: args.threads}

    runs: list[dict] = []
    attempts: dict[tuple[str, str], int] = {}
    references: dict[str, pa.Table] = {}
    mismatches: dict[str, dict[str, str]] = {}
    for rep in range(args.repeats):
        for size, root in roots.items():
            for variant in variants:
                while True:
                    key = (variant, size)
                    attempts[key] = attempts.get(key, 0) + 1
                    output = work / "outputs" / f"{variant}-{size}"
                    shutil.rmtree(output, ignore_errors=True)
                    spec = {"variant": variant, "root": str(root), "output": str(output), "cpus": budgets[variant],
                            "cores": cores[:budgets[variant]], "pretrained": args.pretrained,
                            "crop_size": args.crop_size, "crops_per_image": args.crops_per_image}
                    run = {"variant": variant, "size": size, "repeat": rep, **launch(spec)}
                    run["disturbed"] = run["other_cpu_share"] > args.max_other_share
                    rows = read_rows(output)
                    if variant == "single":
                        references[size] = rows
                    diff = differences(references[size], rows, latent_rounding=variant == UNFUSED)
                    if diff:
                        mismatches[f"{variant}-{size}-{rep}"] = diff
                    print(f"[{rep}] {variant:6s} {size:2s}: {run['rows']} rows in {run['wall_seconds']:.1f} s "
                          f"({run['seconds']:.1f} s from listing to last file), "
                          f"{run['own_cpu_seconds']:.0f} CPU-s, peak {run['peak_pss_mib']:.0f} MiB, others used "
                          f"{run['other_cpu_share']:.0%} of the CPUs{' (disturbed)' if run['disturbed'] else ''}"
                          f"{'; outputs DIFFER: ' + str(diff) if diff else ''}", flush=True)
                    if not run["disturbed"] or args.keep_disturbed:
                        runs.append(run)
                        break
                    if attempts[key] >= args.max_attempts * args.repeats:
                        raise SystemExit(f"{variant} at {size}: every run was disturbed by other processes "
                                         f"(> {args.max_other_share:.0%} of the CPUs); run on a quiet machine "
                                         "or pass --keep-disturbed")

    stats = {v: summarise(runs, v) for v in variants}
    single, ray2, ray1 = (stats[v]["marginal_rows_per_s"] for v in VARIANTS)
    table = [[v, s["rows_N"], s["seconds_N"], s["rows_4N"], s["seconds_4N"], s["fixed_s"], s["marginal_rows_per_s"],
              s["cpu_s_per_row"], s["peak_pss_mib_4N"]] for v, s in stats.items()]
    disturbed = [r for r in runs if r["disturbed"]]
    print_table(["variant", "rows N", "s N", "rows 4N", "s 4N", "fixed s", "marginal rows/s", "CPU-s/row",
                 "peak MiB 4N"], table,
                f"{args.width}x{args.height} DNGs, {args.shorts_per_long} shorts per long, crop {args.crop_size}, "
                f"VAE {args.pretrained}; median of {args.repeats}"
                f"{f'; {len(disturbed)} disturbed runs kept' if disturbed else ''}")
    print(f"\nray-2 / single: {ray2 / single:.2f} (goal >= 0.9)   ray-2 / ray-1: {ray2 / ray1:.2f} (goal >= 1.7)")
    unresolved = [v for v, st in stats.items() if st["marginal_rows_per_s"] <= 0]
    if unresolved:
        print(f"warning: {unresolved}: the run of 4N took no longer than that of N; the runs are too small to "
              "separate the marginal rate from the fixed cost's noise (a smoke run; use the full settings)")
    if mismatches:
        print(f"OUTPUTS DIFFER from the single process: {mismatches}")
    path = Path(args.result) if args.result else (work / "smoke.json" if args.smoke else None)
    write_result("preprocess", {
        "ray_vs_single": ray2 / single,
        "scaling_2_vs_1": ray2 / ray1,
        "marginal_rows_per_s": {v: s["marginal_rows_per_s"] for v, s in stats.items()},
        "fixed_s": {v: s["fixed_s"] for v, s in stats.items()},
        "cpu_s_per_row": {v: s["cpu_s_per_row"] for v, s in stats.items()},
        "peak_pss_mib_4N": {v: s["peak_pss_mib_4N"] for v, s in stats.items()},
        "variants": stats,
        "marginal_resolved": not unresolved,
        "identical_outputs": not mismatches,
        "mismatches": mismatches,
        "settings": {k: getattr(args, k) for k in ("width", "height", "shorts_per_long", "scenes", "crop_size",
                                                   "crops_per_image", "repeats", "threads", "pretrained",
                                                   "max_other_share", "keep_disturbed", "smoke")},
        "records": {"N": args.scenes * args.shorts_per_long, "4N": 4 * args.scenes * args.shorts_per_long},
        "runs": runs,
        "disturbed_runs_kept": len(disturbed),
        "load_average_at_start": load,
    }, path)
    if mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
