"""What readers other than pyarrow get from the preprocessed Parquet: pandas, DuckDB, and the file-level
metadata that says which VAE made the latents."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from lowlight.data.parquet import SCHEMA_VERSION, read_file_metadata, tensor_column, tensor_shapes
from lowlight.models import sd

TENSORS = ("raw_in", "raw_gt", "z_gt")  # the columns of conftest's raw_data


@pytest.fixture(scope="module")
def part(raw_data) -> Path:
    parts = sorted(Path(raw_data).glob("part-*.parquet"))
    assert parts, f"no Parquet parts under {raw_data}"
    return parts[0]


def test_file_metadata_names_the_vae_and_schema(raw_data, fitted_vae):
    vae = sd.load_vae(vae=str(fitted_vae))
    expected = {"vae_id": sd.fingerprint(vae), "vae_scaling_factor": float(vae.config.scaling_factor),
                "schema_version": SCHEMA_VERSION}
    for path in sorted(Path(raw_data).glob("part-*.parquet")):
        meta = read_file_metadata(pq.read_schema(path))
        found = {"vae_id": meta["vae_id"], "vae_scaling_factor": float(meta["vae_scaling_factor"]),
                 "schema_version": int(meta["schema_version"])}
        assert found == expected, path.name
        # The same values as the per-row columns.
        columns = pq.read_table(path, columns=list(expected)).to_pydict()
        assert {k: set(v) for k, v in columns.items()} == {k: {v} for k, v in expected.items()}, path.name
        # A reader that knows nothing of Arrow sees them too: DuckDB reads the Parquet key-value footer.
        kv = dict(duckdb.sql(f"SELECT key, value FROM parquet_kv_metadata('{path}')").fetchall())
        assert kv[b"lowlight.vae_id"].decode() == expected["vae_id"]
        assert int(kv[b"lowlight.schema_version"]) == SCHEMA_VERSION


def test_pandas_gives_flat_float16_cells_that_reshape_to_the_tensors(part):
    frame = pd.read_parquet(part)
    table = pq.read_table(part)
    shapes = tensor_shapes(table.schema)
    assert set(TENSORS) <= set(shapes)
    for name in TENSORS:
        cell = frame[name].iloc[0]
        assert isinstance(cell, np.ndarray) and cell.dtype == np.float16, name
        assert cell.shape == (int(np.prod(shapes[name])),), name  # flat: pandas drops the shape
        stacked = np.stack(frame[name].to_numpy()).reshape(len(frame), *shapes[name])
        np.testing.assert_array_equal(stacked, tensor_column(table, name))


def test_duckdb_gives_float_lists_without_shape(part):
    table = pq.read_table(part)
    relation = duckdb.sql(f"SELECT id, {', '.join(TENSORS)} FROM read_parquet('{part}') ORDER BY id")
    types = dict(zip(relation.columns, (str(t) for t in relation.types), strict=True))
    assert all(types[name] == "FLOAT[]" for name in TENSORS), types
    rows = relation.fetchall()
    order = np.argsort(np.array(table.column("id").to_pylist()), kind="stable")
    for j, name in enumerate(TENSORS, start=1):
        reference = tensor_column(table, name)[order]
        values = np.array([row[j] for row in rows], np.float32)
        assert values.shape == (len(rows), int(np.prod(reference.shape[1:]))), name
        # float16 widens to float32 exactly, in C order of (C, H, W).
        np.testing.assert_array_equal(values, reference.reshape(len(rows), -1).astype(np.float32))
