"""The embedded sample dataset, built small: tree shape, list files, exposure and noise physics, determinism,
and the extended photo set's manifest splits."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from lowlight.config import SamplesConfig
from lowlight.data import samples
from lowlight.data.images import encode_png, read_image
from lowlight.data.layouts import load_records
from lowlight.data.noise import NoiseCalibration, color_bias_for_gain, gain_for_iso, tukey_lambda_variance
from lowlight.data.photos import ManifestRow, write_manifest
from lowlight.data.raw import pack_bayer, read_raw
from lowlight.data.samples import (
    Photo,
    build_samples,
    configured_photos,
    photos_from_dir,
    photos_from_manifest,
)
from lowlight.data.unprocess import read_exposure_tags

RATIOS = (100, 250, 300)
CALIB = NoiseCalibration.load()
LIST_LINE = re.compile(r"^\./Sony/short/(\d{5})_(\d{2})_([\d.]+)s\.dng \./Sony/long/(\d{5})_00_10s\.dng ISO(\d+) F[\d.]+$")


def _arrays() -> list[tuple[str, np.ndarray]]:
    return [
        ("astronaut", data.astronaut()[40:104, 150:246]),
        ("coffee", data.coffee()[100:164, 200:296]),
        ("chelsea", data.chelsea()[60:124, 100:196]),
    ]


def _photos() -> list[Photo]:
    return [Photo(name, lambda array=array: array) for name, array in _arrays()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    summary = build_samples(root, photos=_photos(), seed=0, ratios=RATIOS, progress=False)
    return root, summary


def _pairs(raw_root: Path) -> list[tuple[Path, Path, int, float]]:
    """(short, long, ISO, ratio from the DNGs' exposure tags) for every list-file line."""
    pairs = []
    for split in ("train", "test", "val"):
        for line in (raw_root / f"Sony_{split}_list.txt").read_text().splitlines():
            short, long, iso_token, _ = line.split()
            (iso_s, t_s), (iso_l, t_l) = read_exposure_tags(raw_root / short), read_exposure_tags(raw_root / long)
            iso = int(iso_token.removeprefix("ISO"))
            assert iso_s == iso_l == iso  # both exposures carry the list's ISO
            pairs.append((raw_root / short, raw_root / long, iso, t_l / t_s))
    return pairs


def _median_sigma(law, k: float) -> float:
    return float(np.exp(law.slope * np.log(k) + law.bias))


def test_tree_shape_and_summary(built):
    root, summary = built
    files = set(_tree(root))
    ids = {"00001": "train", "20001": "val", "10001": "test"}
    assert summary["scenes"] == {"00001": "astronaut", "20001": "coffee", "10001": "chelsea"}
    assert summary["written"] == len(files) - 4  # everything but the list files and samples.json
    for scene, split in ids.items():
        assert f"raw/Sony/long/{scene}_00_10s.dng" in files
        for k, t in enumerate(("0.1", "0.04", "0.033")):
            assert f"raw/Sony/short/{scene}_{k:02d}_{t}s.dng" in files
            lol = "our485" if split == "train" else "eval15"
            assert {f"lol/{lol}/low/{scene}_{k:02d}.png", f"lol/{lol}/high/{scene}_{k:02d}.png"} <= files
    assert len(files) == 4 + 3 * 4 + 3 * 3 * 2
    assert not any(".tmp" in f for f in files)


def test_list_files_follow_sid(built):
    root, _ = built
    for split, digit in (("train", "0"), ("test", "1"), ("val", "2")):
        lines = (root / "raw" / f"Sony_{split}_list.txt").read_text().splitlines()
        assert len(lines) == len(RATIOS)
        for line in lines:
            match = LIST_LINE.match(line)
            assert match, line
            assert match[1] == match[4] and match[1][0] == digit
            assert int(match[5]) in samples.ISO_CHOICES


def test_layouts_read_both_sets(built):
    root, _ = built
    records = load_records("sid", root / "raw", camera="Sony")
    assert sorted({r.split for r in records}) == ["test", "train", "val"] and len(records) == 9
    assert sorted({round(r.ratio) for r in records}) == [100, 250, 300]
    assert len(load_records("lol", root / "lol")) == 9


def test_every_dng_reads_and_exposures_scale_with_ratio(built):
    root, _ = built
    for short, long, iso, ratio in _pairs(root / "raw"):
        assert ratio == pytest.approx(RATIOS[int(short.name.split("_")[1])], rel=1e-6)
        s, lg = read_raw(short), read_raw(long)
        assert s.pattern == "RGGB" and s.bayer.shape == (64, 96)
        above_s = s.bayer.astype(np.float64) - s.black_level[0]
        above_l = lg.bayer.astype(np.float64) - lg.black_level[0]
        unsaturated = lg.bayer < 0.95 * lg.white_level
        # Each exposure carries the calibrated colour bias (black-level error) of its gain.
        bias_s = float(color_bias_for_gain(CALIB, torch.tensor([gain_for_iso(CALIB, iso)])).mean())
        bias_l = float(color_bias_for_gain(CALIB, torch.tensor([CALIB.k_min])).mean())
        measured = (above_l[unsaturated].mean() - bias_l) / (above_s[unsaturated].mean() - bias_s)
        assert measured == pytest.approx(ratio, rel=0.1)


def test_short_exposure_noise_matches_the_calibration(built):
    # Residual of the short exposure around the (nearly clean) long one divided by the ratio,
    # against the calibrated variance at the scene's ISO with the median noise scales.
    root, _ = built
    for short, long, iso, ratio in _pairs(root / "raw"):
        s, lg = pack_bayer(read_raw(short)), pack_bayer(read_raw(long))
        scale = lg.dtype.type(16383 - 512)
        signal, residual = lg * scale / ratio, (s - lg / ratio) * scale
        keep = (lg < 0.95) & (s > 0)  # packing clips below black; keep unclipped sites
        k = CALIB.k_for_iso(iso)
        expected = k * signal[keep].mean() + _median_sigma(CALIB.tukey, k) ** 2 * tukey_lambda_variance(0.0)
        expected += _median_sigma(CALIB.row, k) ** 2 + 2 / 12
        assert 0.6 < residual[keep].std() / np.sqrt(expected) < 1.6, (short.name, iso)


def test_long_exposure_is_nearly_clean(built):
    root, _ = built
    high = read_image(str(root / "lol/our485/high/00001_00.png"))
    low = read_image(str(root / "lol/our485/low/00001_00.png"))
    assert high.mean() > 10 * low.mean()
    photo = _arrays()[0][1].astype(np.float32) / 255
    assert 10 * np.log10(1 / np.mean((high - photo) ** 2)) > 25


def test_deterministic_resumable_and_atomic(built, tmp_path, monkeypatch):
    reference = _tree(built[0])

    calls = {"n": 0}
    real_render = samples.render_srgb

    def flaky_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("interrupted")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(samples, "render_srgb", flaky_render)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_samples(tmp_path, photos=_photos(), seed=0, ratios=RATIOS, progress=False)
    partial = _tree(tmp_path)
    assert partial and all(reference[name] == content for name, content in partial.items())
    monkeypatch.setattr(samples, "render_srgb", real_render)

    resumed = build_samples(tmp_path, photos=_photos(), seed=0, ratios=RATIOS, progress=False)
    assert resumed["skipped"] == len(partial) - 1  # samples.json is not a scene file
    assert _tree(tmp_path) == reference
    assert build_samples(tmp_path, photos=_photos(), seed=0, ratios=RATIOS, progress=False)["written"] == 0

    other = build_samples(tmp_path / "seed1", photos=_photos(), seed=1, ratios=RATIOS, progress=False)
    assert other["written"] == len(reference) - 4
    assert (tmp_path / "seed1/raw/Sony/short/00001_00_0.1s.dng").read_bytes() != reference[
        "raw/Sony/short/00001_00_0.1s.dng"
    ]


def test_photos_from_dir(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, photo in _arrays():
        (folder / f"{name}.png").write_bytes(encode_png(photo.astype(np.float32) / 255, bits=8))
    (folder / "notes.txt").write_text("not an image")
    photos = photos_from_dir(folder)
    assert [p.name for p in photos] == ["astronaut", "chelsea", "coffee"]
    np.testing.assert_allclose(photos[0].load(), _arrays()[0][1] / 255, atol=1e-6)
    summary = build_samples(tmp_path / "out", photos=photos, progress=False)
    assert summary["scenes"] == {"00001": "astronaut", "20001": "chelsea", "10001": "coffee"}
    with pytest.raises(ValueError, match="no images"):
        photos_from_dir(tmp_path / "out")


def test_needs_three_photos(tmp_path):
    with pytest.raises(ValueError, match="at least 3"):
        build_samples(tmp_path, photos=_photos()[:2], progress=False)


def _manifest_folder(folder: Path, splits: dict[str, str]) -> None:
    """A folder as `lowlight photos` leaves it: the photos (one a WebP, as GCompris ships them) and manifest.tsv."""
    folder.mkdir()
    rows = []
    for (name, array), ext in zip(_arrays(), (".webp", ".jpg", ".png"), strict=True):
        params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else [cv2.IMWRITE_JPEG_QUALITY, 100]
        content = cv2.imencode(ext, cv2.cvtColor(array, cv2.COLOR_RGB2BGR), params)[1].tobytes()
        (folder / f"{name}{ext}").write_bytes(content)
        rows.append(ManifestRow(f"{name}{ext}", splits[name], array.shape[1], array.shape[0], len(content),
                                hashlib.sha256(content).hexdigest(), "test-package", "debian", "1.0",
                                f"usr/share/{name}{ext}", "CC0", name))
    write_manifest(folder, rows)


def test_samples_follow_the_manifest_split(tmp_path):
    # assign_splits would make astronaut train and coffee test; the manifest says otherwise.
    folder = tmp_path / "extended"
    _manifest_folder(folder, {"astronaut": "test", "coffee": "train", "chelsea": "val"})
    photos = photos_from_manifest(folder)
    assert [(p.name, p.split) for p in photos] == [("astronaut.webp", "test"), ("chelsea.png", "val"),
                                                   ("coffee.jpg", "train")]
    out = tmp_path / "out"
    summary = build_samples(out, photos=photos, ratios=(100,), progress=False)
    assert summary["scenes"] == {"10001": "astronaut.webp", "20001": "chelsea.png", "00001": "coffee.jpg"}
    assert summary["splits"] == {"train": 1, "test": 1, "val": 1}
    for split, scene in (("train", "00001"), ("test", "10001"), ("val", "20001")):
        assert (out / f"raw/Sony_{split}_list.txt").read_text().startswith(f"./Sony/short/{scene}_00_")
    assert {p.name for p in (out / "lol/eval15/high").iterdir()} == {"10001_00.png", "20001_00.png"}
    high = read_image(str(out / "lol/eval15/high/10001_00.png"))  # the WebP photo, nearly clean
    assert 10 * np.log10(1 / np.mean((high - _arrays()[0][1] / 255) ** 2)) > 25

    cfg = SamplesConfig(photos="extended", photos_dir=str(folder), out=str(out), max_side=512)
    assert [(p.name, p.split) for p in configured_photos(cfg)] == [(p.name, p.split) for p in photos]
    assert configured_photos(SamplesConfig()) is None  # the default: skimage.data
    with pytest.raises(ValueError, match="exclude each other"):
        configured_photos(cfg, from_dir=str(folder))
    with pytest.raises(ValueError, match="built from other photos or settings"):
        build_samples(out, photos=_photos(), ratios=(100,), progress=False)
    assert json.loads((out / "samples.json").read_text())["scenes"] == summary["scenes"]


def test_cli_samples_uses_the_extended_set(tmp_path):
    from typer.testing import CliRunner

    from lowlight.cli import app

    folder = tmp_path / "extended"
    _manifest_folder(folder, {"astronaut": "val", "coffee": "test", "chelsea": "train"})
    args = ["samples", "--set", "samples.photos=extended", "--set", f"samples.photos_dir={folder}",
            "--set", f"samples.out={tmp_path / 'out'}", "--set", "samples.max_side=64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["scenes"] == {"20001": "astronaut.webp", "00001": "chelsea.png", "10001": "coffee.jpg"}

    (folder / "coffee.jpg").unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "lacks 1 photos" in result.output


def test_manifest_splits_must_cover_train_val_test(tmp_path):
    _manifest_folder(tmp_path / "one", {"astronaut": "train", "coffee": "train", "chelsea": "test"})
    with pytest.raises(ValueError, match="leave val empty"):
        build_samples(tmp_path / "out", photos=photos_from_manifest(tmp_path / "one"), progress=False)
    mixed = [Photo("a", _photos()[0].load, "train"), *_photos()[1:]]
    with pytest.raises(ValueError, match="photo 'coffee' has split None"):
        build_samples(tmp_path / "out", photos=mixed, progress=False)
