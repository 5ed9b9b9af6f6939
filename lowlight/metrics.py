"""Image quality metrics on NCHW tensors in [0, 1] (PSNR, SSIM computed here; no weights needed), and the
least-squares brightness correction ExposureDiffusion's protocol applies before them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean PSNR (dB) over the batch, each image's MSE taken separately."""
    mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(data_range**2 / mse)).mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) over batch and channels."""
    pred, target = pred.float(), target.float()
    c = pred.shape[1]
    window = _gaussian_window().to(pred.device).expand(c, 1, 11, 11)
    blur = lambda x: F.conv2d(x, window, groups=c)
    mu_p, mu_t = blur(pred), blur(target)
    var_p = blur(pred * pred) - mu_p**2
    var_t = blur(target * target) - mu_t**2
    cov = blur(pred * target) - mu_p * mu_t
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return float(s.mean())


def least_squares_rescale(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """a * clip(prediction) per image, a minimising ||a * prediction - target||^2 over the pixels where the
    target is not saturated (the released code's ``IlluminanceCorrect``). It reads the ground truth."""
    prediction = prediction.clamp(0, 1)
    valid = (target != 1).to(prediction.dtype)
    dims = tuple(range(1, prediction.dim()))
    num = (prediction * target * valid).sum(dims, keepdim=True)
    den = (prediction * prediction * valid).sum(dims, keepdim=True).clamp_min(1e-12)
    return num / den * prediction
