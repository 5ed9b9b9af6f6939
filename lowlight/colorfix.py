"""Colour correction of a diffusion output towards a reference image (StableSR / DiffBIR post-processing).

Latent diffusion tends to shift global colour and brightness; these fixes take the overall colour from
``reference`` (the condition image, resized by the caller to the output size) and keep the detail the
model generated. Images are [B, 3, H, W] in [0, 1]; results are clamped back to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COLOR_FIX_MODES = ("none", "adain", "wavelet")
_STD_EPS = 1e-5  # keeps a flat channel's std (and the division by it) finite


def _check_pair(image: Tensor, reference: Tensor) -> None:
    if image.ndim != 4 or image.shape != reference.shape:
        raise ValueError(f"image and reference must be [B,C,H,W] of one shape, got "
                         f"{tuple(image.shape)} and {tuple(reference.shape)}")


def _mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], (flat.var(-1) + _STD_EPS).sqrt()[..., None, None]


def adain_color_fix(image: Tensor, reference: Tensor) -> Tensor:
    """Adaptive instance normalisation: give each channel of ``image`` the mean and std of ``reference``'s."""
    _check_pair(image, reference)
    image_mean, image_std = _mean_std(image)
    reference_mean, reference_std = _mean_std(reference)
    return ((image - image_mean) / image_std * reference_std + reference_mean).clamp(0, 1)


def _blur(x: Tensor, dilation: int) -> Tensor:
    """3x3 binomial ('à trous' B1-spline) blur with holes of ``dilation``, edges replicated."""
    binomial = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    kernel = torch.outer(binomial, binomial).expand(x.shape[1], 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=x.shape[1], dilation=dilation)


def wavelet_split(x: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """(high, low) with high + low == x: ``low`` after ``levels`` blurs with dilation 1, 2, 4, ...
    (the à trous wavelet transform); ``high`` is the sum of the detail bands removed on the way."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    low = x
    for level in range(levels):
        low = _blur(low, 2**level)
    return x - low, low


def wavelet_color_fix(image: Tensor, reference: Tensor, levels: int = 5) -> Tensor:
    """``image``'s detail bands on ``reference``'s low-frequency residual."""
    _check_pair(image, reference)
    image_high, _ = wavelet_split(image, levels)
    _, reference_low = wavelet_split(reference, levels)
    return (image_high + reference_low).clamp(0, 1)


def color_fix(image: Tensor, reference: Tensor, mode: str) -> Tensor:
    if mode == "none":
        return image
    if mode == "adain":
        return adain_color_fix(image, reference)
    if mode == "wavelet":
        return wavelet_color_fix(image, reference)
    raise ValueError(f"color fix mode {mode!r} is not one of {COLOR_FIX_MODES}")
