"""The Ray Data pipeline end to end on the sample set: schema, latents, rejection, resume, S3."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lowlight.config import ConfigError, load_config
from lowlight.data.parquet import tensor_column
from lowlight.data.preprocess import preprocess
from lowlight.data.unprocess import CameraProfile, write_dng
from lowlight.metrics import psnr
from lowlight.models import sd

FAST = ["preprocess.crop_size=64", "preprocess.crops_per_image=2", "preprocess.vae_batch_size=16"]
# Measured with the 400-step tiny VAE of conftest: about 20 dB; random weights give about 11 dB.
DECODE_PSNR_FLOOR_DB = 17.0


def raw_cfg(sample_root, vae, output, *extra):
    return load_config("sample_raw", [f"dataset.root={sample_root / 'raw'}", f"model.vae={vae}",
                                      f"preprocess.output={output}", *FAST, *extra])


def read_table(output) -> pq.Table:
    return pq.read_table(sorted(Path(output).glob("part-*.parquet")))


@pytest.fixture(scope="module")
def raw_parquet(ray_local, sample_root, fitted_vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("pq") / "raw"
    summary = preprocess(raw_cfg(sample_root, fitted_vae, out))
    return out, summary


def test_plain_pyarrow_reads_contract(raw_parquet):
    out, summary = raw_parquet
    # A fresh interpreter that never imports Ray must see the canonical tensor type.
    code = ("import pyarrow.parquet as pq, glob, sys; t = pq.read_table(sorted(glob.glob(sys.argv[1] + '/part-*')));"
            "print(t.schema.field('raw_in').type.extension_name, t.column('z_gt').type.shape, t.num_rows, sep='|')")
    printed = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    ext, z_shape, rows = printed.stdout.strip().split("|")
    assert ext == "arrow.fixed_shape_tensor"
    assert json.loads(z_shape) == [4, 8, 8]
    assert int(rows) == summary.rows > 0

    table = read_table(out)
    shapes = {"raw_in": (4, 32, 32), "raw_gt": (4, 32, 32), "lrgb_in": (3, 32, 32), "srgb_in": (3, 64, 64),
              "srgb_gt": (3, 64, 64), "z_in": (4, 8, 8), "z_gt": (4, 8, 8)}
    for name, shape in shapes.items():
        values = tensor_column(table, name)
        assert values.shape == (table.num_rows, *shape), name
        assert values.dtype == np.float16, name
        assert np.isfinite(values).all(), name
        if not name.startswith("z_"):
            assert values.min() >= 0 and values.max() <= 1, name
    # Short exposures are dark before amplification; the targets are not.
    assert tensor_column(table, "raw_in").mean() < tensor_column(table, "raw_gt").mean() / 20
    meta = table.select(["split", "ratio", "vae_id", "schema_version"]).to_pydict()
    assert set(meta["split"]) == {"train", "val", "test"}
    assert set(meta["ratio"]) == {100.0, 250.0, 300.0}
    assert len(set(meta["vae_id"])) == 1
    assert set(meta["schema_version"]) == {1}


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2


def test_latents_decode_to_targets(raw_parquet, fitted_vae):
    out, _ = raw_parquet
    table = read_table(out)
    vae = sd.load_vae(vae=str(fitted_vae))
    assert set(table.column("vae_id").to_pylist()) == {sd.fingerprint(vae)}
    z = torch.from_numpy(tensor_column(table, "z_gt").astype(np.float32))
    target = torch.from_numpy(tensor_column(table, "srgb_gt").astype(np.float32))
    measured = psnr(decode(vae, z), target)
    # The unfitted tiny VAE round-trips the same crops far worse: fitting is what makes latents usable.
    unfitted = sd.load_vae("tiny")
    with torch.no_grad():
        z_unfitted = unfitted.encode(target * 2 - 1).latent_dist.mode() * unfitted.config.scaling_factor
    baseline = psnr(decode(unfitted, z_unfitted), target)
    print(f"z_gt decoded vs srgb_gt: fitted {measured:.2f} dB, unfitted {baseline:.2f} dB")
    assert measured >= DECODE_PSNR_FLOOR_DB
    assert measured >= baseline + 3


def test_rerun_skips_done_shards_and_yields_same_rows(ray_local, sample_root, fitted_vae, tmp_path):
    out = tmp_path / "resume"
    cfg = raw_cfg(sample_root, fitted_vae, out, "preprocess.records_per_shard=5", "preprocess.columns=[raw_in, z_gt]")
    first = preprocess(cfg)
    before = read_table(out).sort_by("id")
    # Simulate a crash after shard 1's files were moved but before its marker was written.
    (out / "_shards" / "shard-00001.json").unlink()
    second = preprocess(cfg)
    assert (second.shards_done, second.shards_skipped) == (1, first.shards_done - 1)
    after = read_table(out).sort_by("id")
    assert after.column("id").to_pylist() == before.column("id").to_pylist()
    np.testing.assert_array_equal(tensor_column(after, "raw_in"), tensor_column(before, "raw_in"))
    np.testing.assert_array_equal(tensor_column(after, "z_gt"), tensor_column(before, "z_gt"))
    third = preprocess(cfg)
    assert third.shards_done == 0 and third.rows == first.rows
    with pytest.raises(ConfigError, match="different config"):
        preprocess(raw_cfg(sample_root, fitted_vae, out, "preprocess.records_per_shard=5", "preprocess.seed=1",
                           "preprocess.columns=[raw_in, z_gt]"))


def test_bad_files_are_rejected_and_the_rest_written(ray_local, sample_root, fitted_vae, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(sample_root / "raw", root)
    shorts = sorted((root / "Sony" / "short").glob("*.dng"))
    truncated, mis_sized = shorts[0], shorts[-1]
    truncated.write_bytes(truncated.read_bytes()[:2000])
    write_dng(mis_sized, np.full((64, 96), 600, np.uint16), CameraProfile.load())
    out = tmp_path / "out"
    summary = preprocess(load_config("sample_raw", [f"dataset.root={root}", f"model.vae={fitted_vae}",
                                                    f"preprocess.output={out}", "preprocess.columns=[raw_in]",
                                                    *FAST]))
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(Path(r["input"]).name for r in rejected) == sorted([truncated.name, mis_sized.name])
    reasons = {Path(r["input"]).name: r["reason"] for r in rejected}
    assert "not a readable RAW" in reasons[truncated.name] and truncated.name in reasons[truncated.name]
    assert "size mismatch" in reasons[mis_sized.name]
    assert summary.rejected == 2
    ids = set(read_table(out).column("record_id").to_pylist())
    assert len(ids) == len(shorts) - 2 and summary.rows > 0


def test_srgb_dataset_and_column_checks(ray_local, sample_root, fitted_vae, tmp_path):
    out = tmp_path / "lol"
    summary = preprocess(load_config("sample_srgb", [f"dataset.root={sample_root / 'lol'}", f"model.vae={fitted_vae}",
                                                     f"preprocess.output={out}", *FAST]))
    table = read_table(out)
    assert summary.rows == table.num_rows > 0
    assert {"srgb_in", "srgb_gt", "z_in", "z_gt"} <= set(table.column_names)
    assert "raw_in" not in table.column_names
    with pytest.raises(ConfigError, match="need a RAW dataset"):
        preprocess(load_config("sample_srgb", [f"dataset.root={sample_root / 'lol'}", f"model.vae={fitted_vae}",
                                               f"preprocess.output={tmp_path / 'x'}", "preprocess.columns=[raw_in]"]))


def test_preprocess_against_s3(ray_local, sample_root, fitted_vae, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="lowlight-data")
    for path in (sample_root / "raw").rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "lowlight-data", f"raw/{path.relative_to(sample_root / 'raw')}")
    cfg = load_config("sample_raw", ["dataset.root=s3://lowlight-data/raw", f"model.vae={fitted_vae}",
                                     "preprocess.output=s3://lowlight-data/parquet", f"storage.endpoint_url={s3_endpoint}",
                                     "preprocess.columns=[raw_in, raw_gt, z_gt]", *FAST])
    summary = preprocess(cfg)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lowlight-data", Prefix="parquet/")["Contents"]]
    parts = [k for k in keys if k.startswith("parquet/part-")]
    assert parts and "parquet/_manifest.json" in keys and not any("_staging" in k for k in keys)
    rows = 0
    for key in parts:
        body = s3.get_object(Bucket="lowlight-data", Key=key)["Body"].read()
        rows += pq.read_table(io.BytesIO(body)).num_rows
    assert rows == summary.rows > 0
