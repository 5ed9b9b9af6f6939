"""No-reference scores against values computed by hand from their definitions."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from lowlight import quality


def test_noise_sigma_recovers_added_gaussian_noise():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.2, 0.8, 256, dtype=np.float32)
    clean = np.repeat(np.add.outer(ramp, ramp)[..., None] / 2, 3, axis=2)  # smooth: the mask cancels it
    assert quality.noise_sigma(clean) < 1e-4
    for sigma in (0.01, 0.05):
        noisy = clean + rng.normal(0, sigma, clean.shape[:2])[..., None].astype(np.float32)
        assert abs(quality.noise_sigma(noisy) - sigma) < 0.1 * sigma


def test_colorfulness_of_grey_and_of_flat_red():
    assert quality.colorfulness(np.full((8, 8, 3), 0.4, np.float32)) == 0
    red = np.zeros((8, 8, 3), np.float32)
    red[..., 0] = 1
    # rg = 255, yb = 127.5, no spread: 0.3 * sqrt(255^2 + 127.5^2)
    assert abs(quality.colorfulness(red) - 0.3 * np.hypot(255, 127.5)) < 1e-6


def test_sharpness_falls_with_blur_and_brightness_is_the_mean_luminance():
    image = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    blurred = gaussian_filter(image, sigma=(2, 2, 0))
    assert quality.sharpness(blurred) < 0.05 * quality.sharpness(image)
    scores = quality.scores(np.full((16, 16, 3), (0.5, 0.25, 1.0), np.float32))
    assert abs(scores["brightness"] - (0.2126 * 0.5 + 0.7152 * 0.25 + 0.0722)) < 1e-6


def test_niqe_says_why_when_its_parameters_are_missing(monkeypatch, tmp_path):
    from pyiqa.utils import download_util

    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(tmp_path))
    result = quality.niqe(np.zeros((32, 32, 3), np.float32))
    assert isinstance(result, str) and result.startswith("unavailable") and str(tmp_path) in result
