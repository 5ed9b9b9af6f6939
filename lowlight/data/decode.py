"""A record group (the input/target pairs that share one target) -> columnar crop rows.

Runs inside Ray Data tasks or actors, one group at a time. The target is fetched, decoded and
rendered once for its whole group (a SID long exposure serves about twelve short ones), each
input once. A bad pair is rejected with a reason that names the file; the group's other pairs
carry on, and an unreadable target rejects every pair of its group.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import ray

from lowlight import storage
from lowlight.data import shards
from lowlight.data.images import decode_image
from lowlight.data.parquet import ISP_COLUMNS
from lowlight.data.raw import RawFrame, linear_rgb, pack_bayer, packed_black_level, read_raw, render_srgb

HALF_RES = ("raw_in", "raw_gt", "lrgb_in", "lrgb_gt")  # packed Bayer / linear RGB: half the sRGB resolution


class RejectedInput(Exception):
    """An input pair that cannot be used; the message is the reason recorded in rejected.jsonl."""


@dataclass
class GroupResult:
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # column -> values stacked on axis 0
    rejected: list[dict] = field(default_factory=list)  # {"id", "input", "target", "reason"}

    @property
    def num_rows(self) -> int:
        return len(self.rows["id"]) if self.rows else 0


@dataclass
class _Target:
    arrays: dict[str, np.ndarray]  # the requested target columns, uncropped
    shape: tuple[int, ...]  # Bayer (RAW) or image (sRGB) shape every input must match
    isp: dict[str, np.ndarray] = field(default_factory=dict)  # the target's as-shot white balance and CCM


def group_by_target(records: list[dict]) -> list[list[dict]]:
    """Records grouped by their target file, groups and members in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["target"], []).append(rec)
    return list(groups.values())


def latent_source(latent: str, latents_from: str = "srgb") -> str:
    """The image column a latent column encodes: z_in/z_gt the ``latents_from`` kind's input/target,
    z_pre always the stage-1 restoration's sRGB."""
    suffix = latent[2:]
    return "srgb_pre" if suffix == "pre" else f"{latents_from}_{suffix}"


def needed_arrays(columns: list[str], latents_from: str = "srgb") -> set[str]:
    """Arrays to decode: the requested ones plus the images that latents are encoded from; the stage-1
    restoration's output (srgb_pre) is made from srgb_in after decoding."""
    need = {c for c in columns if not c.startswith("z_")}
    need |= {latent_source(c, latents_from) for c in columns if c.startswith("z_")}
    if "srgb_pre" in need:
        need = (need - {"srgb_pre"}) | {"srgb_in"}
    return need


def _read(url: str, endpoint_url: str | None) -> bytes:
    try:
        return storage.read_bytes(url, endpoint_url)
    except (OSError, ValueError) as e:
        raise RejectedInput(f"cannot read '{url}': {type(e).__name__}: {e}") from e


def _frame(data: bytes, url: str) -> RawFrame:
    try:
        return read_raw(data)
    except Exception as e:  # LibRaw raises many types for truncated/foreign files
        raise RejectedInput(f"'{url}' is not a readable RAW file: {type(e).__name__}: {e}") from e


def _raw_target(url: str, need: set[str], endpoint_url: str | None) -> _Target:
    data = _read(url, endpoint_url)
    frame = _frame(data, url)
    arrays = {}
    # Kept for the whole group, so held at the output's float16 (crops of it round the same way).
    if "raw_gt" in need:
        arrays["raw_gt"] = pack_bayer(frame).astype(np.float16)
    if "srgb_gt" in need:
        arrays["srgb_gt"] = render_srgb(data).transpose(2, 0, 1).astype(np.float16)
    if "lrgb_gt" in need:
        arrays["lrgb_gt"] = linear_rgb(pack_bayer(frame), frame.camera_wb).astype(np.float16)
    # A raw prediction is a prediction of this frame, so it is rendered with this frame's WB and CCM, as
    # srgb_gt is; the input's own (its as-shot WB can differ) are what inference on the input alone uses.
    isp = {"wb": frame.camera_wb.astype(np.float32), "ccm": frame.cam_to_srgb.astype(np.float32)}
    return _Target(arrays, frame.bayer.shape, isp)


def _raw_input(rec: dict, need: set[str], target: _Target, endpoint_url: str | None) -> dict[str, np.ndarray]:
    data = _read(rec["input"], endpoint_url)
    frame = _frame(data, rec["input"])
    if frame.bayer.shape != target.shape:
        raise RejectedInput(f"size mismatch: '{rec['input']}' is {frame.bayer.shape} "
                            f"but '{rec['target']}' is {target.shape}")
    out: dict[str, np.ndarray] = {}
    if need & {"raw_in", "lrgb_in"}:
        packed = pack_bayer(frame)
        if "raw_in" in need:
            out["raw_in"] = packed
        if "lrgb_in" in need:
            out["lrgb_in"] = linear_rgb(packed, frame.camera_wb, rec["ratio"])
    if "srgb_in" in need:
        out["srgb_in"] = render_srgb(data, ratio=rec["ratio"]).transpose(2, 0, 1)
    # The input's levels, so raw outputs can be re-noised in the input's ADU; WB and CCM come from the target.
    out["black_level"] = packed_black_level(frame)
    out["white_level"] = np.float64(frame.white_level)
    return out


def _image(url: str, endpoint_url: str | None) -> np.ndarray:
    try:
        return decode_image(_read(url, endpoint_url), url).transpose(2, 0, 1)
    except ValueError as e:
        raise RejectedInput(str(e)) from e


def _srgb_target(url: str, need: set[str], endpoint_url: str | None) -> _Target:
    image = _image(url, endpoint_url)
    return _Target({"srgb_gt": image} if "srgb_gt" in need else {}, image.shape)


def _srgb_input(rec: dict, need: set[str], target: _Target, endpoint_url: str | None) -> dict[str, np.ndarray]:
    image = _image(rec["input"], endpoint_url)
    if image.shape != target.shape:
        raise RejectedInput(f"size mismatch: '{rec['input']}' is {image.shape[1:]} "
                            f"but '{rec['target']}' is {target.shape[1:]}")
    return {"srgb_in": image} if "srgb_in" in need else {}


def full_resolution(arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    """Common sRGB-resolution size (LibRaw may trim a few pixels relative to the Bayer array)."""
    sizes = [(a.shape[1] * (2 if k in HALF_RES else 1), a.shape[2] * (2 if k in HALF_RES else 1))
             for k, a in arrays.items()]
    return min(s[0] for s in sizes), min(s[1] for s in sizes)


def record_seed(seed: int, record_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "little")


def crop_boxes(height: int, width: int, size: int, *, train: bool, per_image: int, eval_crop: str,
               seed: int) -> list[tuple[int, int]]:
    """Top-left corners (even, so Bayer cells stay whole) of the crops taken from one image."""
    if train:
        rng = np.random.default_rng(seed)
        ys = rng.integers(0, (height - size) // 2 + 1, per_image) * 2
        xs = rng.integers(0, (width - size) // 2 + 1, per_image) * 2
        return [(int(y), int(x)) for y, x in zip(ys, xs)]
    if eval_crop == "center":
        return [((height - size) // 4 * 2, (width - size) // 4 * 2)]
    return [(y, x) for y in range(0, height - size + 1, size) for x in range(0, width - size + 1, size)]


def _crops(rec: dict, images: dict[str, np.ndarray], isp: dict[str, np.ndarray], *, crop_size: int,
           per_image: int, eval_crop: str, seed: int) -> dict[str, np.ndarray]:
    """One record's crop rows, columnar."""
    height, width = full_resolution(images)
    if min(height, width) < crop_size:
        raise RejectedInput(f"'{rec['input']}' is {height}x{width}, smaller than the {crop_size}px crop")
    boxes = crop_boxes(height, width, crop_size, train=rec["split"] == "train", per_image=per_image,
                       eval_crop=eval_crop, seed=record_seed(seed, rec["id"]))
    n = len(boxes)
    rows: dict[str, np.ndarray] = {
        "id": np.array([f"{rec['id']}#{k}" for k in range(n)], object),
        **{k: np.array([rec[k]] * n, object) for k in ("split", "dataset", "camera")},
        "record_id": np.array([rec["id"]] * n, object),
        **{k: np.full(n, float(rec[k])) for k in ("iso", "exposure_in", "exposure_gt", "ratio")},
        "height": np.full(n, height, np.int64), "width": np.full(n, width, np.int64),
        "crop_y": np.array([y for y, _ in boxes], np.int64), "crop_x": np.array([x for _, x in boxes], np.int64),
    }
    for name, arr in images.items():
        s = 2 if name in HALF_RES else 1
        rows[name] = np.stack([arr[:, y // s:(y + crop_size) // s, x // s:(x + crop_size) // s]
                               for y, x in boxes]).astype(np.float16)
    for name, value in isp.items():
        rows[name] = np.repeat(np.asarray(value)[None], n, axis=0)
    return rows


def _rejection(rec: dict, error: RejectedInput) -> dict:
    return {"id": rec["id"], "input": rec["input"], "target": rec["target"], "reason": str(error)}


def decode_group(records: list[dict], columns: list[str], *, crop_size: int, per_image: int, eval_crop: str,
                 seed: int, latents_from: str = "srgb", endpoint_url: str | None = None) -> GroupResult:
    """The crop rows of every pair of one record group (all with the same target), and its rejected pairs."""
    need = needed_arrays(columns, latents_from)
    raw = records[0]["kind"] == "raw"
    try:
        target = (_raw_target if raw else _srgb_target)(records[0]["target"], need, endpoint_url)
    except RejectedInput as e:
        return GroupResult(rejected=[_rejection(rec, e) for rec in records])
    result, parts = GroupResult(), []
    for rec in records:
        try:
            decoded = (_raw_input if raw else _srgb_input)(rec, need, target, endpoint_url)
            images = {k: v for k, v in decoded.items() if k not in ISP_COLUMNS} | target.arrays
            isp = target.isp | {k: v for k, v in decoded.items() if k in ISP_COLUMNS}
            parts.append(_crops(rec, images, isp, crop_size=crop_size, per_image=per_image, eval_crop=eval_crop,
                                seed=seed))
        except RejectedInput as e:
            result.rejected.append(_rejection(rec, e))
        decoded = images = None  # free this input's full-size arrays before the next one is decoded
    if parts:
        result.rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return result


def task_cpus() -> int:
    """The whole CPUs Ray gave the running task or actor (at least one): its thread budget."""
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))


def decode_groups(batch: dict[str, np.ndarray], options: dict, staging: str) -> Iterator[dict[str, np.ndarray]]:
    """The decode stage (Ray Data): each row of ``batch`` is one record group (its records as JSON); yields
    the group's crop rows plus the routing columns of ``shards.write_parts``. Rejected pairs are written
    to their shard's staging folder, merged into rejected.jsonl when the shard is committed. Lives here,
    not beside the VAE, so decode workers never import torch."""
    cv2.setNumThreads(task_cpus())
    for shard, group, text in zip(batch["shard"], batch["group"], batch["records"], strict=True):
        result = decode_group(json.loads(text), **options)
        for entry in result.rejected:
            url = shards.rejected_url(staging, int(shard), entry["id"])
            storage.atomic_write_text(url, json.dumps(entry), options["endpoint_url"])
        if result.num_rows:
            n = result.num_rows
            yield result.rows | {"_shard": np.full(n, shard, np.int64), "_group": np.full(n, group, np.int64),
                                 "_group_rows": np.full(n, n, np.int64)}
