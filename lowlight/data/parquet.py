"""The Parquet contract: metadata + float16 fixed-shape tensor columns (pyarrow's canonical type).

pyarrow's ``arrow.fixed_shape_tensor`` extension is readable by plain pyarrow, pandas and DuckDB,
unlike framework-specific tensor types.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

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
