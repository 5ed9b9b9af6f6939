"""One record (an input/target pair) -> the tensor columns, cropped into Parquet rows.

Runs inside Ray Data tasks. A bad pair raises ``RejectedInput`` with a reason that names the
file; the pipeline records it and carries on.
"""

from __future__ import annotations

import hashlib

import numpy as np

from lowlight import storage
from lowlight.data.images import decode_image
from lowlight.data.raw import linear_rgb, pack_bayer, read_raw, render_srgb

HALF_RES = ("raw_in", "raw_gt", "lrgb_in")  # packed Bayer / linear RGB live at half the sRGB resolution
ISP_COLUMNS = ("wb", "ccm")  # per-image, not cropped


class RejectedInput(Exception):
    """An input pair that cannot be used; the message is the reason recorded in rejected.jsonl."""


def needed_arrays(columns: list[str]) -> set[str]:
    """Arrays to decode: the requested ones plus the sRGB images that latents are encoded from."""
    need = {c for c in columns if not c.startswith("z_")}
    need |= {"srgb_" + c[2:] for c in columns if c.startswith("z_")}
    return need


def _read(url: str, endpoint_url: str | None) -> bytes:
    try:
        return storage.read_bytes(url, endpoint_url)
    except (OSError, ValueError) as e:
        raise RejectedInput(f"cannot read '{url}': {type(e).__name__}: {e}") from e


def _decode_raw(rec: dict, need: set[str], endpoint_url: str | None) -> dict[str, np.ndarray]:
    data_in, data_gt = _read(rec["input"], endpoint_url), _read(rec["target"], endpoint_url)
    frames = {}
    for role, data, url in (("in", data_in, rec["input"]), ("gt", data_gt, rec["target"])):
        try:
            frames[role] = read_raw(data)
        except Exception as e:  # LibRaw raises many types for truncated/foreign files
            raise RejectedInput(f"'{url}' is not a readable RAW file: {type(e).__name__}: {e}") from e
    shape_in, shape_gt = frames["in"].bayer.shape, frames["gt"].bayer.shape
    if shape_in != shape_gt:
        raise RejectedInput(f"size mismatch: '{rec['input']}' is {shape_in} but '{rec['target']}' is {shape_gt}")
    out: dict[str, np.ndarray] = {}
    if need & {"raw_in", "lrgb_in"}:
        packed_in = pack_bayer(frames["in"])
        out["raw_in"] = packed_in
        out["lrgb_in"] = linear_rgb(packed_in, frames["in"].camera_wb, rec["ratio"])
    if "raw_gt" in need:
        out["raw_gt"] = pack_bayer(frames["gt"])
    if "srgb_in" in need:
        out["srgb_in"] = render_srgb(data_in, ratio=rec["ratio"]).transpose(2, 0, 1)
    if "srgb_gt" in need:
        out["srgb_gt"] = render_srgb(data_gt).transpose(2, 0, 1)
    out = {k: v for k, v in out.items() if k in need}
    # Per-image ISP parameters, so raw outputs can be rendered to sRGB later (metrics, display).
    out["wb"] = frames["in"].camera_wb.astype(np.float32)
    out["ccm"] = frames["in"].cam_to_srgb.astype(np.float32)
    return out


def _decode_srgb(rec: dict, need: set[str], endpoint_url: str | None) -> dict[str, np.ndarray]:
    images = {}
    for col, url in (("srgb_in", rec["input"]), ("srgb_gt", rec["target"])):
        try:
            images[col] = decode_image(_read(url, endpoint_url), url).transpose(2, 0, 1)
        except ValueError as e:
            raise RejectedInput(str(e)) from e
    if images["srgb_in"].shape != images["srgb_gt"].shape:
        raise RejectedInput(f"size mismatch: '{rec['input']}' is {images['srgb_in'].shape[1:]} "
                            f"but '{rec['target']}' is {images['srgb_gt'].shape[1:]}")
    return {k: v for k, v in images.items() if k in need}


def full_resolution(arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    """Common sRGB-resolution size (LibRaw may trim a few pixels relative to the Bayer array)."""
    sizes = [(a.shape[1] * (2 if k in HALF_RES else 1), a.shape[2] * (2 if k in HALF_RES else 1))
             for k, a in arrays.items() if k not in ISP_COLUMNS]
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


def decode_record(rec: dict, columns: list[str], *, crop_size: int, per_image: int, eval_crop: str, seed: int,
                  endpoint_url: str | None = None) -> list[dict]:
    need = needed_arrays(columns)
    decode = _decode_raw if rec["kind"] == "raw" else _decode_srgb
    arrays = decode(rec, need, endpoint_url)
    height, width = full_resolution(arrays)
    if min(height, width) < crop_size:
        raise RejectedInput(f"'{rec['input']}' is {height}x{width}, smaller than the {crop_size}px crop")
    boxes = crop_boxes(height, width, crop_size, train=rec["split"] == "train", per_image=per_image,
                       eval_crop=eval_crop, seed=record_seed(seed, rec["id"]))
    rows = []
    for k, (y, x) in enumerate(boxes):
        row = {
            "id": f"{rec['id']}#{k}", "record_id": rec["id"], "split": rec["split"], "dataset": rec["dataset"],
            "camera": rec["camera"], "iso": float(rec["iso"]), "exposure_in": float(rec["exposure_in"]),
            "exposure_gt": float(rec["exposure_gt"]), "ratio": float(rec["ratio"]), "height": height,
            "width": width, "crop_y": y, "crop_x": x,
        }
        for name, arr in arrays.items():
            if name in ISP_COLUMNS:
                row[name] = arr
                continue
            s = 2 if name in HALF_RES else 1
            row[name] = np.ascontiguousarray(arr[:, y // s:(y + crop_size) // s, x // s:(x + crop_size) // s],
                                             dtype=np.float16)
        rows.append(row)
    return rows
