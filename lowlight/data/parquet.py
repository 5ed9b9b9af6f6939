"""The Parquet contract: metadata + float16 fixed-shape tensor columns (pyarrow's canonical type).

pyarrow's ``arrow.fixed_shape_tensor`` extension is readable by plain pyarrow, pandas and DuckDB,
unlike framework-specific tensor types.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lowlight import storage

SCHEMA_VERSION = 1
META_COLUMNS = ("id", "record_id", "split", "dataset", "camera", "iso", "exposure_in", "exposure_gt", "ratio",
                "height", "width", "crop_y", "crop_x")
FLOAT32_TENSORS = ("wb", "ccm")  # small per-image ISP parameters keep full precision


def to_table(batch: dict[str, np.ndarray], vae_id: str) -> pa.Table:
    """A numpy batch (tensor columns stacked on axis 0) -> an Arrow table in the contract's schema."""
    columns: dict[str, pa.Array] = {}
    for name, values in batch.items():
        values = np.asarray(values)
        if values.ndim > 1:
            dtype = np.float32 if name in FLOAT32_TENSORS else np.float16
            columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values, dtype))
        else:
            columns[name] = pa.array(values.tolist())
    n = len(batch["id"])
    columns["vae_id"] = pa.array([vae_id] * n, pa.string())
    columns["schema_version"] = pa.array([SCHEMA_VERSION] * n, pa.int32())
    return pa.table(columns)


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """A tensor column as one (N, C, H, W) numpy array."""
    column = table.column(name).combine_chunks()
    return column.to_numpy_ndarray()


def read_split(url: str, split: str, columns: list[str], endpoint_url: str | None = None,
               limit: int | None = None) -> dict[str, np.ndarray]:
    """One split's rows of a preprocessed folder, in id order, without Ray (small reads: a reference
    set, an evaluation batch). Tensor columns come back as float32 arrays, others as arrays."""
    tables = []
    for path in storage.listdir(url, "part-*.parquet", endpoint_url):
        with storage.filesystem(path, endpoint_url).open(path, "rb") as f:
            table = pq.read_table(f, columns=["id", "split", *columns])
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
