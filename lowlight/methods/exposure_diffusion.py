"""ExposureDiffusion (Wang et al., ICCV 2023): low-light raw as an intermediate state of an
exposure process.

A raw image is X = lambda*K*I + N. The input X_T is a short exposure (lambda_T = 1/ratio of the
reference). At each step the network F predicts the reference image from X_t; the next, longer
exposure is sampled physically: X_{t-1} = X_t + dX + K*dN_p with dX = (lambda_{t-1} - lambda_t) *
F(X_t) / lambda_ref and dX/K + dN_p ~ Poisson(dX/K). Training (Algorithm 1) sums the per-step
reconstruction losses and lets gradients through the Poisson draw (straight-through: sample -
mean.detach() + mean); inference (Algorithm 2) runs the same process from the input with evenly
spaced exposures and returns the last prediction.

Sampling happens in photo-electrons (normalised raw x (white - black) / K, K from the ISO via the
camera calibration); the network sees amplified normalised raw. The adaptive residual head
outputs 2C+1 channels: a soft mask M, a direct estimate X^ and a residual R^, combined as
F(X_t) = M*clip(X^) + (1 - M)*clip(ratio_t*X_t + R^).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from lowlight.config import MethodConfig, ModelConfig
from lowlight.data.calibrations import load_calibration
from lowlight.data.noise import NoiseCalibration, synthesize_low_light
from lowlight.methods.base import EnhanceOptions, Method, MethodOptions, register
from lowlight.models.backbones import build_backbone


class ExposureDiffusionOptions(MethodOptions):
    train_steps: int = Field(2, ge=1, description="T of Algorithm 1: network evaluations per training sample")
    infer_steps: int = Field(2, ge=1, description="network evaluations at inference (1 = plain regression)")
    loss: Literal["l1", "poisson_kl"] = "l1"
    noise: Literal["paired", "pg", "eld"] = Field(
        "paired", description="paired: the Parquet's raw_in is X_T; pg/eld: synthesise X_T from raw_gt on the fly")
    camera: str = Field("sony_a7s2", description="calibration (K per ISO, white/black levels)")


@register
class ExposureDiffusion(Method):
    name = "exposure_diffusion"
    Options = ExposureDiffusionOptions
    domains = ("raw",)

    def __init__(self, cfg: MethodConfig, options: ExposureDiffusionOptions, channels: int, model: ModelConfig):
        super().__init__(cfg, options, channels, model)
        self.backbone = build_backbone(cfg.backbone, channels, 2 * channels + 1, width=cfg.width)
        self.calib = NoiseCalibration.load(options.camera)
        profile = load_calibration(options.camera)["profile"]
        self.white_minus_black = float(profile["white_level"]) - float(profile["black_level"])

    @classmethod
    def columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        return ("raw_in", "raw_gt", "ratio", "iso", "wb", "ccm")

    def gain(self, batch: dict[str, Tensor]) -> Tensor:
        """K (ADU per electron) per image from its ISO; (B, 1, 1, 1)."""
        return (self.calib.k_min * batch["iso"] / self.calib.iso_at_k_min).view(-1, 1, 1, 1)

    def network(self, x_t: Tensor, exposure: Tensor) -> Tensor:
        """F(X_t) with the adaptive residual head; ``exposure`` is lambda_t relative to the reference."""
        amplified = x_t / exposure.view(-1, 1, 1, 1)
        out = self.backbone(amplified)
        c = self.channels
        mask = torch.sigmoid(out[:, :1])
        direct, residual = out[:, 1:1 + c], out[:, 1 + c:]
        return mask * direct.clamp(0, 1) + (1 - mask) * (amplified + residual).clamp(0, 1)

    def longer_exposure(self, x_t: Tensor, prediction: Tensor, exposure: Tensor, next_exposure: Tensor, k: Tensor,
                        generator: torch.Generator, straight_through: bool) -> Tensor:
        """X_{t-1} = X_t + (photons gained between the two exposures), drawn from a Poisson law."""
        delta = (next_exposure - exposure).view(-1, 1, 1, 1) * prediction.clamp_min(0)
        mean_electrons = delta * self.white_minus_black / k
        electrons = torch.poisson(mean_electrons.detach(), generator=generator)
        if straight_through:
            electrons = electrons - mean_electrons.detach() + mean_electrons
        return x_t + electrons * k / self.white_minus_black

    def input_state(self, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        if self.options.noise == "paired":
            return batch["raw_in"]
        return synthesize_low_light(batch["raw_gt"], batch["ratio"], self.calib, self.white_minus_black,
                                    self.options.noise, generator)

    def training_exposures(self, ratio: Tensor, generator: torch.Generator) -> Tensor:
        """(B, T): lambda_T = 1/ratio, then T-1 random longer exposures (log-uniform, increasing)."""
        steps = self.options.train_steps
        start = (1.0 / ratio).log()
        u = torch.rand((ratio.shape[0], steps - 1), generator=generator, device=ratio.device).sort(dim=1).values
        between = (start[:, None] * (1 - u)).exp()
        return torch.cat([start.exp()[:, None], between], dim=1)

    @staticmethod
    def inference_exposures(ratio: Tensor, steps: int) -> Tensor:
        """(B, steps): evenly spaced from lambda_T = 1/ratio towards the reference exposure."""
        start = 1.0 / ratio
        frac = torch.arange(steps, device=ratio.device, dtype=ratio.dtype) / steps
        return start[:, None] + (1 - start[:, None]) * frac[None, :]

    def reconstruction_loss(self, prediction: Tensor, target: Tensor, k: Tensor) -> Tensor:
        if self.options.loss == "l1":
            return F.l1_loss(prediction, target)
        # Eq. 11 in spirit: KL between Poisson laws of the reference photon counts, per pixel.
        a = target.clamp_min(1e-6) * self.white_minus_black / k
        b = prediction.clamp_min(1e-6) * self.white_minus_black / k
        return ((a * (a / b).log() - a + b) / (a.mean() + 1)).mean()

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        k, target = self.gain(batch), batch["raw_gt"]
        exposures = self.training_exposures(batch["ratio"], generator)
        x = self.input_state(batch, generator)
        total = torch.zeros((), device=target.device)
        logs = {}
        for t in range(exposures.shape[1]):
            prediction = self.network(x, exposures[:, t])
            step_loss = self.reconstruction_loss(prediction, target, k)
            logs[f"loss_step{t}"] = float(step_loss)
            total = total + step_loss
            if t + 1 < exposures.shape[1]:
                x = self.longer_exposure(x, prediction, exposures[:, t], exposures[:, t + 1], k, generator,
                                         straight_through=True)
        logs["loss"] = float(total)
        return total, logs

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], opts: EnhanceOptions) -> Tensor:
        steps = opts.steps or self.options.infer_steps
        generator = torch.Generator(device=batch["raw_in"].device).manual_seed(opts.seed)
        k = self.gain(batch)
        exposures = self.inference_exposures(batch["ratio"], steps)
        x = batch["raw_in"]
        prediction = x
        for t in range(steps):
            prediction = self.network(x, exposures[:, t])
            if t + 1 < steps:
                x = self.longer_exposure(x, prediction, exposures[:, t], exposures[:, t + 1], k, generator,
                                         straight_through=False)
        return prediction.clamp(0, 1)
