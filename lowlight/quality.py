"""No-reference quality scores of one enhanced sRGB image (HWC float in [0, 1]): what a demo can show
without a ground truth. The weight-free scores are computed here; pyiqa's NIQE (through ``iqa``, which
never downloads) is added when its parameter file is already cached, otherwise it is reported as
unavailable with the reason.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy.ndimage import convolve

from lowlight.iqa import build_metrics

LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)  # BT.709
LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
# Immerkaer's mask: the difference of two Laplacians, which cancels image structure up to second order.
IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def luminance(image: np.ndarray) -> np.ndarray:
    return image[..., :3].astype(np.float32) @ LUMA


def noise_sigma(image: np.ndarray) -> float:
    """Immerkaer (1996), 'Fast noise variance estimation': the standard deviation of additive white
    Gaussian noise in the luminance, in [0, 1] units."""
    y = luminance(image)
    h, w = y.shape
    if h < 3 or w < 3:
        return 0.0
    response = np.abs(convolve(y, IMMERKAER, mode="nearest")[1:-1, 1:-1])
    return float(math.sqrt(math.pi / 2) * response.sum() / (6 * (w - 2) * (h - 2)))


def colorfulness(image: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness on 0-255 RGB (0 for grey; about 100 for very vivid)."""
    rgb = image[..., :3].astype(np.float64) * 255
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def sharpness(image: np.ndarray) -> float:
    """Variance of the luminance Laplacian (Pech-Pacheco et al. 2000), in [0, 1] units squared."""
    return float(convolve(luminance(image), LAPLACIAN, mode="nearest").var())


@functools.lru_cache(maxsize=4)
def _niqe_metric(cache_dir: str):
    """pyiqa's NIQE built once per cache folder (the replica scores every request with it)."""
    metrics, unavailable = build_metrics(["niqe"])
    return metrics.get("niqe"), unavailable.get("niqe")


def niqe(image: np.ndarray) -> float | str:
    """pyiqa's NIQE (lower is better), or why it is unavailable."""
    from pyiqa.utils import download_util

    metric, reason = _niqe_metric(download_util.DEFAULT_CACHE_DIR)
    if metric is None:
        return reason
    batch = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
    return float(metric.compute(batch, batch)[0])


def scores(image: np.ndarray) -> dict[str, float | str]:
    return {"brightness": float(luminance(image).mean()), "noise_sigma": noise_sigma(image),
            "sharpness": sharpness(image), "colorfulness": colorfulness(image), "niqe": niqe(image)}
