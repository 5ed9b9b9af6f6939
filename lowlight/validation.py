"""Validation during training: metrics on held-out rows and an image grid next to the checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lowlight.data.images import encode_png
from lowlight.methods import EnhanceOptions, Method
from lowlight.metrics import psnr, ssim


def _batches(rows: dict[str, torch.Tensor], size: int, device: torch.device):
    n = next(iter(rows.values())).shape[0]
    for start in range(0, n, size):
        yield {k: v[start:start + size].to(device) for k, v in rows.items()}


@torch.no_grad()
def validate(method: Method, rows: dict[str, torch.Tensor], batch_size: int, device: torch.device) -> dict[str, float]:
    """PSNR/SSIM in the method's domain and on rendered sRGB, for the output and the plain input."""
    method.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in _batches(rows, batch_size, device):
        pred, target, degraded = method.predict(batch, EnhanceOptions()), method.target(batch), method.degraded(batch)
        n = pred.shape[0]
        scores = {"val_psnr": psnr(pred, target), "val_ssim": ssim(pred, target),
                  "val_input_psnr": psnr(degraded, target)}
        if method.output_domain == "raw":
            pred_srgb, target_srgb = method.to_srgb(pred, batch), method.to_srgb(target, batch)
            scores |= {"val_psnr_srgb": psnr(pred_srgb, target_srgb), "val_ssim_srgb": ssim(pred_srgb, target_srgb),
                       "val_input_psnr_srgb": psnr(method.to_srgb(degraded, batch), target_srgb)}
        for k, v in scores.items():
            sums[k] = sums.get(k, 0.0) + v * n
        count += n
    method.train()
    return {k: v / count for k, v in sums.items()}


@torch.no_grad()
def sample_grid(method: Method, rows: dict[str, torch.Tensor], count: int, device: torch.device, path: Path) -> None:
    """A PNG with one row per image: input (amplified) | output | target, all as sRGB."""
    method.eval()
    batch = {k: v[:count].to(device) for k, v in rows.items()}
    pred = method.predict(batch, EnhanceOptions())
    panels = [method.to_srgb(x, batch) for x in (method.degraded(batch), pred, method.target(batch))]
    grid = torch.cat([torch.cat(list(p), dim=2) for p in zip(*panels, strict=True)], dim=1)
    method.train()
    path.write_bytes(encode_png(np.ascontiguousarray(grid.permute(1, 2, 0).float().cpu().numpy()), bits=8))
