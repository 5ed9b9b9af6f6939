"""The short exposure a raw-domain method learns from: a real pair's, or one drawn from the long exposure.

``paired``: the Parquet's ``raw_in`` at the row's ratio, K from the row's ISO. ``pg`` / ``eld``: a fresh
short exposure every training step, synthesised from ``raw_gt`` with the calibrated noise model at a
ratio drawn uniformly in ``ratio_range`` (ExposureDiffusion's ``--continuous_noise``: [20, 300]) and a
gain K drawn log-uniformly over the calibration (as ELD and ExposureDiffusion's released code do) or
taken from the row's ISO; the result is clipped to [0, 1] like the Parquet's ``raw_in`` (black-level
subtracted, clipped at black and white). The K returned is the one the noise was drawn with, so a
method's own Poisson steps use the same gain. Evaluation always reads the real pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from lowlight.data.calibrations import load_calibration
from lowlight.data.noise import NoiseCalibration, gain_for_iso, sample_noise_params, synthesize_low_light
from lowlight.methods.base import MethodOptions


class ShortExposureOptions(MethodOptions):
    noise: Literal["paired", "pg", "eld"] = Field(
        "paired", description="paired: the Parquet's raw_in; pg/eld: drawn from raw_gt at every step")
    ratio_range: tuple[float, float] | None = Field(
        (20.0, 300.0), description="pg/eld: ratio drawn uniformly in [low, high]; null: the row's ratio")
    gain: Literal["random", "iso"] = Field(
        "random", description="pg/eld: K log-uniform over the calibration, or from the row's ISO")
    flips: bool = Field(True, description="random flips per image (and transposes for pg/eld)")
    camera: str = Field("sony_a7s2", description="calibration (K per ISO, noise model, white/black levels)")

    @model_validator(mode="after")
    def _ordered_range(self):
        if self.ratio_range is not None and not 1 <= self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be [low, high] with 1 <= low <= high, "
                             f"got {list(self.ratio_range)}")
        return self


@dataclass
class ShortExposure:
    """A batch's input: ``x`` normalised raw at 1/``ratio`` of the reference exposure (not amplified)."""

    x: Tensor  # (B, C, h, w)
    ratio: Tensor  # (B,)
    k: Tensor  # (B,) ADU per photo-electron
    target: Tensor | None  # (B, C, h, w) the long exposure, flipped like x; None when the batch has none

    def amplified(self) -> Tensor:
        """The network input SID uses: the short exposure brought to the reference's brightness, in [0, 1]."""
        return (self.x * self.ratio.view(-1, 1, 1, 1)).clamp(0, 1)


def random_flips(images: list[Tensor], generator: torch.Generator, transpose: bool) -> list[Tensor]:
    """The same random flips (and transpose, for square crops) per image applied to every tensor."""
    b = images[0].shape[0]
    draws = torch.rand((b, 3), generator=generator, device=generator.device) < 0.5
    draws = draws.to(images[0].device).view(b, 3, 1, 1, 1)
    out = []
    for x in images:
        x = torch.where(draws[:, 0], x.flip(-1), x)
        x = torch.where(draws[:, 1], x.flip(-2), x)
        if transpose and x.shape[-1] == x.shape[-2]:
            x = torch.where(draws[:, 2], x.transpose(-1, -2), x)
        out.append(x)
    return out


class ShortExposureSource:
    """A batch's :class:`ShortExposure`, for training (augmented, maybe synthetic) or for inference."""

    def __init__(self, options: ShortExposureOptions):
        self.options = options
        self.calib = NoiseCalibration.load(options.camera)
        profile = load_calibration(options.camera)["profile"]
        self.white_minus_black = float(profile["white_level"]) - float(profile["black_level"])

    def gain(self, iso: Tensor) -> Tensor:
        return gain_for_iso(self.calib, iso.float())

    def inference(self, batch: dict[str, Tensor]) -> ShortExposure:
        raw_in = batch["raw_in"].float()
        target = batch["raw_gt"].float() if "raw_gt" in batch else None
        return ShortExposure(raw_in, batch["ratio"].float(), self.gain(batch["iso"]), target)

    def training(self, batch: dict[str, Tensor], generator: torch.Generator) -> ShortExposure:
        opts = self.options
        target = batch["raw_gt"].float()
        if opts.noise == "paired":
            x = batch["raw_in"].float()
            if opts.flips:  # no transpose: it would turn real row noise into column noise
                x, target = random_flips([x, target], generator, transpose=False)
            return ShortExposure(x, batch["ratio"].float(), self.gain(batch["iso"]), target)
        if opts.flips:
            (target,) = random_flips([target], generator, transpose=True)
        b = target.shape[0]
        if opts.ratio_range is None:
            ratio = batch["ratio"].float()
        else:
            low, high = opts.ratio_range
            ratio = low + (high - low) * torch.rand(b, generator=generator, device=generator.device)
        k = None if opts.gain == "random" else self.gain(batch["iso"])
        params = sample_noise_params(self.calib, b, generator, k=k)
        x = synthesize_low_light(target, ratio, self.calib, self.white_minus_black, opts.noise, generator,
                                 params=params)
        return ShortExposure(x.clamp(0, 1), ratio.to(target.device), params.k.to(target.device), target)
