"""The Ray Data pipeline: records -> decode + ISP -> crops -> VAE latents -> Parquet.

Records are cut into shards of ``records_per_shard``. Each shard runs as one streaming Ray
Data job into a staging folder and is then committed: its Parquet files are renamed into the
output, its rejected pairs are merged into ``rejected.jsonl``, and a marker is written last.
A re-run with the same config skips committed shards, so an interrupted run resumes and a
finished one is a no-op; crops are seeded per record, so the rows are the same every time.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from lowlight import storage
from lowlight.config import RAW_ONLY_COLUMNS, TENSOR_COLUMNS, Config, ConfigError, dump_config
from lowlight.data.decode import ISP_COLUMNS, RejectedInput, decode_record
from lowlight.data.layouts import load_records
from lowlight.data.parquet import META_COLUMNS, SCHEMA_VERSION, to_table
from lowlight.models import sd
from lowlight.raycluster import cluster_has_gpus, ensure_ray

MANIFEST = "_manifest.json"
REJECTED = "rejected.jsonl"


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
        if raw_cols and requested != list(TENSOR_COLUMNS):
            raise ConfigError(f"config key 'preprocess.columns': {raw_cols} need a RAW dataset, "
                              f"but layout '{cfg.dataset.layout}' is sRGB")
        requested = [c for c in requested if c not in RAW_ONLY_COLUMNS]
    return requested


def decode_or_reject(rec: dict, cfg: Config, columns: list[str], rejected_dir: str) -> list[dict]:
    """flat_map stage: one record -> its crop rows; a bad pair is written to the shard's rejected/ folder."""
    pre, ep = cfg.preprocess, cfg.storage.endpoint_url
    try:
        return decode_record(rec, columns, crop_size=pre.crop_size, per_image=pre.crops_per_image,
                             eval_crop=pre.eval_crop, seed=pre.seed, endpoint_url=ep)
    except RejectedInput as e:
        entry = {"id": rec["id"], "input": rec["input"], "target": rec["target"], "reason": str(e)}
        name = hashlib.sha256(rec["id"].encode()).hexdigest()[:16] + ".json"
        storage.atomic_write_text(storage.join(rejected_dir, name), json.dumps(entry), ep)
        return []


class VaeEncode:
    """Actor-pool stage: encode sRGB crops to scaled VAE latents (GPU when the actor has one)."""

    def __init__(self, cfg: Config, latents: list[str], keep: list[str], vae_id: str):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = sd.load_vae(cfg.model.pretrained, cfg.model.vae, cfg.storage.endpoint_url)
        if sd.fingerprint(self.vae) != vae_id:
            raise RuntimeError("the VAE loaded on this worker differs from the driver's: check model.pretrained/vae")
        self.vae.to(self.device)
        self.latents, self.keep, self.vae_id = latents, keep, vae_id

    def __call__(self, batch: dict[str, np.ndarray]):
        torch = self.torch
        with torch.no_grad(), torch.autocast(self.device, torch.bfloat16, enabled=self.device == "cuda"):
            for z in self.latents:
                x = torch.from_numpy(batch["srgb_" + z[2:]].astype(np.float32)).to(self.device) * 2 - 1
                dist = self.vae.encode(x).latent_dist
                batch[z] = (dist.mode() * self.vae.config.scaling_factor).float().cpu().numpy()
        return to_table({k: v for k, v in batch.items() if k in self.keep}, self.vae_id)


def _config_key(cfg: Config, records: list[dict], vae_id: str) -> str:
    material = {"dataset": cfg.dataset.model_dump(), "preprocess": cfg.preprocess.model_dump(
        exclude={"output", "vae_batch_size", "vae_actors", "decode_cpus"}), "vae_id": vae_id,
        "records": [(r["id"], r["input"], r["target"]) for r in records], "schema_version": SCHEMA_VERSION}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _check_manifest(cfg: Config, key: str, n_shards: int) -> None:
    out, ep = cfg.preprocess.output, cfg.storage.endpoint_url
    path = storage.join(out, MANIFEST)
    if storage.exists(path, ep):
        found = json.loads(storage.read_text(path, ep))
        if found["key"] != key:
            raise ConfigError(f"'{out}' already holds Parquet made from a different config, dataset or VAE "
                              f"(key {found['key']} != {key}); choose another preprocess.output or delete it")
        return
    storage.makedirs(out, ep)
    storage.atomic_write_text(path, json.dumps({"key": key, "shards": n_shards,
                                                "schema_version": SCHEMA_VERSION}), ep)
    storage.atomic_write_text(storage.join(out, "config.yaml"), dump_config(cfg), ep)


def _merge_rejected(out: str, entries: list[dict], ep: str | None) -> None:
    if not entries:
        return
    path = storage.join(out, REJECTED)
    lines = storage.read_text(path, ep).splitlines() if storage.exists(path, ep) else []
    known = {json.loads(line)["id"] for line in lines}
    lines += [json.dumps(e) for e in sorted(entries, key=lambda e: e["id"]) if e["id"] not in known]
    storage.atomic_write_text(path, "\n".join(lines) + "\n", ep)


def _run_shard(cfg: Config, shard: int, records: list[dict], columns: list[str], vae_id: str) -> dict:
    out, ep, pre = cfg.preprocess.output, cfg.storage.endpoint_url, cfg.preprocess
    staging = storage.join(out, "_staging", f"shard-{shard:05d}-{uuid.uuid4().hex[:8]}")
    rejected_dir = storage.join(staging, "rejected")
    ds = ray.data.from_items(records, override_num_blocks=len(records)).flat_map(
        decode_or_reject, fn_kwargs={"cfg": cfg, "columns": columns, "rejected_dir": rejected_dir},
        num_cpus=pre.decode_cpus)
    latents = [c for c in columns if c.startswith("z_")]
    keep = list(META_COLUMNS) + columns + list(ISP_COLUMNS)
    if latents:
        ds = ds.map_batches(VaeEncode, fn_constructor_kwargs={"cfg": cfg, "latents": latents, "keep": keep, "vae_id": vae_id},
                            batch_size=pre.vae_batch_size, compute=ActorPoolStrategy(size=pre.vae_actors),
                            num_gpus=1 if cluster_has_gpus() else 0)
    else:
        ds = ds.map_batches(lambda b: to_table({k: v for k, v in b.items() if k in keep}, vae_id),
                            batch_size=pre.vae_batch_size)
    fs, path = storage.arrow_filesystem(storage.join(staging, "parquet"), ep)
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=4096)
    return _commit_shard(out, shard, staging, ep)


def _commit_shard(out: str, shard: int, staging: str, ep: str | None) -> dict:
    """Parquet files first, then rejected entries, then the marker: a crash in between redoes the shard."""
    parts = storage.listdir(storage.join(staging, "parquet"), "*.parquet", ep)
    fs = storage.filesystem(out, ep)
    rows = size = 0
    for i, part in enumerate(parts):
        rows += pq.ParquetFile(fs.open(part, "rb")).metadata.num_rows
        size += fs.size(part)
        storage.move(part, storage.join(out, f"part-{shard:05d}-{i:03d}.parquet"), ep)
    rejected = [json.loads(storage.read_text(p, ep)) for p in storage.listdir(storage.join(staging, "rejected"),
                                                                               "*.json", ep)]
    _merge_rejected(out, rejected, ep)
    marker = {"shard": shard, "rows": rows, "bytes": size, "rejected": len(rejected), "files": len(parts)}
    storage.atomic_write_text(storage.join(out, "_shards", f"shard-{shard:05d}.json"), json.dumps(marker), ep)
    storage.remove(staging, ep)
    return marker


def _clear_partial(out: str, shard: int, ep: str | None) -> None:
    for stale in storage.listdir(out, f"part-{shard:05d}-*.parquet", ep):
        storage.remove(stale, ep)


def preprocess(cfg: Config) -> Summary:
    started = time.time()
    ensure_ray(cfg.ray)
    out, ep = cfg.preprocess.output, cfg.storage.endpoint_url
    records = [r.to_dict() for r in load_records(cfg.dataset.layout, cfg.dataset.root, splits=cfg.dataset.splits,
                                                  camera=cfg.dataset.camera, for_eval=True,
                                                  fs=storage.filesystem(cfg.dataset.root, ep))]
    if not records:
        raise ValueError(f"no records for layout '{cfg.dataset.layout}' under '{cfg.dataset.root}' "
                         f"(splits {cfg.dataset.splits})")
    columns = resolve_columns(cfg, records[0]["kind"])
    vae_id = sd.fingerprint(sd.load_vae(cfg.model.pretrained, cfg.model.vae, ep))
    n = cfg.preprocess.records_per_shard
    shards = [records[i:i + n] for i in range(0, len(records), n)]
    _check_manifest(cfg, _config_key(cfg, records, vae_id), len(shards))
    totals = {"rows": 0, "bytes": 0, "rejected": 0}
    done = skipped = 0
    for shard, shard_records in enumerate(shards):
        marker_path = storage.join(out, "_shards", f"shard-{shard:05d}.json")
        if storage.exists(marker_path, ep):
            marker = json.loads(storage.read_text(marker_path, ep))
            skipped += 1
        else:
            _clear_partial(out, shard, ep)
            marker = _run_shard(cfg, shard, shard_records, columns, vae_id)
            done += 1
        for k in totals:
            totals[k] += marker[k]
    storage.remove(storage.join(out, "_staging"), ep)
    return Summary(output=out, seconds=time.time() - started, shards_done=done, shards_skipped=skipped, **totals)
