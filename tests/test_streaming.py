"""Streaming training input: the workers' peak memory does not grow with the size of the split, each
worker streams a disjoint part of it per epoch (together the whole split), in the same order on every
run, and a stream restarted from a recorded position continues exactly as the uninterrupted one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.train
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from benchmarks.common import write_synthetic_parquet
from lowlight.config import ConfigError, TrainConfig, load_config
from lowlight.data.parquet import tensor_column
from lowlight.train import BatchStream, build_trainer, data_config, train, train_datasets

WORKERS = 2


def cfg_for(data: Path, runs: Path, name: str, *extra: str):
    return load_config(
        "sample_raw",
        [
            f"train.data={data}",
            f"train.storage_path={runs}",
            f"train.name={name}",
            "method.name=regression",
            "method.backbone=nafnet-1",
            f"train.num_workers={WORKERS}",
            "train.val_batches=1",
            "train.val_images=0",
            *extra,
        ],
    )


# 128 px crops: 4 x 64 x 64 float16 raw_in + raw_gt = 64 KiB a row; the 4x split is 8000 rows, 500 MiB.
SMALL_ROWS, ROW_MIB = 2000, 1 / 16


@pytest.mark.e2e
def test_worker_peak_memory_does_not_grow_with_the_split(ray_local, tmp_path):
    """Both runs take the same 20 steps of 16 rows per worker, so they differ only in the size of the split.
    Bound: the 4x run's peak private memory (heap and tensors; the object store's shared pages are not in it)
    exceeds the small run's by at most half of what a worker would add by keeping its part of the split as
    float16 (3000 more rows = 188 MiB at 4x, so 94 MiB; measured here: -1 to +44 MiB between runs and
    workers of 0.9-1.0 GB), and stays within the issue's 1.2x."""
    peaks = {}
    for scale in (1, 4):
        data = write_synthetic_parquet(
            tmp_path / f"x{scale}", SMALL_ROWS * scale, crop=128, rows_per_file=250, val_rows=16
        )
        result = train(
            cfg_for(
                data,
                tmp_path / "runs",
                f"x{scale}",
                "train.batch_size=16",
                "train.steps=20",
                "train.checkpoint_every=20",
                "train.val_every=20",
            )
        )
        peaks[scale] = max(result.metrics["worker_private_peak_mb"])
    kept_by_a_worker_mib = (4 - 1) * SMALL_ROWS * ROW_MIB / WORKERS
    assert peaks[4] - peaks[1] <= kept_by_a_worker_mib / 2, peaks
    assert peaks[4] <= 1.2 * peaks[1], peaks


def row_keys(raw_in) -> list[str]:
    """Rows named by their random content (float16 bytes; exact through the loader's float32)."""
    return [
        hashlib.sha1(torch.as_tensor(row).to(torch.float16).numpy().tobytes()).hexdigest() for row in raw_in
    ]


def _record_batches(config: dict) -> None:
    """Probe loop: the rows of each batch this worker streams from ``start``, into ``out/rank<r>.json``."""
    tc = TrainConfig(**config["train"])
    stream = BatchStream(ray.train.get_dataset_shard("train"), tc, torch.device("cpu"), *config["start"])
    batches = []
    for _ in range(config["batches"]):
        batch = next(stream)
        batches.append({"epoch": stream.epoch, "rows": row_keys(batch["raw_in"])})
    rank = ray.train.get_context().get_world_rank()
    (Path(config["out"]) / f"rank{rank}.json").write_text(json.dumps(batches))


def _stream(cfg, out: Path, start: tuple[int, int], batches: int) -> list[list[dict]]:
    out.mkdir()
    trainer = TorchTrainer(
        _record_batches,
        train_loop_config={
            "train": cfg.train.model_dump(),
            "start": start,
            "batches": batches,
            "out": str(out),
        },
        scaling_config=ScalingConfig(num_workers=WORKERS),
        run_config=RunConfig(storage_path=str(out), name="probe"),
        datasets=train_datasets(cfg, ["raw_in"]),
        dataset_config=data_config(),
    )
    trainer.fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORKERS)]


def test_workers_stream_disjoint_parts_in_a_repeatable_order(ray_local, tmp_path):
    # 96 train rows in 6 files of 16: 48 per worker, 6 batches of 8 per epoch; 3 epochs.
    data = write_synthetic_parquet(tmp_path / "data", 96, crop=32, rows_per_file=16, val_rows=16)
    table = pa.concat_tables(pq.read_table(p) for p in sorted(data.glob("part-*.parquet")))
    split_of = dict(
        zip(row_keys(tensor_column(table, "raw_in")), table.column("split").to_pylist(), strict=True)
    )
    train_rows = {key for key, split in split_of.items() if split == "train"}
    assert len(train_rows) == 96
    cfg = cfg_for(data, tmp_path, "probe", "train.batch_size=8", "train.shuffle_buffer=16", "train.seed=3")
    first = _stream(cfg, tmp_path / "first", (0, 0), 18)
    for epoch in range(3):
        parts = [{r for b in worker if b["epoch"] == epoch for r in b["rows"]} for worker in first]
        assert [len(p) for p in parts] == [48, 48], epoch
        assert not parts[0] & parts[1] and parts[0] | parts[1] == train_rows, epoch
    for worker in first:
        orders = [[r for b in worker if b["epoch"] == epoch for r in b["rows"]] for epoch in range(3)]
        assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]), "a new shuffle per epoch"
    # A new run started where a checkpoint after epoch 0 and 2 batches of epoch 1 would resume.
    resumed = _stream(cfg, tmp_path / "resumed", (1, 2), 10)
    for whole, tail in zip(first, resumed, strict=True):
        assert tail == whole[8:], "resumed stream differs from the uninterrupted one"


def test_refuses_a_cluster_that_leaves_ray_data_no_cpu(ray_local, tmp_path):
    data = write_synthetic_parquet(tmp_path / "data", 16, crop=32, rows_per_file=16, val_rows=4)
    total = int(ray_local.cluster_resources()["CPU"])
    with pytest.raises(ConfigError, match=r"Ray Data needs train.data_cpus=1 .* ray.num_cpus="):
        build_trainer(cfg_for(data, tmp_path, "x", f"train.num_workers={total}"))
    with pytest.raises(ConfigError, match=r"'train.num_workers' x 'train.cpus_per_worker'"):
        build_trainer(cfg_for(data, tmp_path, "x", "train.num_workers=1", f"train.cpus_per_worker={total}"))
    assert build_trainer(cfg_for(data, tmp_path, "x", f"train.num_workers={total - 1}"))
    assert build_trainer(cfg_for(data, tmp_path, "x", f"train.num_workers={total}", "train.data_cpus=0"))
