"""The Ray Data pipeline: record groups -> decode + ISP -> crops -> VAE latents -> Parquet, one streaming job.

Every pending shard of a run flows through one job, so actors start once:

    from_items: one row per record group (the pairs sharing a target), with its shard
      -> decode: one task per group (decode_cpus, decode_memory) -> VaeEncode actors, one GPU each
         or, on a CPU-only cluster, decode and encode fused in one actor pool (one actor per
         decode_cpus CPUs), which keeps the crops in the process that decoded them
      -> write: Parquet files of at most file_bytes, row groups of at most row_group_bytes, into staging
      -> the driver reads the write reports and commits each shard once it is whole (lowlight.data.shards)

A re-run with the same config skips committed shards, so an interrupted run resumes and a finished
one is a no-op; crops are seeded per record, so the rows are the same every time. Batches travel
as columns (numpy arrays stacked on axis 0), never as row dicts. Tasks and actors set torch and
OpenCV to as many threads as the CPUs they hold (Ray sets OMP_NUM_THREADS, which LibRaw follows).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

import cv2
import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from lowlight import storage
from lowlight.config import (
    DEFAULT_COLUMNS,
    HALF_RES_SOURCES,
    RAW_ONLY_COLUMNS,
    STAGE1_COLUMNS,
    Config,
    ConfigError,
    ModelConfig,
    dump_config,
)
from lowlight.data import shards as sh
from lowlight.data.decode import decode_groups, group_by_target, latent_source, task_cpus
from lowlight.data.layouts import dataset_records
from lowlight.data.parquet import SCHEMA_VERSION, VaeStamp, output_row_bytes
from lowlight.models import isp, sd
from lowlight.raycluster import ensure_ray

WRITE_TASKS = 2  # concurrent write tasks; they hold no CPU, so they run beside actors that hold them all


@dataclass
class Summary:
    output: str
    rows: int
    rejected: int
    bytes: int
    seconds: float
    shards_done: int
    shards_skipped: int

    def line(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        return (f"preprocess: {self.rows} rows, {self.rejected} rejected, {self.bytes / 2**20:.1f} MiB, "
                f"{self.seconds:.1f} s, {rate:.1f} rows/s -> {self.output} "
                f"({self.shards_done} shards written, {self.shards_skipped} already done)")


def resolve_columns(cfg: Config, kind: str) -> list[str]:
    requested = cfg.preprocess.columns
    if kind == "srgb":
        raw_cols = [c for c in requested if c in RAW_ONLY_COLUMNS]
        if raw_cols and requested != list(DEFAULT_COLUMNS):
            raise ConfigError(f"config key 'preprocess.columns': {raw_cols} need a RAW dataset, "
                              f"but layout '{cfg.dataset.layout}' is sRGB")
        requested = [c for c in requested if c not in RAW_ONLY_COLUMNS]
        if cfg.preprocess.latents_from != "srgb":
            raise ConfigError(f"config key 'preprocess.latents_from': '{cfg.preprocess.latents_from}' needs a RAW "
                              f"dataset, but layout '{cfg.dataset.layout}' is sRGB")
    if cfg.preprocess.pre_restore:
        requested = requested + [c for c in STAGE1_COLUMNS if c not in requested]
    return requested


def decode_options(cfg: Config, columns: list[str]) -> dict:
    """Keyword arguments of ``decode_group`` for this config."""
    pre = cfg.preprocess
    return {"columns": columns, "crop_size": pre.crop_size, "per_image": pre.crops_per_image,
            "eval_crop": pre.eval_crop, "seed": pre.seed, "latents_from": pre.latents_from,
            "endpoint_url": cfg.storage.endpoint_url}


def match_threads_to_cpus() -> None:
    """torch and OpenCV threads = the whole CPUs Ray gave this actor."""
    threads = task_cpus()
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)


class LatentEncoder:
    """Adds scaled VAE latents (``z_in``/``z_gt`` from ``<latents_from>_in``/``_gt``, ``z_pre`` from
    ``srgb_pre``) to columnar rows, ``batch_size`` crops at a time, after running the stage-1 restoration
    (``pre_restore``) on ``srgb_in`` when there is one; drops the image columns only decoded for them.
    Half-resolution sources (linear RGB, packed raw) are demosaiced x2 first, as DarkDiff's VAE sees them."""

    def __init__(self, model: ModelConfig, endpoint_url: str | None, columns: list[str], stamp: VaeStamp,
                 batch_size: int, pre_restore: str | None = None, latents_from: str = "srgb"):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = sd.load_vae(model.pretrained, model.vae, endpoint_url)
        if sd.fingerprint(self.vae) != stamp.vae_id:
            raise RuntimeError("the VAE loaded on this worker differs from the driver's: check model.pretrained/vae")
        self.vae.to(self.device)
        self.restorer = None
        if pre_restore:
            from lowlight.pre_restore import PreRestorer  # loads every method: only where stage 1 runs

            self.restorer = PreRestorer(pre_restore, endpoint_url, self.device)
        self.sources = {z: latent_source(z, latents_from) for z in columns if z.startswith("z_")}
        self.unrequested = set(self.sources.values()) - set(columns)
        self.scale, self.batch_size = stamp.scaling_factor, batch_size

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.restorer is not None:
            rows["srgb_pre"] = self.restorer.restore_rows(rows["srgb_in"], self.batch_size)
        cuda = self.device == "cuda"
        with torch.no_grad(), torch.autocast(self.device, torch.bfloat16, enabled=cuda):
            for z, source in self.sources.items():
                images = rows[source]
                parts = []
                for i in range(0, len(images), self.batch_size):
                    x = torch.from_numpy(images[i:i + self.batch_size].astype(np.float32)).to(self.device)
                    if source.split("_")[0] in HALF_RES_SOURCES:
                        x = isp.demosaic(x)
                    x = x * 2 - 1
                    latent = self.vae.encode(x).latent_dist.mode() * self.scale
                    parts.append(latent.float().cpu().numpy().astype(np.float16))
                rows[z] = np.concatenate(parts)
        return {k: v for k, v in rows.items() if k not in self.unrequested}


class VaeEncode:
    """Actor stage after the decode tasks: VAE-encode the decoded crops (GPU when the actor has one)."""

    def __init__(self, model: ModelConfig, endpoint_url: str | None, columns: list[str], stamp: VaeStamp,
                 batch_size: int, pre_restore: str | None = None, latents_from: str = "srgb"):
        match_threads_to_cpus()
        self.encode = LatentEncoder(model, endpoint_url, columns, stamp, batch_size, pre_restore, latents_from)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.encode(batch)


class DecodeEncode:
    """Fused actor stage for CPU-only clusters: decode a record group and encode its crops in one process."""

    def __init__(self, model: ModelConfig, options: dict, staging: str, stamp: VaeStamp, batch_size: int,
                 pre_restore: str | None = None):
        match_threads_to_cpus()
        self.encode = LatentEncoder(model, options["endpoint_url"], options["columns"], stamp, batch_size, pre_restore,
                                    options["latents_from"])
        self.options, self.staging = options, staging

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for rows in decode_groups(batch, self.options, self.staging):
            yield self.encode(rows)


def _config_key(cfg: Config, records: list[dict], vae_id: str) -> str:
    execution_only = {"output", "vae_batch_size", "vae_actors", "fuse_decode_encode", "decode_cpus",
                      "decode_memory", "file_bytes", "row_group_bytes"}
    material = {"dataset": cfg.dataset.model_dump(), "preprocess": cfg.preprocess.model_dump(exclude=execution_only),
                "vae_id": vae_id, "records": [(r["id"], r["input"], r["target"]) for r in records],
                "schema_version": SCHEMA_VERSION}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _pipeline(cfg: Config, items: list[dict], columns: list[str], kind: str, stamp: VaeStamp,
              staging: str) -> ray.data.Dataset:
    pre, ep = cfg.preprocess, cfg.storage.endpoint_url
    options = decode_options(cfg, columns)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1.0)
    fused = pre.fuse_decode_encode if pre.fuse_decode_encode is not None else gpus == 0
    has_latents = any(c.startswith("z_") for c in columns)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if has_latents and fused:
        actors = min(len(items), pre.vae_actors or max(1, int(cpus // pre.decode_cpus)))
        ds = ds.map_batches(DecodeEncode, fn_constructor_kwargs={
            "model": cfg.model, "options": options, "staging": staging, "stamp": stamp,
            "batch_size": pre.vae_batch_size, "pre_restore": pre.pre_restore}, batch_size=1,
            num_cpus=pre.decode_cpus, memory=pre.decode_memory,
            compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1))
    else:
        ds = ds.map_batches(decode_groups, fn_kwargs={"options": options, "staging": staging}, batch_size=1,
                            num_cpus=pre.decode_cpus, memory=pre.decode_memory)
        if has_latents:
            ds = ds.map_batches(VaeEncode, fn_constructor_kwargs={
                "model": cfg.model, "endpoint_url": ep, "columns": columns, "stamp": stamp,
                "batch_size": pre.vae_batch_size, "pre_restore": pre.pre_restore, "latents_from": pre.latents_from},
                batch_size=pre.vae_batch_size,
                compute=ActorPoolStrategy(size=pre.vae_actors or max(1, gpus)), num_gpus=1 if gpus else 0)
    rows_per_file = max(1, pre.file_bytes // output_row_bytes(columns, pre.crop_size, kind))
    return ds.map_batches(sh.write_parts, fn_kwargs={"staging": staging, "stamp": stamp,
                                                  "row_group_bytes": pre.row_group_bytes, "endpoint_url": ep},
                          batch_size=rows_per_file, num_cpus=0, compute=TaskPoolStrategy(size=WRITE_TASKS))


def preprocess(cfg: Config) -> Summary:
    started = time.time()
    ensure_ray(cfg.ray)
    out, ep = cfg.preprocess.output, cfg.storage.endpoint_url
    records = [r.to_dict() for r in dataset_records(cfg.dataset, fs=storage.filesystem(cfg.dataset.root, ep))]
    if not records:
        raise ValueError(f"no records for layout '{cfg.dataset.layout}' under '{cfg.dataset.root}' "
                         f"(splits {cfg.dataset.splits})")
    kind = records[0]["kind"]
    columns = resolve_columns(cfg, kind)
    if cfg.preprocess.pre_restore:  # a missing or unsuitable checkpoint fails here, before any task starts
        from lowlight.pre_restore import PreRestorer

        PreRestorer(cfg.preprocess.pre_restore, ep)
    vae = sd.load_vae(cfg.model.pretrained, cfg.model.vae, ep)
    stamp = VaeStamp(sd.fingerprint(vae), float(vae.config.scaling_factor))
    del vae
    groups = group_by_target(records)
    plan = sh.plan_shards([len(g) for g in groups], cfg.preprocess.records_per_shard)
    sh.check_manifest(out, _config_key(cfg, records, stamp.vae_id), len(plan), SCHEMA_VERSION, dump_config(cfg), ep)
    storage.remove(storage.join(out, sh.STAGING), ep)  # left by an interrupted run: its shards are redone
    markers = {s.index: sh.read_marker(out, s.index, ep) for s in plan}
    pending = [s for s in plan if markers[s.index] is None]
    for shard in pending:
        sh.clear_partial(out, shard.index, ep)
    if pending:
        staging = storage.join(out, sh.STAGING, uuid.uuid4().hex[:12])
        items = [{"shard": s.index, "group": g, "records": json.dumps(groups[g])} for s in pending for g in s.groups]
        tracker = sh.ShardTracker(pending)
        dataset = _pipeline(cfg, items, columns, kind, stamp, staging)
        # Closing the iterator stops the job (and frees its actors) even when a commit raises.
        with closing(iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))) as reports:
            for report in reports:
                for shard in tracker.add(report):
                    markers[shard] = sh.commit_shard(out, shard, tracker.files[shard], tracker.rows(shard),
                                                     staging, ep)
        for shard in tracker.remaining():
            markers[shard] = sh.commit_shard(out, shard, tracker.files[shard], tracker.rows(shard), staging, ep)
        storage.remove(storage.join(out, sh.STAGING), ep)
    totals = {k: sum(m[k] for m in markers.values()) for k in ("rows", "bytes", "rejected")}
    return Summary(output=out, seconds=time.time() - started, shards_done=len(pending),
                   shards_skipped=len(plan) - len(pending), **totals)
