"""Streaming training input at scale: memory against dataset size, ingest against training, Ray Train
against a plain PyTorch loop.

Data: synthetic Parquet in the project's schema (``common.write_synthetic_parquet``): random float16
``raw_in``/``raw_gt`` of SID's training patch (``--crop`` 1024 sRGB px = 4 x 512 x 512 packed raw,
4 MiB a row), ``--rows`` N training rows and ``--scale`` x N, files of ``--rows-per-file`` rows (128 MiB).
The defaults make 1.07 GB and 4.3 GB; both are kept under ``--work`` and reused.

Runs, each on a local Ray cluster of ``workers x cpus_per_worker + 1`` logical CPUs (Ray Data gets one):

* ``ingest N``, ``ingest 4N``: Ray Train workers stream one epoch of their part with the train loop's own
  ``BatchStream`` (float32 torch batches, local shuffle) and do nothing else: rows/s, peak memory.
* ``train N``, ``train 4N``: ``lowlight.train.train`` (the real loop), regression with the ``unet`` backbone
  in the raw domain, ``--steps`` steps; rows/s over the steps after the loop's last report (every ``--warmup``
  steps) before the end.
* ``plain``: one process, the same model, global batch (workers x batch size), optimizer and torch threads
  (workers x cpus per worker), fed by a ``torch.utils.data.DataLoader`` (1 loader process) over the same
  Parquet read with pyarrow, as the papers' released code trains; timed over the same steps.
* ``plain 1 thread``: the same with one thread and one worker's batch: Ray Train's rows/s over ``workers`` x
  this is its scaling efficiency (``ray_train_vs_one_thread_per_worker``). Two OpenMP threads collapse when
  other processes share the cores (DESIGN.md), so ``ray_train_vs_plain`` needs a quiet machine.

Peak memory per worker: resident (VmHWM; counts the object store's shared pages the worker maps) and
private (anonymous pages: heap and tensors, sampled every step). The driver's peaks are sampled every
0.2 s during each Ray run. ``rss_ratio_4x`` compares the workers' private peaks of the train runs.
Goals (issue 8): ``rss_ratio_4x`` <= 1.2, ``ingest_rows_per_s`` >= 3 x ``train_rows_per_s``,
``ray_train_vs_plain`` >= 0.9.

    # full run: 1.07 + 4.3 GB of Parquet in out/bench/ingest (kept), results/ingest.json
    .venv/bin/python benchmarks/ingest.py
    # smoke run
    .venv/bin/python benchmarks/ingest.py --rows 24 --crop 256 --rows-per-file 8 --steps 6 --warmup 3 \
        --json /tmp/ingest.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from common import CpuShare, load_at_start, print_table, write_result, write_synthetic_parquet
from ray.data import DataContext
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lowlight.config import Config, RayConfig, TrainConfig, load_config
from lowlight.methods import build_method
from lowlight.raycluster import ensure_ray
from lowlight.train import (
    BatchStream,
    MemoryPeak,
    data_config,
    preflight,
    step_generator,
    train,
    train_datasets,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256, help="N training rows (default: 1.07 GB at --crop 1024)")
    p.add_argument("--scale", type=int, default=4, help="the large set has scale x N rows")
    p.add_argument("--crop", type=int, default=1024, help="sRGB px; packed raw is crop/2 (SID: 512)")
    p.add_argument("--rows-per-file", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="the loop reports every --warmup steps; the steps after "
        "the last report before the end are timed",
    )
    p.add_argument("--batch-size", type=int, default=1, help="per worker (SID: 1)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument(
        "--shuffle-buffer", type=int, default=16, help="rows in each worker's local shuffle buffer"
    )
    p.add_argument("--work", type=Path, default=Path("out/bench/ingest"), help="Parquet and runs (reused)")
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/results/ingest.json")
    args = p.parse_args()
    if not 0 < args.warmup < args.steps:
        p.error("--warmup must be between 0 and --steps")
    return args


def bench_config(args, data: Path, name: str) -> Config:
    return load_config(
        None,
        [
            f"train.data={data}",
            f"train.storage_path={(args.work / 'runs').resolve()}",
            f"train.name={name}",
            "method.name=regression",
            "method.domain=raw",
            "method.backbone=unet",
            f"train.batch_size={args.batch_size}",
            f"train.num_workers={args.workers}",
            f"train.cpus_per_worker={args.cpus_per_worker}",
            f"train.shuffle_buffer={args.shuffle_buffer}",
            f"train.steps={args.steps}",
            f"train.checkpoint_every={args.warmup}",
            f"train.val_every={args.steps}",
            "train.val_batches=1",
            "train.val_images=0",
            "train.num_to_keep=1",
            "train.precision=fp32",
        ],
    )


class DriverMemory:
    """Peak resident and private memory of this process, sampled every 0.2 s during a block."""

    def __enter__(self):
        self.peak = MemoryPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak.sample(resident_key="VmRSS")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- ingest only


def ingest_loop(config: dict) -> None:
    """One epoch of this worker's part, batched and converted as the train loop does, nothing else; timed
    from the first batch (the pipeline's start-up is reported apart)."""
    import torch.distributed as dist

    tc = TrainConfig(**config["train"])
    memory = MemoryPeak()
    stream = BatchStream(ray.train.get_dataset_shard("train"), tc, torch.device("cpu"))
    opened = time.perf_counter()
    next(stream)
    start = time.perf_counter()
    for _ in range(config["batches"] - 1):
        next(stream)
        memory.sample()
    mine = {
        "rows": (config["batches"] - 1) * tc.batch_size,
        "seconds": time.perf_counter() - start,
        "first_batch_s": start - opened,
        "rss_mb": memory.rss_mb,
        "private_mb": memory.private_mb,
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            ray.train.report({"workers": everyone}, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report({})


def ingest(args, cfg: Config, rows: int, name: str) -> dict:
    columns = preflight(cfg)["columns"]
    batches = rows // args.workers // args.batch_size  # streaming_split(equal=True), then full batches
    trainer = TorchTrainer(
        ingest_loop,
        train_loop_config={"train": cfg.train.model_dump(), "batches": batches},
        scaling_config=ScalingConfig(
            num_workers=args.workers, resources_per_worker={"CPU": args.cpus_per_worker}
        ),
        run_config=RunConfig(storage_path=str((args.work / "runs").resolve()), name=name),
        datasets=train_datasets(cfg, columns),
        dataset_config=data_config(),
    )
    with DriverMemory() as driver, CpuShare() as cpu:
        result = trainer.fit()
    workers = result.metrics["workers"]
    rows, seconds = sum(w["rows"] for w in workers), max(w["seconds"] for w in workers)
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 2),
        "first_batch_s": round(max(w["first_batch_s"] for w in workers), 2),
        "worker_rss_peak_mb": [round(w["rss_mb"]) for w in workers],
        "worker_private_peak_mb": [round(w["private_mb"]) for w in workers],
        "driver_rss_peak_mb": round(driver.peak.rss_mb),
        "driver_private_peak_mb": round(driver.peak.private_mb),
        **cpu.record(),
    }


# ----------------------------------------------------------------------------- Ray Train and the plain loop


def timed_steps(args) -> int:
    """The loop reports (restarting its rate) every --warmup steps: its final rate covers the steps since."""
    return args.steps - (args.steps - 1) // args.warmup * args.warmup


def ray_train(args, cfg: Config) -> dict:
    with DriverMemory() as driver, CpuShare() as cpu:
        result = train(cfg)
    m = result.metrics
    return {
        "rows_per_s": round(m["images_per_s"], 3),
        "steps_per_s": round(m["images_per_s"] / (args.batch_size * args.workers), 4),
        "timed_steps": timed_steps(args),
        "worker_rss_peak_mb": [round(v) for v in m["worker_rss_peak_mb"]],
        "worker_private_peak_mb": [round(v) for v in m["worker_private_peak_mb"]],
        "driver_rss_peak_mb": round(driver.peak.rss_mb),
        "driver_private_peak_mb": round(driver.peak.private_mb),
        **cpu.record(),
    }


class ParquetRows(torch.utils.data.IterableDataset):
    """The training rows of a folder of Parquet files, files in a seeded order, read a row group at a time."""

    def __init__(self, folder: Path, columns: list[str], seed: int):
        self.files, self.columns, self.seed = sorted(folder.glob("part-*.parquet")), columns, seed

    def __iter__(self):
        for index in np.random.default_rng(self.seed).permutation(len(self.files)):
            parquet = pq.ParquetFile(self.files[index])
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=["split", *self.columns])
                table = table.filter(pc.equal(table.column("split"), "train"))
                arrays = {c: self._numpy(table.column(c)) for c in self.columns}
                for i in range(table.num_rows):
                    yield {c: torch.as_tensor(a[i]) for c, a in arrays.items()}

    @staticmethod
    def _numpy(column: pa.ChunkedArray) -> np.ndarray:
        column = column.combine_chunks()
        values = (
            column.to_numpy_ndarray()
            if isinstance(column.type, pa.FixedShapeTensorType)
            else column.to_numpy()
        )
        return values.astype(np.float32)


def plain_loop(args, cfg: Config, data: Path, threads: int, batch_size: int) -> dict:
    """The same model and optimizer in one process of ``threads`` torch threads, fed by a DataLoader."""
    tc = cfg.train
    torch.set_num_threads(threads)
    torch.manual_seed(tc.seed)
    info = preflight(cfg)
    method = build_method(cfg.method, info["channels"], cfg.model)
    params = list(method.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    loader = torch.utils.data.DataLoader(
        ParquetRows(data, info["columns"], tc.seed),
        batch_size=batch_size,
        num_workers=1,
        drop_last=True,
        persistent_workers=True,
    )
    batches, timed = iter(loader), timed_steps(args)
    with CpuShare() as cpu:
        for step in range(args.steps):
            if step == args.steps - timed:
                start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            loss, _ = method(batch, step_generator(tc.seed, 0, step, 0, torch.device("cpu")))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
        seconds = time.perf_counter() - start
    return {
        "steps_per_s": round(timed / seconds, 4),
        "timed_steps": timed,
        "rows_per_s": round(timed * batch_size / seconds, 3),
        "torch_threads": threads,
        "batch_size": batch_size,
        **cpu.record(),
    }


# ----------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    load = load_at_start()
    DataContext.get_current().enable_progress_bars = False  # the datasets copy it: no bars from the workers
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = {"N": args.rows, f"{args.scale}N": args.rows * args.scale}
    data, disk_gb = {}, {}
    for label, rows in sizes.items():
        folder = args.work / f"parquet-{rows}x{args.crop}"
        print(f"Parquet {label}: {rows} rows of {args.crop} px crops -> {folder}")
        data[label] = write_synthetic_parquet(
            folder, rows, crop=args.crop, rows_per_file=args.rows_per_file, val_rows=args.batch_size
        )
        disk_gb[label] = round(sum(p.stat().st_size for p in folder.glob("part-*.parquet")) / 1e9, 2)
    ensure_ray(RayConfig(num_cpus=args.workers * args.cpus_per_worker + 1))
    try:
        runs = {}
        for label, folder in data.items():
            print(f"ingest {label} ...")
            runs[f"ingest {label}"] = ingest(
                args, bench_config(args, folder, "ingest"), sizes[label], f"ingest-{label}-{time.time_ns()}"
            )
        for label, folder in data.items():
            print(f"train {label} ...")
            runs[f"train {label}"] = ray_train(
                args, bench_config(args, folder, f"train-{label}-{time.time_ns()}")
            )
    finally:
        ray.shutdown()
    print("plain loop ...")
    plain_cfg = bench_config(args, data["N"], "plain")
    cores = args.workers * args.cpus_per_worker
    runs["plain"] = plain_loop(args, plain_cfg, data["N"], cores, args.batch_size * args.workers)
    # One worker's share (1 thread, its batch): what perfect scaling of the Ray workers would reach.
    runs["plain 1 thread"] = plain_loop(args, plain_cfg, data["N"], 1, args.batch_size)
    large = f"{args.scale}N"
    rss_ratio = max(runs[f"train {large}"]["worker_private_peak_mb"]) / max(
        runs["train N"]["worker_private_peak_mb"]
    )
    summary = {
        "rss_ratio_4x": round(rss_ratio, 3),
        "rss_total_ratio_4x": round(
            max(runs[f"train {large}"]["worker_rss_peak_mb"]) / max(runs["train N"]["worker_rss_peak_mb"]), 3
        ),
        "ingest_rows_per_s": runs["ingest N"]["rows_per_s"],
        "train_rows_per_s": runs["train N"]["rows_per_s"],
        "ray_train_vs_plain": round(runs["train N"]["steps_per_s"] / runs["plain"]["steps_per_s"], 3),
        "ray_train_vs_one_thread_per_worker": round(
            runs["train N"]["rows_per_s"] / (args.workers * runs["plain 1 thread"]["rows_per_s"]), 3
        ),
    }
    summary["ingest_vs_train"] = round(summary["ingest_rows_per_s"] / summary["train_rows_per_s"], 2)
    print_table(
        ["run", "rows/s", "steps/s", "worker RSS MB", "worker private MB", "driver RSS MB", "other CPU"],
        [
            (
                name,
                r["rows_per_s"],
                r.get("steps_per_s"),
                "/".join(map(str, r.get("worker_rss_peak_mb", []))),
                "/".join(map(str, r.get("worker_private_peak_mb", []))),
                r.get("driver_rss_peak_mb"),
                r["other_cpu_share"],
            )
            for name, r in runs.items()
        ],
        title=f"ingest: N = {args.rows} rows ({disk_gb['N']} GB), {large} ({disk_gb[large]} GB), "
        f"crop {args.crop}, batch {args.batch_size} x {args.workers} workers",
    )
    print_table(
        ["figure", "value", "goal"],
        [
            ("rss_ratio_4x (private)", summary["rss_ratio_4x"], "<= 1.2"),
            ("rss_total_ratio_4x (resident)", summary["rss_total_ratio_4x"], "-"),
            ("ingest / train rows/s", summary["ingest_vs_train"], ">= 3"),
            ("ray_train_vs_plain", summary["ray_train_vs_plain"], ">= 0.9"),
            ("ray_train_vs_one_thread_per_worker", summary["ray_train_vs_one_thread_per_worker"], "-"),
        ],
    )
    write_result(
        "ingest",
        {
            **summary,
            "runs": runs,
            "disk_gb": disk_gb,
            "load_at_start": load,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpu_count": os.cpu_count(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
