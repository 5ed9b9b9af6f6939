"""Stage-1 restoration: a trained non-diffusion sRGB method (e.g. ``regression`` on LOL-style pairs) run
on the low-light input. Its output is the condition a latent method starts from: DiffBIR feeds its
ControlNet a stage-1 cleaned image, condition refinement's initially enhanced image I_di is one, and the
colour fix needs a restored reference rather than the dark input.

``preprocess.pre_restore: CHECKPOINT`` writes ``srgb_pre`` (this output) and ``z_pre`` (its VAE latent)
into the Parquet; ``lowlight enhance`` runs the same checkpoint on a file when the method's config
names it, so training and inference see the same condition.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lowlight.checkpoint import load_method
from lowlight.config import ConfigError
from lowlight.methods import EnhanceOptions


class PreRestorer:
    """The stage-1 method of a checkpoint (local or s3://), on one device, in eval mode."""

    def __init__(self, checkpoint: str, endpoint_url: str | None = None, device: str | torch.device = "cpu"):
        from lowlight.enhance import local_checkpoint
        from lowlight.methods.latent import LatentDiffusionMethod

        cfg, method = load_method(local_checkpoint(checkpoint, endpoint_url))
        if isinstance(method, LatentDiffusionMethod) or cfg.method.domain != "srgb":
            raise ConfigError(f"config key 'preprocess.pre_restore': '{checkpoint}' holds '{cfg.method.name}' "
                              f"({cfg.method.domain}); stage 1 must be a non-diffusion sRGB method, e.g. "
                              f"regression trained with method.domain=srgb")
        self.method = method.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, srgb_in: Tensor) -> Tensor:
        """sRGB [N, 3, H, W] in [0, 1] -> the restored sRGB, same shape, in [0, 1]."""
        out = self.method.enhance({"srgb_in": srgb_in.to(self.device, torch.float32)}, EnhanceOptions())
        return out.to(srgb_in.device, torch.float32)

    def restore_rows(self, srgb_in: np.ndarray, batch_size: int) -> np.ndarray:
        """Columnar float16 crops -> their restored float16 crops, ``batch_size`` at a time."""
        parts = [self(torch.from_numpy(srgb_in[i:i + batch_size].astype(np.float32))).numpy().astype(np.float16)
                 for i in range(0, len(srgb_in), batch_size)]
        return np.concatenate(parts)


def with_stage1(batch: dict[str, Tensor], checkpoint: str, encode, endpoint_url: str | None = None
                ) -> dict[str, Tensor]:
    """A file's batch with ``srgb_pre`` and ``z_pre`` (``encode``: the latent method's VAE encoder), as
    preprocessing made them for training."""
    restored = PreRestorer(checkpoint, endpoint_url, batch["srgb_in"].device)(batch["srgb_in"])
    with torch.no_grad():
        return {**batch, "srgb_pre": restored, "z_pre": encode(restored)}
