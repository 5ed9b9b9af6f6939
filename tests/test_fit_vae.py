"""fit-vae: held-out images are never trained on, and decoded images are held in a bounded cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from lowlight import fit_vae as fit_vae_module
from lowlight.config import load_config
from lowlight.data.images import encode_png
from lowlight.fit_vae import CropSampler, ImageCache, fit_vae, list_images, split_images


def _write(path: Path, side: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).random((side, side, 3))
    path.write_bytes(encode_png(image, bits=8))
    return path


def _photo_tree(root: Path) -> None:
    """A LOL-shaped folder of real photo crops: our485 trains, eval15 is the dataset's held-out split."""
    photos = {"00001": data.astronaut()[:96, :96], "00002": data.coffee()[:96, :96],
              "10001": data.chelsea()[:96, :96], "20001": data.rocket()[:96, :96]}
    for name, photo in photos.items():
        folder = "our485" if name[0] == "0" else "eval15"
        for kind, gain in (("high", 1.0), ("low", 0.1)):
            path = root / folder / kind / f"{name}_00.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(photo.astype(np.float32) / 255 * gain, bits=16))


def test_split_uses_the_dataset_evaluation_folders(tmp_path):
    _photo_tree(tmp_path)
    paths = list_images(str(tmp_path))
    split = split_images(str(tmp_path), paths, 0.1)
    assert {p.relative_to(tmp_path).parts[0] for p in split.train} == {"our485"}
    assert {p.relative_to(tmp_path).parts[0] for p in split.held_out} == {"eval15"}
    assert len(split.held_out) == 4 and sorted(split.train + split.held_out) == paths


def test_hash_split_is_deterministic_and_keeps_a_name_on_one_side(tmp_path):
    for i in range(40):
        for kind in ("low", "high"):
            _write(tmp_path / kind / f"{i:03d}.png", 8, i)
    paths = list_images(str(tmp_path))
    split = split_images(str(tmp_path), paths, 0.25)
    assert sorted(split_images(str(tmp_path), paths[::-1], 0.25).held_out) == sorted(split.held_out)
    held_names = {p.name for p in split.held_out}
    assert held_names.isdisjoint(p.name for p in split.train)  # a pair's low and high stay together
    assert 5 <= len(held_names) <= 16  # about a quarter of 40 names
    assert sorted(split.train + split.held_out) == paths


def test_hash_split_holds_out_at_least_one_name_and_refuses_to_hold_out_everything(tmp_path):
    for i in range(3):
        _write(tmp_path / f"{i}.png", 8, i)
    split = split_images(str(tmp_path), list_images(str(tmp_path)), 0.01)
    assert len(split.held_out) == 1 and len(split.train) == 2
    single = tmp_path / "single"
    _write(single / "only.png", 8, 0)
    with pytest.raises(ValueError, match="nothing is left to train on"):
        split_images(str(single), list_images(str(single)), 0.1)


def test_images_are_read_lazily_through_a_bounded_cache(tmp_path, monkeypatch):
    paths = [_write(tmp_path / f"{i}.png", 64, i) for i in range(6)]
    small = _write(tmp_path / "small.png", 16, 99)
    reads = []
    real_read = fit_vae_module.read_image
    monkeypatch.setattr(fit_vae_module, "read_image", lambda p: reads.append(p) or real_read(p))

    one_image = 64 * 64 * 3 * 4  # float32 HWC
    cache = ImageCache(max_bytes=int(2.5 * one_image))
    sampler = CropSampler(paths + [small], 32, cache, str(tmp_path))
    assert reads == []  # listing and constructing decode nothing
    rng = np.random.default_rng(0)
    for _ in range(30):
        batch = sampler.batch(4, rng)
        assert batch.shape == (4, 3, 32, 32) and -1 <= batch.min() and batch.max() <= 1
        assert cache.nbytes <= cache.max_bytes and len(cache) < len(paths)
    assert cache.peak_nbytes <= cache.max_bytes + one_image  # at most one image beyond the budget, briefly
    assert cache.loads == len(reads) > len(paths)  # evicted images are read again, not kept
    assert sampler.too_small == [small]


def test_fit_vae_reports_held_out_images_it_never_trained_on(tmp_path, monkeypatch):
    root = tmp_path / "lol"
    _photo_tree(root)
    trained_on = set()
    real_get = ImageCache.get
    monkeypatch.setattr(ImageCache, "get", lambda self, p: trained_on.add(p) or real_get(self, p))
    cfg = load_config(None, [f"fit_vae.out={tmp_path / 'vae'}", "fit_vae.steps=2", "fit_vae.batch_size=2",
                             "fit_vae.crop_size=32", "fit_vae.eval_crop=64", "fit_vae.log_every=100"])
    report = fit_vae(cfg, str(root))

    evaluated = {root / name for name in report["held_out"]["evaluated"]}
    assert len(evaluated) == report["held_out"]["images"] == 4
    assert all(p.relative_to(root).parts[0] == "eval15" for p in evaluated)
    assert trained_on and trained_on.isdisjoint(evaluated)
    assert report["recon_on"] == "held_out" and report["train_images"] == 4 and report["images"] == 8
    assert np.isfinite(report["recon_psnr_db"])
    assert json.loads((tmp_path / "vae" / "fit_report.json").read_text()) == report


def test_session_vae_was_scored_on_the_sample_sets_eval_split(fitted_vae):
    report = json.loads((fitted_vae / "fit_report.json").read_text())
    assert report["recon_on"] == "held_out" and report["held_out"]["images"] > 0
    assert all(name.startswith("eval15/") for name in report["held_out"]["evaluated"])
    assert report["image_cache"]["peak_mb"] <= report["image_cache"]["max_mb"]
