"""Blind-restoration degradations of clean sRGB images (N, 3, H, W in [0, 1]), for training and evaluating
restoration beyond low light (AdaptBIR): Gaussian blur, down- and up-sampling, Gaussian noise and JPEG,
applied once (a CodeFormer-like chain, milder than CodeFormer's own ranges, as AdaptBIR's stage III uses)
or twice (Real-ESRGAN's second-order chain), each parameter drawn per image from a range; ``LEVELS`` are
fixed-strength chains for test sets (mild, medium, severe). Outputs keep the input size. Deterministic for
a given ``torch.Generator``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

MAX_KERNEL = 21  # blur taps (Real-ESRGAN's kernels are 7..21)


@dataclass(frozen=True)
class Order:
    """One pass of the chain: (low, high) ranges, each drawn uniformly per image."""

    blur_sigma: tuple[float, float]  # pixels (0: no blur)
    scale: tuple[float, float]  # resize factor before the next step (<1 loses detail)
    noise_sigma: tuple[float, float]  # in [0, 1] units
    jpeg_quality: tuple[float, float]  # 100: no JPEG


# Real-ESRGAN (Wang et al. 2021), Table/Sec. 3: first and second order, without the final x4 downscale.
REALESRGAN = (Order((0.2, 3.0), (0.15, 1.5), (1 / 255, 30 / 255), (30, 95)),
              Order((0.2, 1.5), (0.3, 1.2), (1 / 255, 25 / 255), (30, 95)))
# CodeFormer's chain (blur 0.1-10, downsample 1-8x, noise 0-20, JPEG 60-100), milder as AdaptBIR's stage III.
CODEFORMER_MILD = (Order((0.1, 3.0), (0.25, 1.0), (0.0, 10 / 255), (60, 100)),)
PIPELINES = {"realesrgan": REALESRGAN, "codeformer": CODEFORMER_MILD}


def _fixed(blur: float, scale: float, noise: float, quality: float) -> tuple[Order, ...]:
    return (Order((blur, blur), (scale, scale), (noise, noise), (quality, quality)),)


# Test-set strengths, one chain each.
LEVELS = {"mild": _fixed(0.8, 0.75, 3 / 255, 90), "medium": _fixed(1.6, 0.5, 10 / 255, 60),
          "severe": _fixed(2.6, 0.3, 22 / 255, 35)}


def _uniform(bounds: tuple[float, float], generator: torch.Generator) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (C, H, W), reflect-padded (sigma <= 0: unchanged)."""
    if sigma <= 0:
        return image
    radius = min(MAX_KERNEL // 2, max(1, math.ceil(3 * sigma)), image.shape[-1] - 1, image.shape[-2] - 1)
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    x = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x[0]


def jpeg(image: Tensor, quality: float) -> Tensor:
    """JPEG round trip of (3, H, W) through Pillow at ``quality`` (>= 100: unchanged)."""
    if quality >= 100:
        return image
    pixels = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=round(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(decoded).permute(2, 0, 1).to(image.device, image.dtype)


def _one(image: Tensor, chain: tuple[Order, ...], generator: torch.Generator) -> Tensor:
    height, width = image.shape[-2:]
    x = image
    for order in chain:
        x = gaussian_blur(x, _uniform(order.blur_sigma, generator))
        scale = _uniform(order.scale, generator)
        size = (max(8, round(x.shape[-2] * scale)), max(8, round(x.shape[-1] * scale)))
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)
        x = (x + _uniform(order.noise_sigma, generator) * noise).clamp(0, 1)
        x = jpeg(x, _uniform(order.jpeg_quality, generator))
    return F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False)[0].clamp(0, 1)


def degrade(images: Tensor, chain: str | tuple[Order, ...], generator: torch.Generator) -> Tensor:
    """Each image of (N, 3, H, W) through ``chain`` (a name of ``PIPELINES`` or ``LEVELS``, or orders)."""
    if isinstance(chain, str):
        known = {**PIPELINES, **LEVELS}
        if chain not in known:
            raise ValueError(f"unknown degradation '{chain}'; choose from {sorted(known)}")
        chain = known[chain]
    return torch.stack([_one(image.float(), chain, generator) for image in images]).to(images.dtype)
