"""The conditioning baselines the seed papers compare with, on one Stable Diffusion bundle:

* ``sd_concat``: z_in concatenated with the noisy latent at the UNet input (InstructPix2Pix;
  its image-condition dropout of 5 % by default, for guidance);
* ``sd_controlnet``: a ControlNet fed the low-light sRGB image, the UNet frozen;
* ``lacontrolnet``: DiffBIR's latent ControlNet fed the condition latent (z_in, or z_pre, the
  latent of a pre-enhanced image, when the Parquet has it), the UNet frozen.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import Tensor

from lowlight.methods.base import register
from lowlight.methods.latent import LatentDiffusionMethod, LatentDiffusionOptions
from lowlight.models.control import conditioned_output, expand_conv_in, latent_controlnet, pixel_controlnet


class ConcatOptions(LatentDiffusionOptions):
    cond_dropout: float = Field(0.05, ge=0, le=1, description="InstructPix2Pix drops the image condition 5 % of the time")


class ControlOptions(LatentDiffusionOptions):
    control_scale: float = Field(1.0, ge=0, description="multiplies every ControlNet residual")


@register
class SDConcat(LatentDiffusionMethod):
    name = "sd_concat"
    Options = ConcatOptions
    default_trainable: ClassVar[tuple[str, ...]] = ("unet",)

    def build_conditioning(self) -> None:
        expand_conv_in(self.unet, self.bundle.vae.config.latent_channels)

    def denoise(self, x_t: Tensor, t: Tensor, hint: Tensor) -> Tensor:
        return conditioned_output("concat", self.unet, x_t, t, self.prompt(x_t.shape[0], x_t), hint)


@register
class SDControlNet(LatentDiffusionMethod):
    name = "sd_controlnet"
    Options = ControlOptions
    default_trainable: ClassVar[tuple[str, ...]] = ("controlnet",)

    def build_conditioning(self) -> None:
        self.controlnet = pixel_controlnet(self.unet)
        self.hint_scale = self.bundle.latent_factor

    def hint(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["srgb_in"]

    def denoise(self, x_t: Tensor, t: Tensor, hint: Tensor) -> Tensor:
        return conditioned_output("controlnet", self.unet, x_t, t, self.prompt(x_t.shape[0], x_t), hint,
                                  self.controlnet, self.options.control_scale)


@register
class LatentControlNet(LatentDiffusionMethod):
    name = "lacontrolnet"
    Options = ControlOptions
    default_trainable: ClassVar[tuple[str, ...]] = ("controlnet",)

    def build_conditioning(self) -> None:
        self.controlnet = latent_controlnet(self.unet, self.bundle.vae.config.latent_channels)

    def hint(self, batch: dict[str, Tensor]) -> Tensor:
        return self.start_latent(batch)

    def start_latent(self, batch: dict[str, Tensor]) -> Tensor:
        """The stage-1 restoration's latent when the data has it (DiffBIR's condition), else the input's."""
        return batch["z_pre"] if "z_pre" in batch else self.condition_latent(batch)

    def denoise(self, x_t: Tensor, t: Tensor, hint: Tensor) -> Tensor:
        return conditioned_output("latent_controlnet", self.unet, x_t, t, self.prompt(x_t.shape[0], x_t), hint,
                                  self.controlnet, self.options.control_scale)
