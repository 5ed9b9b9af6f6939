"""Evaluation: metrics agree with skimage's and pyiqa's own implementations, a metric without its
weights is reported unavailable with the reason, and `evaluate` scores checkpoints through Ray Data,
writes the report and resumes from its cached scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lowlight.evaluate import evaluate
from lowlight.iqa import build_metrics
from lowlight.metrics import least_squares_rescale, psnr, ssim


@pytest.fixture(scope="module")
def image_pair() -> tuple[np.ndarray, np.ndarray]:
    clean = skdata.astronaut()[100:228, 150:278].astype(np.float32) / 255
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)
    return clean, noisy


def _nchw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.transpose(2, 0, 1).copy())[None]


def test_psnr_and_ssim_match_skimage(image_pair):
    clean, noisy = image_pair
    assert abs(psnr(_nchw(noisy), _nchw(clean)) - peak_signal_noise_ratio(clean, noisy, data_range=1)) < 1e-3
    reference = structural_similarity(clean, noisy, data_range=1, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert abs(ssim(_nchw(noisy), _nchw(clean)) - reference) < 2e-3


def test_pyiqa_metrics_match_pyiqa_and_missing_weights_are_named(image_pair, tmp_path, monkeypatch):
    import pyiqa
    from pyiqa.utils import download_util

    clean, noisy = _nchw(image_pair[0]), _nchw(image_pair[1])
    metrics, unavailable = build_metrics(["fsim", "piqe"])
    assert not unavailable
    assert abs(float(metrics["fsim"].compute(noisy, clean)[0]) - float(pyiqa.create_metric("fsim")(noisy, clean))) < 1e-5
    assert abs(float(metrics["piqe"].compute(noisy, clean)[0]) - float(pyiqa.create_metric("piqe")(noisy))) < 1e-3
    # NIQE must never be computed from a file that is not there (nor downloaded): it is reported instead.
    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(tmp_path))
    metrics, unavailable = build_metrics(["niqe", "no_such_metric"])
    assert not metrics
    assert "niqe_modelparameters.mat" in unavailable["niqe"] and str(tmp_path) in unavailable["niqe"]
    assert "unknown metric" in unavailable["no_such_metric"]


def test_least_squares_rescale_recovers_a_brightness_factor():
    target = torch.rand(2, 4, 16, 16) * 0.5
    fitted = least_squares_rescale(target * torch.tensor([0.25, 2.0]).view(2, 1, 1, 1), target)
    torch.testing.assert_close(fitted, target, atol=1e-6, rtol=1e-5)


def test_evaluate_scores_every_model_and_writes_the_report(evaluated, raw_data):
    from lowlight.data.parquet import read_split

    out, _, summary = evaluated
    test_ids = read_split(str(raw_data), "test", ["id"])["id"]
    assert [m["method"] for m in summary["models"]] == ["regression", "exposure_diffusion"]
    for model in summary["models"]:
        assert [r["id"] for r in model["rows"]] == sorted(str(i) for i in test_ids)
        assert {"psnr_raw", "psnr_raw_ls", "ssim_srgb", "fsim", "piqe"} <= set(model["mean"])
        assert "lpips" not in model["mean"]
        assert all(r["psnr_raw_ls"] >= r["psnr_raw"] - 1e-6 for r in model["rows"])  # the fit can only help
        assert model["seconds_per_image"] > 0 and model["peak_rss_mb"] > 100
        assert len(model["previews"]) == 2
    assert "lpips" in summary["unavailable"]
    md = (out / "report.md").read_text()
    assert "| regression |" in md and "| exposure_diffusion |" in md and "**" in md and "lpips" in md
    assert (out / "report.html").stat().st_size > 10_000


def test_evaluate_resumes_from_cached_scores(evaluated, raw_checkpoints, raw_data):
    out, settings, first = evaluated
    cached = sorted((out / "scores").glob("*.json"))
    before = [p.stat().st_mtime_ns for p in cached]
    again = evaluate(raw_checkpoints, str(raw_data), out, settings, progress=lambda _: None)
    assert [p.stat().st_mtime_ns for p in cached] == before
    assert json.dumps(again["models"], sort_keys=True) == json.dumps(first["models"], sort_keys=True)
