"""AdaptBIR's IQA classification (Liu et al. 2024, Sec. 3.3): a no-reference quality score of each input
decides the dual-encoder mix k and the CSFT strength w.

The rule (the paper's classes; within the medium class the released code's k = MUSIQ / 100):

* severe (score worse than ``severe``): k = 0, w = 0, plain LAControlNet on the restoration encoder;
* mild (score at least as good as ``mild``): k = ``k_max``, w = 1;
* medium: k linear from ``k_at_severe`` at the severe threshold to ``k_max`` at the mild one, w = k / k_max.

With MUSIQ (higher is better) the thresholds are 40 and 70, k_max 0.7 and k_at_severe 0.4, so a medium
score s gives k = s / 100. MUSIQ needs weights; where they are not cached (nothing is downloaded) the
metric ``auto`` falls back to pyiqa's parameter-free PIQE (lower is better), whose thresholds, in its own
units, are calibrated on the training inputs by a stated quantile rule: the worst ``severe_fraction`` of
them are severe and the best ``mild_fraction`` mild (a third each by default, so all three classes occur).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from lowlight.iqa import NEEDS_WEIGHTS, PARAMETER_FREE, no_downloads

PREFERRED, FALLBACK = "musiq", "piqe"
MUSIQ_THRESHOLDS = (40.0, 70.0)  # severe below, mild from


class QualityOptions(BaseModel):
    """``method.options.quality`` of AdaptBIR."""

    model_config = ConfigDict(extra="forbid")

    adaptive: bool = Field(True, description="false: k = 0 and w = 0 for every input (plain LAControlNet on the "
                                             "restoration encoder)")
    metric: str = Field("auto", description="a no-reference pyiqa metric; auto: musiq if its weights are cached, "
                                            "else piqe")
    severe: float | None = Field(None, description="severe below this score (metric units; None: MUSIQ's 40, or "
                                                   "calibrated on the training inputs for another metric)")
    mild: float | None = Field(None, description="mild from this score (None: MUSIQ's 70, or calibrated)")
    k_max: float = Field(0.7, ge=0, le=1, description="k of the mild class")
    k_at_severe: float = Field(0.4, ge=0, le=1, description="k where the medium class starts (MUSIQ 40 / 100)")
    severe_fraction: float = Field(1 / 3, gt=0, lt=1, description="calibration: share of training inputs severe")
    mild_fraction: float = Field(1 / 3, gt=0, lt=1, description="calibration: share of training inputs mild")
    calibration_images: int = Field(64, ge=8, description="training inputs scored to calibrate the thresholds")


def lower_is_better(metric: str) -> bool:
    known = PARAMETER_FREE | NEEDS_WEIGHTS
    if metric not in known or known[metric][0]:
        raise ValueError(f"'{metric}' is not a no-reference metric; choose from "
                         f"{sorted(m for m, (full, _) in known.items() if not full)}")
    return known[metric][1]


@functools.lru_cache(maxsize=8)
def _pyiqa_metric(metric: str):
    import pyiqa

    with no_downloads():
        return pyiqa.create_metric(metric, device="cpu", as_loss=False).eval()


def resolve_metric(metric: str) -> str:
    """``auto`` -> musiq when its weights load without downloading, else piqe (said on stderr)."""
    if metric != "auto":
        lower_is_better(metric)
        return metric
    try:
        _pyiqa_metric(PREFERRED)
        return PREFERRED
    except Exception as e:  # noqa: BLE001 - WeightsMissing, or pyiqa's own errors for an incomplete cache
        warnings.warn(f"AdaptBIR's IQA: MUSIQ unavailable ({type(e).__name__}: {e}); using {FALLBACK} with "
                      f"thresholds calibrated on the training inputs", stacklevel=2)
        return FALLBACK


def score(images: Tensor, metric: str) -> Tensor:
    """The metric of each sRGB image in [0, 1] (N, 3, H, W) -> (N,) float32 on the images' device."""
    model = _pyiqa_metric(metric)
    device = images.device
    with torch.no_grad():
        values = model.to(device)(images.detach().float().clamp(0, 1)).flatten()
    return values.float().to(device)


def coefficients(scores: Tensor, options: QualityOptions, metric: str) -> tuple[Tensor, Tensor]:
    """(k, w) per score, by the rule in the module docstring; thresholds must be set (see ``thresholds``)."""
    if not options.adaptive:
        return torch.zeros_like(scores), torch.zeros_like(scores)
    severe, mild = options.severe, options.mild
    if severe is None or mild is None:
        raise ValueError("quality thresholds are unset: calibrate them (AdaptBIR.prepare_config) or set "
                         "method.options.quality.severe and .mild")
    if lower_is_better(metric):  # orient so that larger is better
        scores, severe, mild = -scores, -severe, -mild
    if mild <= severe:
        raise ValueError(f"quality thresholds: mild ({options.mild}) must be better than severe ({options.severe})")
    position = ((scores - severe) / (mild - severe)).clamp(0, 1)
    k = options.k_at_severe + (options.k_max - options.k_at_severe) * position
    k = torch.where(scores < severe, torch.zeros_like(k), torch.where(scores >= mild, torch.full_like(k, options.k_max), k))
    w = torch.where(scores >= mild, torch.ones_like(k), k / options.k_max if options.k_max else torch.zeros_like(k))
    return k, w


def calibrate(scores: np.ndarray, metric: str, options: QualityOptions) -> tuple[float, float]:
    """(severe, mild) thresholds in the metric's units: the ``severe_fraction`` quantile of the inputs'
    quality and the ``1 - mild_fraction`` one."""
    if options.severe_fraction + options.mild_fraction >= 1:
        raise ValueError("quality.severe_fraction + quality.mild_fraction must leave a medium class (< 1)")
    sign = -1.0 if lower_is_better(metric) else 1.0
    quality = sign * np.asarray(scores, dtype=np.float64)
    severe = float(np.quantile(quality, options.severe_fraction))
    mild = float(np.quantile(quality, 1 - options.mild_fraction))
    return sign * severe, sign * mild


def thresholds(metric: str, options: QualityOptions, training_scores: np.ndarray | None) -> tuple[float, float]:
    """The configured thresholds, else MUSIQ's for musiq, else calibrated on ``training_scores``."""
    if options.severe is not None and options.mild is not None:
        return options.severe, options.mild
    if metric == PREFERRED:
        return MUSIQ_THRESHOLDS
    if training_scores is None:
        raise ValueError(f"quality thresholds for '{metric}' need the training inputs' scores to calibrate")
    return calibrate(training_scores, metric, options)


def classes(w: Tensor) -> list[str]:
    """The class of each w: severe (0), mild (1), else medium."""
    return ["severe" if float(wi) == 0 else "mild" if float(wi) == 1 else "medium" for wi in w]
