"""The simple ISP of ``lowlight.data.raw.simple_isp`` on batched torch tensors (any device).

Used to render raw predictions to sRGB for metrics and display; it reproduces LibRaw's
half-size render (white balance, per-channel clip, green average, colour matrix, rawpy's
default BT.709-shaped curve).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowlight.data.raw import DEFAULT_GAMMA, _gamma_params


def display_curve(linear: Tensor, gamma: tuple[float, float] = DEFAULT_GAMMA) -> Tensor:
    threshold, offset = _gamma_params(*gamma)
    x = linear.clamp(0.0, 1.0)
    curve = (1 + offset) * x.clamp_min(threshold).pow(1 / gamma[0]) - offset
    return torch.where(x < threshold, x * gamma[1], curve)


def render(packed: Tensor, wb: Tensor, ccm: Tensor) -> Tensor:
    """(B, 4, h, w) normalised raw (R, G1, B, G2) -> (B, 3, h, w) display sRGB in [0, 1]."""
    wb = wb / wb.min(dim=1, keepdim=True).values
    gains = torch.stack([wb[:, 0], wb[:, 1], wb[:, 2], wb[:, 1]], dim=1)[:, :, None, None]
    balanced = (packed * gains).clamp(0.0, 1.0)
    lin = torch.stack([balanced[:, 0], 0.5 * (balanced[:, 1] + balanced[:, 3]), balanced[:, 2]], dim=1)
    return display_curve(torch.einsum("bij,bjhw->bihw", ccm, lin))


def linear_rgb(packed: Tensor, wb: Tensor, ratio: Tensor) -> Tensor:
    """``lowlight.data.raw.linear_rgb`` on a batch: (B, 4, h, w) packed raw, (B, 3) white balance with
    G = 1, (B,) ratios -> (B, 3, h, w) amplified, white-balanced, clipped, greens averaged."""
    gains = torch.stack([wb[:, 0], wb[:, 1], wb[:, 2], wb[:, 1]], dim=1) * ratio.view(-1, 1)
    balanced = (packed * gains[:, :, None, None]).clamp(0.0, 1.0)
    return torch.stack([balanced[:, 0], 0.5 * (balanced[:, 1] + balanced[:, 3]), balanced[:, 2]], dim=1)


def demosaic(half: Tensor) -> Tensor:
    """(B, C, h, w) packed-resolution planes (linear RGB or RGBG) -> (B, C, 2h, 2w): the simple bilinear
    demosaic DarkDiff's pipeline applies before its VAE."""
    return F.interpolate(half.float(), scale_factor=2, mode="bilinear", align_corners=False)
