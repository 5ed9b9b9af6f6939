"""The Ray Data pipeline end to end on the sample set: schema, latents, rejection, one job with shard
commits, crash and resume, byte-sized files, S3; and record groups decoded without Ray."""

from __future__ import annotations

import dataclasses
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
import ray
import torch

from lowlight import storage
from lowlight.config import ConfigError, load_config
from lowlight.data import decode as decode_module
from lowlight.data import shards
from lowlight.data.decode import decode_group, group_by_target
from lowlight.data.parquet import SCHEMA_VERSION, tensor_column
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


def actors_started(stage: str) -> int:
    """Actors of a pipeline stage (class name) this Ray session has started, alive or dead (GCS actor table)."""
    return sum(f"({stage})" in a["ActorClassName"] for a in ray._private.state.actors().values())


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
    assert set(meta["schema_version"]) == {SCHEMA_VERSION} == {2}
    # Per-row ISP levels: the sample DNGs are written with the Sony A7S2 profile (512 / 16383 ADU).
    profile = CameraProfile.load("sony_a7s2")
    black = tensor_column(table, "black_level")
    assert black.dtype == np.float32 and black.shape == (table.num_rows, 4)
    np.testing.assert_array_equal(black, np.broadcast_to(profile.black_cells, black.shape))
    assert set(table.column("white_level").to_pylist()) == {profile.white_level}


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


def test_one_job_commits_shards_resumes_after_a_crash_and_sizes_files_by_bytes(
        ray_local, sample_root, fitted_vae, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    # 4 scenes x 3 short exposures: 4 record groups; at most 5 records a shard puts each group in its own.
    # One fused actor: a job per shard would start one per shard.
    settings = ["preprocess.records_per_shard=5", "preprocess.columns=[raw_in, z_gt]", "preprocess.vae_actors=1",
                "preprocess.file_bytes=40000", "preprocess.row_group_bytes=15000"]
    cfg = raw_cfg(sample_root, fitted_vae, out, *settings)
    real_commit = shards.commit_shard
    commits = []

    def crash_on_second_commit(*args, **kwargs):
        if commits:
            raise RuntimeError("simulated driver crash")
        commits.append(args[1])
        return real_commit(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(shards, "commit_shard", crash_on_second_commit)
        with pytest.raises(RuntimeError, match="simulated driver crash"):
            preprocess(cfg)
    # Only the committed shard is visible: its parts and its marker, nothing of the others.
    markers = sorted(p.name for p in (out / "_shards").glob("*.json"))
    assert markers == [f"shard-{commits[0]:05d}.json"]
    assert {p.name[:10] for p in out.glob("part-*.parquet")} == {f"part-{commits[0]:05d}"}

    actors_before = actors_started("DecodeEncode")
    resumed = preprocess(cfg)
    # All remaining shards in one streaming job: the one actor started once, not once per shard.
    assert (resumed.shards_done, resumed.shards_skipped) == (3, 1)
    assert actors_started("DecodeEncode") - actors_before == 1
    assert not (out / "_staging").exists()
    before = read_table(out).sort_by("id")
    assert set(before.column("record_id").to_pylist()) == {f"Sony/{p.stem}" for p in
                                                           (sample_root / "raw" / "Sony" / "short").glob("*.dng")}

    # Files and row groups are bounded by the byte settings, and the settings bind (several of each).
    files = sorted(out.glob("part-*.parquet"))
    assert len(files) > 4
    row_groups = 0
    for path in files:
        parquet = pq.ParquetFile(path)
        assert parquet.read().nbytes <= 40000, path.name
        for i in range(parquet.num_row_groups):
            assert parquet.read_row_group(i).nbytes <= 15000, (path.name, i)
        row_groups += parquet.num_row_groups
    assert row_groups > len(files)

    # A crash after shard 1's files were moved but before its marker: that shard alone is redone.
    (out / "_shards" / "shard-00001.json").unlink()
    again = preprocess(cfg)
    assert (again.shards_done, again.shards_skipped) == (1, 3)
    after = read_table(out).sort_by("id")
    assert after.column("id").to_pylist() == before.column("id").to_pylist()
    np.testing.assert_array_equal(tensor_column(after, "raw_in"), tensor_column(before, "raw_in"))
    np.testing.assert_array_equal(tensor_column(after, "z_gt"), tensor_column(before, "z_gt"))
    third = preprocess(cfg)
    assert third.shards_done == 0 and third.rows == resumed.rows == after.num_rows
    with pytest.raises(ConfigError, match="different config"):
        preprocess(raw_cfg(sample_root, fitted_vae, out, *settings, "preprocess.seed=1"))


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


def test_srgb_dataset_through_decode_tasks_and_vae_actors(ray_local, sample_root, fitted_vae, tmp_path):
    out = tmp_path / "lol"
    before = {stage: actors_started(stage) for stage in ("VaeEncode", "DecodeEncode")}
    # The GPU clusters' shape, here on CPU: decode tasks, then a separate VAE actor pool.
    summary = preprocess(load_config("sample_srgb", [f"dataset.root={sample_root / 'lol'}", f"model.vae={fitted_vae}",
                                                     f"preprocess.output={out}", "preprocess.fuse_decode_encode=false",
                                                     *FAST]))
    assert {stage: actors_started(stage) - n for stage, n in before.items()} == {"VaeEncode": 1, "DecodeEncode": 0}
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


# ---------------------------------------------------------------- record groups, without Ray

# A camera no level table pins, with a different black level on each photosite of a GRBG cell.
GRBG_CAMERA = CameraProfile(name="lowlight test camera", pattern="GRBG", black_level=(500.0, 510.0, 520.0, 530.0),
                            white_level=15000.0, wb=np.array([2.0, 1.0, 1.5], np.float32),
                            xyz_to_cam=CameraProfile.load().xyz_to_cam)


def write_group(root: Path, inputs: int, target_camera: CameraProfile = GRBG_CAMERA) -> list[dict]:
    """``inputs`` short exposures and one long exposure of a smooth scene, as records sharing the target."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128]
    scene = 600 + 8000 * (0.5 + 0.5 * np.sin(xx / 9.0) * np.cos(yy / 7.0))
    long_path = root / "long.dng"
    write_dng(long_path, scene.astype(np.uint16), target_camera, iso=100, exposure_time=10.0)
    records = []
    for k in range(inputs):
        ratio = 50.0 * (k + 1)
        short = 520 + (scene - 520) / ratio + rng.normal(0, 2, scene.shape)
        path = root / f"short-{k}.dng"
        write_dng(path, np.clip(short, 0, 15000).astype(np.uint16), GRBG_CAMERA, iso=3200, exposure_time=10 / ratio)
        records.append({"id": f"scene/{k}", "input": str(path), "target": str(long_path), "split": "train",
                        "dataset": "sid", "kind": "raw", "camera": "Test", "iso": 3200.0,
                        "exposure_in": 10 / ratio, "exposure_gt": 10.0, "ratio": ratio})
    return records


OPTIONS = {"columns": ["raw_in", "raw_gt", "lrgb_in", "srgb_in", "srgb_gt"], "crop_size": 32, "per_image": 2,
           "eval_crop": "center", "seed": 0}


def test_a_shared_target_is_read_and_rendered_once_per_group(tmp_path, monkeypatch):
    records = write_group(tmp_path, 3)
    assert [len(g) for g in group_by_target(records)] == [3]
    alone = [decode_group([rec], **OPTIONS) for rec in records]  # each pair on its own, the per-pair way

    reads, renders = [], []
    real_read, real_render = storage.read_bytes, decode_module.render_srgb
    monkeypatch.setattr(storage, "read_bytes", lambda url, *a: reads.append(Path(url).name) or real_read(url, *a))
    monkeypatch.setattr(decode_module, "render_srgb", lambda data, **kw: renders.append(kw.get("ratio", 1)) or
                        real_render(data, **kw))
    grouped = decode_group(records, **OPTIONS)
    assert sorted(reads) == ["long.dng", "short-0.dng", "short-1.dng", "short-2.dng"]
    assert sorted(renders) == [1, 50.0, 100.0, 150.0]  # the target once, each amplified input once

    assert grouped.rejected == [] and grouped.num_rows == 3 * 2
    for name in (*OPTIONS["columns"], "id", "crop_y", "crop_x", "wb", "ccm", "black_level", "white_level"):
        np.testing.assert_array_equal(grouped.rows[name], np.concatenate([a.rows[name] for a in alone]), name)
    # Black levels in the packed R, G1, B, G2 order: in a GRBG cell R is raster position 1, G1 (R's row)
    # position 0, B position 2, G2 position 3.
    np.testing.assert_array_equal(grouped.rows["black_level"], np.tile([510.0, 500.0, 520.0, 530.0], (6, 1)))
    assert set(grouped.rows["white_level"]) == {15000.0}
    assert grouped.rows["raw_gt"].dtype == np.float16 and grouped.rows["raw_gt"].shape == (6, 4, 16, 16)


def test_white_balance_and_ccm_are_the_targets_and_levels_the_inputs(tmp_path):
    """The long exposure was shot under another white balance and black level than its short ones."""
    target_camera = dataclasses.replace(GRBG_CAMERA, wb=np.array([1.6, 1.0, 2.4], np.float32),
                                        black_level=(600.0, 600.0, 600.0, 600.0))
    records = write_group(tmp_path, 2, target_camera)
    rows = decode_group(records, **OPTIONS).rows
    np.testing.assert_allclose(rows["wb"], np.tile([1.6, 1.0, 2.4], (4, 1)), rtol=1e-3)
    np.testing.assert_array_equal(rows["black_level"], np.tile([510.0, 500.0, 520.0, 530.0], (4, 1)))
    alone = decode_group([{**records[0], "target": records[1]["input"]}], **OPTIONS).rows  # a GRBG_CAMERA target
    np.testing.assert_allclose(alone["wb"], np.tile([2.0, 1.0, 1.5], (2, 1)), rtol=1e-3)


def test_an_unreadable_target_rejects_its_whole_group(tmp_path):
    records = write_group(tmp_path, 2)
    target = Path(records[0]["target"])
    target.write_bytes(target.read_bytes()[:1500])
    result = decode_group(records, **OPTIONS)
    assert result.num_rows == 0
    assert [r["id"] for r in result.rejected] == ["scene/0", "scene/1"]
    assert all("long.dng" in r["reason"] and "not a readable RAW" in r["reason"] for r in result.rejected)


def test_shards_hold_whole_groups_and_commit_once_every_row_is_written():
    plan = shards.plan_shards([3, 3, 2, 4], records_per_shard=5)
    assert [(s.groups, s.records) for s in plan] == [((0,), 3), ((1, 2), 5), ((3,), 4)]
    tracker = shards.ShardTracker(plan)

    def report(*entries):  # (file, shard, group, group_rows, rows)
        return {k: np.array(v) for k, v in zip(("path", "shard", "group", "group_rows", "rows"),
                                                zip(*entries, strict=True), strict=True)} | {
            "bytes": np.full(len(entries), 100)}

    assert tracker.add(report(("a", 0, 0, 4, 3))) == []  # 3 of group 0's 4 rows
    assert tracker.add(report(("b", 0, 0, 4, 1), ("b", 1, 1, 2, 2))) == [0]
    # Group 2 had every pair rejected (no rows ever come): shard 1 is whole only once the job has ended.
    assert tracker.add(report(("c", 2, 3, 5, 5))) == [2]
    assert tracker.remaining() == [1]
    assert tracker.files[0] == {"a": 100, "b": 100} and tracker.rows(0) == 4 and tracker.rows(1) == 2
