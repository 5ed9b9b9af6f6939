"""The Parquet contract: metadata + float16 fixed-shape tensor columns (pyarrow's canonical type).

Every file also carries the VAE's fingerprint, its scaling factor and the schema version in its
key-value (schema) metadata, so a reader that looks at one file's footer knows what made it.

What other readers get for a tensor column (tested in tests/test_parquet_readability.py):
pyarrow sees ``arrow.fixed_shape_tensor`` with its shape; pandas (``pd.read_parquet``) gives one
flat 1-D float16 numpy array per cell, to be reshaped with the shape from the Arrow schema
(``tensor_shapes``); DuckDB reads the column as a plain ``FLOAT[]`` list of C*H*W values per row
(float16 widened to float32; the shape is lost).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lowlight import storage

SCHEMA_VERSION = 2
META_TYPES = {
    "id": pa.string(), "record_id": pa.string(), "split": pa.string(), "dataset": pa.string(),
    "camera": pa.string(), "iso": pa.float64(), "exposure_in": pa.float64(), "exposure_gt": pa.float64(),
    "ratio": pa.float64(), "height": pa.int64(), "width": pa.int64(), "crop_y": pa.int64(), "crop_x": pa.int64(),
}
META_COLUMNS = tuple(META_TYPES)
# Per-image ISP parameters (RAW datasets only), repeated on each crop: the target frame's as-shot white
# balance (3,) and camera -> sRGB matrix (3, 3), which render raw_gt (and a prediction of it) as srgb_gt
# is rendered; the input frame's black level (4,) in the packed R, G1, B, G2 order of raw_in/raw_gt and
# white level, in ADU.
ISP_COLUMNS = ("wb", "ccm", "black_level", "white_level")
FLOAT32_TENSORS = ("wb", "ccm", "black_level")  # small per-image parameters keep full precision
SCALAR_TYPES = {**META_TYPES, "white_level": pa.float64()}
METADATA_PREFIX = "lowlight."


@dataclass(frozen=True)
class VaeStamp:
    """Which VAE made the latents: stored in columns and in every file's metadata."""

    vae_id: str
    scaling_factor: float


def to_table(batch: dict[str, np.ndarray], stamp: VaeStamp) -> pa.Table:
    """A numpy batch (tensor columns stacked on axis 0) -> an Arrow table in the contract's schema."""
    columns: dict[str, pa.Array] = {}
    for name, values in batch.items():
        values = np.asarray(values)
        if values.ndim > 1:
            dtype = np.float32 if name in FLOAT32_TENSORS else np.float16
            columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values, dtype))
        else:
            columns[name] = pa.array(values.tolist(), SCALAR_TYPES.get(name))
    n = len(batch["id"])
    columns["vae_id"] = pa.array([stamp.vae_id] * n, pa.string())
    columns["vae_scaling_factor"] = pa.array([stamp.scaling_factor] * n, pa.float64())
    columns["schema_version"] = pa.array([SCHEMA_VERSION] * n, pa.int32())
    return pa.table(columns).replace_schema_metadata(file_metadata(stamp))


def file_metadata(stamp: VaeStamp) -> dict[str, str]:
    return {f"{METADATA_PREFIX}vae_id": stamp.vae_id,
            f"{METADATA_PREFIX}vae_scaling_factor": repr(float(stamp.scaling_factor)),
            f"{METADATA_PREFIX}schema_version": str(SCHEMA_VERSION)}


def read_file_metadata(schema: pa.Schema) -> dict[str, str]:
    """The ``lowlight.*`` key-value metadata of a file's schema, without the prefix."""
    return {k.decode()[len(METADATA_PREFIX):]: v.decode() for k, v in (schema.metadata or {}).items()
            if k.decode().startswith(METADATA_PREFIX)}


def tensor_shape(name: str, crop_size: int) -> tuple[int, int, int]:
    """Per-row shape of a tensor column for crops of ``crop_size`` sRGB pixels."""
    half, latent = crop_size // 2, crop_size // 8
    shapes = {"raw_in": (4, half, half), "raw_gt": (4, half, half), "lrgb_in": (3, half, half),
              "lrgb_gt": (3, half, half), "srgb_in": (3, crop_size, crop_size), "srgb_gt": (3, crop_size, crop_size),
              "srgb_pre": (3, crop_size, crop_size),
              "z_in": (4, latent, latent), "z_gt": (4, latent, latent), "z_pre": (4, latent, latent)}
    if name not in shapes:
        raise KeyError(f"'{name}' is not a tensor column; known: {sorted(shapes)}")
    return shapes[name]


def output_row_bytes(columns: list[str], crop_size: int, kind: str) -> int:
    """Arrow bytes of one output row: float16 tensors, float32 ISP parameters (RAW) and the metadata
    (strings counted at 64 bytes each, a generous length for ids and names)."""
    tensors = sum(2 * int(np.prod(tensor_shape(c, crop_size))) for c in columns)
    isp = (3 + 9 + 4) * 4 + 8 if kind == "raw" else 0
    meta = sum(64 if t == pa.string() else 8 for t in META_TYPES.values()) + 64 + 8 + 4  # + vae columns
    return tensors + isp + meta


def row_nbytes(table: pa.Table) -> int:
    """Arrow bytes per row (every column is fixed-size but the short strings)."""
    return max(1, -(-table.nbytes // max(1, table.num_rows)))


def write_file(table: pa.Table, url: str, row_group_bytes: int, endpoint_url: str | None = None) -> int:
    """Write one Parquet file with row groups of at most ``row_group_bytes`` of Arrow data; returns its size."""
    rows_per_group = max(1, row_group_bytes // row_nbytes(table))
    storage.makedirs(os.path.dirname(url), endpoint_url)
    fs = storage.filesystem(url, endpoint_url)
    with fs.open(url, "wb") as f:
        pq.write_table(table, f, row_group_size=rows_per_group)
    return fs.size(url)


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """A tensor column as one (N, C, H, W) numpy array."""
    column = table.column(name).combine_chunks()
    return column.to_numpy_ndarray()


def tensor_shapes(schema: pa.Schema) -> dict[str, tuple[int, ...]]:
    """Column name -> per-row shape of every fixed_shape_tensor column (to reshape pandas' flat cells)."""
    return {f.name: tuple(f.type.shape) for f in schema if isinstance(f.type, pa.FixedShapeTensorType)}


def read_split(url: str, split: str, columns: list[str], endpoint_url: str | None = None,
               limit: int | None = None) -> dict[str, np.ndarray]:
    """One split's rows of a preprocessed folder, in id order, without Ray (small reads: a reference
    set, an evaluation batch). Tensor columns come back as float32 arrays, others as arrays."""
    tables = []
    for path in storage.listdir(url, "part-*.parquet", endpoint_url):
        with storage.filesystem(path, endpoint_url).open(path, "rb") as f:
            table = pq.read_table(f, columns=list(dict.fromkeys(["id", "split", *columns])))
        tables.append(table.filter(pc.equal(table.column("split"), split)))
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise ValueError(f"no rows of split '{split}' under '{url}'")
    table = pa.concat_tables(tables)
    table = table.take(pc.sort_indices(table, [("id", "ascending")]))[:limit]
    out = {}
    for name in columns:
        is_tensor = isinstance(table.schema.field(name).type, pa.FixedShapeTensorType)
        out[name] = tensor_column(table, name).astype(np.float32) if is_tensor else table.column(name).to_numpy()
    return out
