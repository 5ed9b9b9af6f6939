"""Single-step regression (SID-style): the backbone maps the amplified input to the target.

The paper's P+G baseline for ExposureDiffusion is this method with the same backbone; on sRGB
pairs (LOL-shaped data) it is the pre-restoration network that condition refinement uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from lowlight.config import MethodConfig, ModelConfig
from lowlight.methods.base import EnhanceOptions, Method, MethodOptions, register
from lowlight.models.backbones import build_backbone


class RegressionOptions(MethodOptions):
    loss: str = Field("l1", pattern="^(l1|l2)$")


@register
class Regression(Method):
    name = "regression"
    Options = RegressionOptions

    def __init__(self, cfg: MethodConfig, options: RegressionOptions, channels: int, model: ModelConfig):
        super().__init__(cfg, options, channels, model)
        self.backbone = build_backbone(cfg.backbone, channels, channels, width=cfg.width)

    @classmethod
    def columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        if cfg.domain == "raw":
            return ("raw_in", "raw_gt", "ratio", "wb", "ccm")
        return ("srgb_in", "srgb_gt")

    def restore(self, batch: dict[str, Tensor]) -> Tensor:
        return self.backbone(self.degraded(batch))

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        pred, target = self.restore(batch), self.target(batch)
        loss = F.l1_loss(pred, target) if self.options.loss == "l1" else F.mse_loss(pred, target)
        return loss, {"loss": float(loss)}

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], opts: EnhanceOptions) -> Tensor:
        return self.restore(batch).clamp(0, 1)
