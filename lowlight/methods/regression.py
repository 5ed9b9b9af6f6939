"""Single-step regression (SID-style): the backbone maps the amplified input to the target.

The paper's P+G baseline for ExposureDiffusion is this method with the same backbone and the same
training inputs (``noise: pg``, :mod:`lowlight.methods.short_exposure`); on sRGB pairs (LOL-shaped
data) it is the pre-restoration network that condition refinement uses. By default the backbone
predicts a correction added to its input (``residual``), the global input residual of the NAFNet in
ExposureDiffusion's released code (``models/arch/NAFNet.py``: ``x + inp``), so a gain of
ExposureDiffusion over this baseline does not come from its residual branch alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from lowlight.config import ConfigError, MethodConfig, ModelConfig
from lowlight.methods.base import EnhanceOptions, Method, register
from lowlight.methods.short_exposure import ShortExposureOptions, ShortExposureSource
from lowlight.models.backbones import build_backbone


class RegressionOptions(ShortExposureOptions):
    loss: str = Field("l1", pattern="^(l1|l2)$")
    residual: bool = Field(True, description="output = input + backbone(input) (global input residual)")


@register
class Regression(Method):
    name = "regression"
    Options = RegressionOptions

    def __init__(self, cfg: MethodConfig, options: RegressionOptions, channels: int, model: ModelConfig):
        super().__init__(cfg, options, channels, model)
        self.backbone = build_backbone(cfg.backbone, channels, channels, width=cfg.width)
        if cfg.domain == "raw":
            self.inputs = ShortExposureSource(options)
        elif options.noise != "paired":
            raise ConfigError(f"config key 'method.options.noise': '{options.noise}' synthesises raw noise; "
                              "the sRGB domain trains on its pairs only ('paired')")

    @classmethod
    def columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        if cfg.domain == "raw":
            return ("raw_in", "raw_gt", "ratio", "iso", "wb", "ccm")
        return ("srgb_in", "srgb_gt")

    def restore(self, degraded: Tensor) -> Tensor:
        out = self.backbone(degraded)
        return degraded + out if self.options.residual else out

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        if self.cfg.domain == "raw":
            short = self.inputs.training(batch, generator)
            degraded, target = short.amplified(), short.target
        else:
            degraded, target = self.degraded(batch), self.target(batch)
        pred = self.restore(degraded)
        loss = F.l1_loss(pred, target) if self.options.loss == "l1" else F.mse_loss(pred, target)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], opts: EnhanceOptions) -> Tensor:
        return self.restore(self.degraded(batch)).clamp(0, 1)
