"""Shards of a preprocessing run: the resume unit, committed whole while one streaming job runs.

Record groups (the pairs that share a target) are packed in order into shards of about
``records_per_shard`` records; a group is never split. Write tasks put a shard's Parquet files in
a staging folder and report every (file, group, rows) they wrote; once every group of a shard has
all its rows written, the driver commits the shard: its files are renamed into the output, its
rejected pairs are merged into ``rejected.jsonl``, and its marker is written last. A crash in
between leaves no marker, and the next run redoes the shard.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from lowlight import storage
from lowlight.config import ConfigError
from lowlight.data.parquet import VaeStamp, to_table, write_file

MANIFEST = "_manifest.json"
REJECTED = "rejected.jsonl"
STAGING = "_staging"
INTERNAL = ("_shard", "_group", "_group_rows")  # routing columns, dropped before writing


@dataclass(frozen=True)
class Shard:
    index: int
    groups: tuple[int, ...]  # indices into the run's list of record groups
    records: int


def plan_shards(group_sizes: list[int], records_per_shard: int) -> list[Shard]:
    """Consecutive groups, up to ``records_per_shard`` records each (a larger group gets a shard alone)."""
    shards: list[Shard] = []
    current: list[int] = []
    count = 0
    for g, size in enumerate(group_sizes):
        if current and count + size > records_per_shard:
            shards.append(Shard(len(shards), tuple(current), count))
            current, count = [], 0
        current.append(g)
        count += size
    if current:
        shards.append(Shard(len(shards), tuple(current), count))
    return shards


def marker_url(out: str, shard: int) -> str:
    return storage.join(out, "_shards", f"shard-{shard:05d}.json")


def staged_file_url(staging: str, shard: int, name: str) -> str:
    return storage.join(staging, "parquet", f"shard-{shard:05d}", name)


def rejected_url(staging: str, shard: int, record_id: str) -> str:
    name = hashlib.sha256(record_id.encode()).hexdigest()[:16] + ".json"
    return storage.join(staging, "rejected", f"shard-{shard:05d}", name)


def write_parts(batch: dict[str, np.ndarray], staging: str, stamp: VaeStamp, row_group_bytes: int,
                endpoint_url: str | None) -> dict[str, np.ndarray]:
    """Write stage (a light module: its workers need no torch): one staged Parquet file per shard present
    in the batch; reports (file, group, rows) for ``ShardTracker``."""
    report: dict[str, list] = {k: [] for k in ("path", "shard", "group", "group_rows", "rows", "bytes")}
    for shard in np.unique(batch["_shard"]):
        mask = batch["_shard"] == shard
        piece = {k: v[mask] for k, v in batch.items()}
        table = to_table({k: v for k, v in piece.items() if k not in INTERNAL}, stamp)
        url = staged_file_url(staging, int(shard), f"{uuid.uuid4().hex}.parquet")
        size = write_file(table, url, row_group_bytes, endpoint_url)
        groups, first, counts = np.unique(piece["_group"], return_index=True, return_counts=True)
        for group, i, rows in zip(groups, first, counts, strict=True):
            for key, value in (("path", url), ("shard", int(shard)), ("group", int(group)),
                               ("group_rows", int(piece["_group_rows"][i])), ("rows", int(rows)), ("bytes", size)):
                report[key].append(value)
    return {k: np.array(v) for k, v in report.items()}


class ShardTracker:
    """Counts the rows written per group, from the write stage's reports, and says which shards are whole.

    A group's rows carry its total (``group_rows``), so a group is complete when that many have been
    written. A group whose every pair was rejected writes nothing and is only known complete when the
    job has ended, so its shard is committed then."""

    def __init__(self, shards: list[Shard]):
        self.groups = {s.index: s.groups for s in shards}
        self.expected: dict[int, int] = {}
        self.written: dict[int, int] = defaultdict(int)
        self.files: dict[int, dict[str, int]] = defaultdict(dict)  # shard -> staged file -> bytes
        self.done: set[int] = set()

    def add(self, report: dict[str, np.ndarray]) -> list[int]:
        """Take one batch of write reports; returns the shards that just became whole."""
        touched = set()
        for path, shard, group, group_rows, rows, size in zip(
                report["path"], report["shard"], report["group"], report["group_rows"], report["rows"],
                report["bytes"], strict=True):
            self.files[int(shard)][str(path)] = int(size)
            self.expected[int(group)] = int(group_rows)
            self.written[int(group)] += int(rows)
            touched.add(int(shard))
        whole = [s for s in sorted(touched) if s not in self.done and all(
            g in self.expected and self.written[g] == self.expected[g] for g in self.groups[s])]
        self.done.update(whole)
        return whole

    def remaining(self) -> list[int]:
        """After the job has ended: every shard not yet committed (all its groups are finished)."""
        short = {g: (self.written[g], n) for g, n in self.expected.items() if self.written[g] != n}
        if short:
            raise RuntimeError(f"groups ended with missing rows (written, expected): {short}")
        rest = [s for s in self.groups if s not in self.done]
        self.done.update(rest)
        return rest

    def rows(self, shard: int) -> int:
        return sum(self.written[g] for g in self.groups[shard])


def check_manifest(out: str, key: str, n_shards: int, schema_version: int, config_yaml: str,
                   endpoint_url: str | None) -> None:
    """Refuse an output made by another config; record this one's key on first use."""
    path = storage.join(out, MANIFEST)
    if storage.exists(path, endpoint_url):
        found = json.loads(storage.read_text(path, endpoint_url))
        if found["key"] != key:
            raise ConfigError(f"'{out}' already holds Parquet made from a different config, dataset or VAE "
                             f"(key {found['key']} != {key}); choose another preprocess.output or delete it")
        return
    storage.makedirs(out, endpoint_url)
    storage.atomic_write_text(path, json.dumps({"key": key, "shards": n_shards, "schema_version": schema_version}),
                              endpoint_url)
    storage.atomic_write_text(storage.join(out, "config.yaml"), config_yaml, endpoint_url)


def read_marker(out: str, shard: int, endpoint_url: str | None) -> dict | None:
    path = marker_url(out, shard)
    return json.loads(storage.read_text(path, endpoint_url)) if storage.exists(path, endpoint_url) else None


def clear_partial(out: str, shard: int, endpoint_url: str | None) -> None:
    """Files of a shard whose commit was interrupted (moved, but no marker): the shard is redone."""
    for stale in storage.listdir(out, f"part-{shard:05d}-*.parquet", endpoint_url):
        storage.remove(stale, endpoint_url)


def _merge_rejected(out: str, entries: list[dict], endpoint_url: str | None) -> None:
    if not entries:
        return
    path = storage.join(out, REJECTED)
    lines = storage.read_text(path, endpoint_url).splitlines() if storage.exists(path, endpoint_url) else []
    known = {json.loads(line)["id"] for line in lines}
    lines += [json.dumps(e) for e in sorted(entries, key=lambda e: e["id"]) if e["id"] not in known]
    storage.atomic_write_text(path, "\n".join(lines) + "\n", endpoint_url)


def commit_shard(out: str, shard: int, files: dict[str, int], rows: int, staging: str,
                 endpoint_url: str | None) -> dict:
    """Parquet files first, then rejected entries, then the marker: a crash in between redoes the shard."""
    for i, part in enumerate(sorted(files)):
        storage.move(part, storage.join(out, f"part-{shard:05d}-{i:03d}.parquet"), endpoint_url)
    rejected_dir = storage.join(staging, "rejected", f"shard-{shard:05d}")
    rejected = [json.loads(storage.read_text(p, endpoint_url))
                for p in storage.listdir(rejected_dir, "*.json", endpoint_url)]
    _merge_rejected(out, rejected, endpoint_url)
    marker = {"shard": shard, "rows": rows, "bytes": sum(files.values()), "rejected": len(rejected),
              "files": len(files)}
    storage.atomic_write_text(marker_url(out, shard), json.dumps(marker), endpoint_url)
    return marker
