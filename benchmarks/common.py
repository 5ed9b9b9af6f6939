"""Helpers shared by the benchmarks: machine facts, the benchmark sample set, tables and JSON results."""

from __future__ import annotations

import json
import os
import platform
import shutil
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np

if TYPE_CHECKING:
    from lowlight.config import Config

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BOOTSTRAP = 10_000  # resamples of a bootstrap interval
BASE_RATIOS = 3  # `lowlight samples` writes 3 short exposures per scene: 7 photos -> 21 records


def _first(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine_info() -> dict:
    """Cores, CPU model, RAM, accelerator and the versions that decide the speed."""
    import pyarrow
    import ray
    import torch

    mem_kb = _first("/proc/meminfo", "MemTotal")
    info = {
        "cpu_model": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def load_at_start() -> list[float]:
    """The 1/5/15-minute load averages; warns when other work shares the machine (the figures would be low)."""
    load = [round(x, 2) for x in os.getloadavg()]
    if load[0] > 0.5:
        print(f"warning: load average {load[0]} at start: other processes share the CPUs; figures will be low")
    return load


def sample_ratios(scale: int) -> tuple[int, ...]:
    """``3 * scale`` distinct exposure ratios between 60 and 300 (scale 1: the default 100/250/300)."""
    if scale < 1:
        raise ValueError(f"--records-scale must be >= 1, got {scale}")
    if scale == 1:
        return (100, 250, 300)
    ratios = tuple(int(r) for r in np.geomspace(60, 300, BASE_RATIOS * scale).round())
    if len(set(ratios)) != len(ratios):
        raise ValueError(f"--records-scale {scale} is too large: ratios between 60 and 300 repeat")
    return ratios


def build_bench_samples(root: Path, scale: int, max_side: int, extended_photos: str | Path | None = None) -> Path:
    """The embedded sample set with ``3 * scale`` short exposures per scene (21 * scale SID records).

    ``extended_photos``: the folder `lowlight photos` extracted (336 photos, split as its manifest
    says) instead of the 7 skimage.data ones. Every short exposure is its own noisy DNG at its own
    ratio, so each record is distinct work; the build resumes, so a second benchmark run reuses it.
    Returns the SID root (``raw/``).
    """
    from lowlight.data.samples import build_samples, photos_from_manifest

    photos = photos_from_manifest(extended_photos) if extended_photos else None
    out = root / f"samples-x{scale}-{max_side}{'-extended' if extended_photos else ''}"
    build_samples(out, photos=photos, ratios=sample_ratios(scale), max_side=max_side, progress=False)
    return out / "raw"


def write_synthetic_parquet(out: Path, train_rows: int, *, crop: int, rows_per_file: int, val_rows: int = 0,
                            seed: int = 0) -> Path:
    """Random rows in the Parquet contract's schema, as fast as numpy draws them: float16 packed-raw
    ``raw_in``/``raw_gt`` (4 x crop/2 x crop/2, in [0, 1)), ``ratio``, ``iso``, ``wb``, ``ccm``; ids ``00000000``,
    ``00000001``, ... (train rows first, then val). ``rows_per_file`` rows per part file (one row group each);
    crops of a record are adjacent, as preprocess writes them. Reused when ``out`` already holds the same rows."""
    import pyarrow.parquet as pq

    from lowlight.data.parquet import VaeStamp, to_table

    params = {"train_rows": train_rows, "val_rows": val_rows, "crop": crop, "rows_per_file": rows_per_file,
              "seed": seed}
    marker = out / "_SYNTHETIC.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    rng = np.random.default_rng(seed)
    total, side = train_rows + val_rows, crop // 2
    for part, start in enumerate(range(0, total, rows_per_file)):
        rows = np.arange(start, min(start + rows_per_file, total))
        n = len(rows)
        batch = {"id": np.char.zfill(rows.astype(str), 8), "record_id": np.char.zfill((rows // 8).astype(str), 8),
                 "split": np.where(rows < train_rows, "train", "val"), "ratio": np.full(n, 100.0),
                 "iso": np.full(n, 3200.0), "wb": np.tile(np.float32([2.0, 1.0, 1.5]), (n, 1)),
                 "ccm": np.tile(np.eye(3, dtype=np.float32), (n, 1, 1)),
                 "raw_in": rng.random((n, 4, side, side), dtype=np.float32).astype(np.float16),
                 "raw_gt": rng.random((n, 4, side, side), dtype=np.float32).astype(np.float16)}
        table = to_table(batch, VaeStamp(vae_id="none", scaling_factor=1.0))
        pq.write_table(table, out / f"part-{part:05d}.parquet", row_group_size=rows_per_file)
    marker.write_text(json.dumps(params))
    return out


def _busy_ticks() -> int:
    """Non-idle CPU time of the whole machine, in clock ticks (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4] - sum(fields[8:])  # guest time is already inside user


def _tree_ticks() -> dict[tuple[int, int], int]:
    """(pid, start time) -> user+system CPU ticks of this process and its live descendants (Ray's raylet,
    workers, actors)."""
    stats: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19]))  # ppid, ticks, start
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[(pid, stats[pid][2])] = stats[pid][1]
        todo += children.get(pid, [])
    return out


class CpuShare:
    """Measures how much of the machine's CPU other processes (not this one and its descendants) used
    during a block, so runs disturbed by other work on a shared machine can be told apart.

    Ray reaps exited workers without adding their CPU time to the raylet's, so descendants are
    polled every ``interval`` seconds and each one's last reading is kept (a process living less
    than ``interval`` is missed, which makes the figure for others an upper bound)."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._last.update(_tree_ticks())

    def __enter__(self) -> Self:
        self._first = _tree_ticks()
        self._last = dict(self._first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._t, self._busy = time.perf_counter(), _busy_ticks()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(_tree_ticks())
        hz = os.sysconf("SC_CLK_TCK")
        self.seconds = time.perf_counter() - self._t
        own = sum(t - self._first.get(key, 0) for key, t in self._last.items())
        self.own_cpu_s = own / hz
        self.other_cpu_s = max(0.0, (_busy_ticks() - self._busy) / hz - self.own_cpu_s)
        self.other_share = self.other_cpu_s / (self.seconds * (os.cpu_count() or 1))

    def record(self) -> dict:
        return {"own_cpu_seconds": round(self.own_cpu_s, 1), "other_cpu_seconds": round(self.other_cpu_s, 1),
                "other_cpu_share": round(self.other_share, 3)}


def _pss_bytes(pid: int) -> int:
    """Proportional set size of one process (shared pages split among the processes mapping them)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak of the summed PSS of this process and its descendants during a block (polled every
    ``interval`` seconds), so a Ray cluster's object store pages are counted once, not per mapping."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval

    def _sample(self) -> None:
        total = sum(_pss_bytes(pid) for pid, _ in _tree_ticks())
        self.peak_bytes = max(self.peak_bytes, total)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def timed(totals: dict[str, float], key: str):
    """Add the wall-clock seconds of the block to ``totals[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - start


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    """A plain fixed-width table (numbers right-aligned)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) or row[i] is None for row in rows) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    print("  ".join(h.rjust(w) if n else h.ljust(w) for h, w, n in zip(headers, widths, numeric)))
    print("  ".join("-" * w for w in widths))
    for r in text:
        print("  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric)))


def write_result(name: str, result: dict, path: str | Path | None = None) -> Path:
    """``benchmarks/results/<name>.json`` (or ``path``, e.g. a smoke run's scratch file) with the
    machine facts and a timestamp added."""
    path = Path(path) if path else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**result, "machine": machine_info(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


# ---------------------------------------------------------------- training runs and intervals

def finished_run(cfg: Config) -> dict | None:
    """A run of this name that already reached its last step (``--reuse-runs``): evaluated as it is.
    Its wall time is unknown, so only the in-run images/s (from its metrics) is reported."""
    final = Path(cfg.train.storage_path) / cfg.train.name / f"checkpoint_{cfg.train.steps:07d}"
    if not (final / "metrics.json").exists():
        return None
    metrics = json.loads((final / "metrics.json").read_text())
    return {"checkpoint": str(final), "seconds": None, "images_per_s": metrics.get("images_per_s")}


def train_run(cfg: Config, resume: bool) -> dict:
    """Train from scratch, or with ``resume`` continue an unfinished run of the same name from its
    latest checkpoint (its wall time then covers only this part, so it is not reported)."""
    from lowlight.train import train  # Ray Train: only for the benchmarks that train

    run_dir = Path(cfg.train.storage_path) / cfg.train.name
    resumed = resume and any(run_dir.glob("checkpoint_*"))
    if not resumed:
        shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = train(cfg)
    return {"checkpoint": result.checkpoint,
            "seconds": None if resumed else time.perf_counter() - start,
            "images_per_s": result.metrics.get("images_per_s")}


def trained_checkpoint(cfg: Config, args) -> str:
    """The checkpoint of the run ``cfg`` names: reused when it finished (``--reuse-runs``), else trained
    (resumed from its latest checkpoint with ``--reuse-runs``); prints how long it took."""
    reused = finished_run(cfg) if args.reuse_runs else None
    started = time.perf_counter()
    result = reused or train_run(cfg, resume=args.reuse_runs)
    print(f"  {cfg.train.name}: {'reused' if reused else f'{time.perf_counter() - started:.0f} s'}", flush=True)
    return result["checkpoint"]


def srgb_budget_overrides(args, sample_root: str) -> list[str]:
    """An sRGB method benchmark's shared settings (``add_budget_arguments``): data, fitted VAE, one budget."""
    work = Path(args.out).resolve()
    return [f"dataset.root={Path(sample_root).resolve()}", f"model.vae={Path(args.vae).resolve()}",
            f"preprocess.crop_size={args.crop_size}", f"preprocess.crops_per_image={args.crops_per_image}",
            f"ray.num_cpus={args.num_cpus}", f"train.storage_path={work / 'runs'}",
            f"train.num_workers={args.num_workers}", f"train.batch_size={args.batch_size}",
            f"train.steps={args.steps}", f"train.lr={args.lr}", f"train.warmup_steps={args.warmup_steps}",
            f"train.checkpoint_every={args.steps}", f"train.val_every={args.steps}", "train.val_batches=2",
            "train.val_images=4", f"train.seed={args.seed}"]


def bootstrap_ci(diffs: np.ndarray, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (BOOTSTRAP, len(diffs)))].mean(axis=1)
    return {"mean": float(diffs.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5)), "images": len(diffs)}


def add_budget_arguments(parser, *, eval_batch: int) -> None:
    """The training budget and evaluation options the method benchmarks share (one budget for every run)."""
    parser.add_argument("--vae", default="out/vae", help="the fitted tiny VAE (`make run` or `lowlight fit-vae`)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=3)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--crops-per-image", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--infer-steps", type=int, default=20)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--eval-batch", type=int, default=eval_batch)
    parser.add_argument("--reuse-runs", action="store_true")


def repo_relative(path: str | Path) -> str:
    """A path as results files record it: relative to the working directory (the checkout) when inside it."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)
