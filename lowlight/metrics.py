"""Image quality metrics on NCHW tensors."""

from __future__ import annotations

import torch


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean PSNR (dB) over the batch, each image's MSE taken separately."""
    mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(data_range**2 / mse)).mean())
