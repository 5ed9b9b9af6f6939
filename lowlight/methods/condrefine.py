"""Condition refinement (Xu et al., "Boosting Fidelity for Pre-Trained-Diffusion-Based Low-Light Image
Enhancement via Condition Refinement"): a plug-in around a conditioning baseline (``lacontrolnet`` by
default, ``sd_controlnet``, ``sd_concat``) that improves the condition latent it is given.

From the low-light image I_dl (``srgb_in``), the stage-1 restoration's I_di (``srgb_pre``) and the
condition latent l_c (``z_pre`` = E(I_di), or ``z_in`` with ``condition: input``):
t_i = space-to-depth(I_di), t_l = E_v(I_dl); the latent prior eps_theta generates h_hat (the pyramidal
target h_m of l_m = z_gt), the predictor gamma gives l_hat = l_c + w * b; at every denoiser call the
interaction beta(x_t, l_hat) gives residuals, and the baseline's denoiser runs on (x_t + dx, l_hat + dm)
(a pixel ControlNet gets D(l_hat + dm)). Loss: L_diff + lambda1 (L_g + L_r) + lambda2 (L_gp + L_rp), the
pixel terms through the frozen VAE decoder. Inputs are padded (bottom/right, edge replicated) to a latent
multiple of 16 for the pyramid and cropped back. Every ablation of the paper's Table 13 is an option
(``lowlight/configs/ablations/condrefine.yaml``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from lowlight.config import STAGE1_COLUMNS, MethodConfig
from lowlight.methods.base import MethodOptions, register
from lowlight.methods.latent import LatentDiffusionMethod, LatentDiffusionOptions
from lowlight.models.condition_refinement import (
    MULTIPLE,
    PYRAMID_FACTORS,
    Interaction,
    LatentPredictor,
    LatentPrior,
    VisualEncoder,
    pad_to,
    parameter_count,
    pyramid,
    unshuffled_channels,
)
from lowlight.models.control import conditioned_output, expand_conv_in, latent_controlnet, pixel_controlnet

PRIOR_SEED = 0  # the prior's starting noise at inference
BASELINE_KINDS = {"lacontrolnet": "latent_controlnet", "sd_controlnet": "controlnet", "sd_concat": "concat"}
REFINEMENT_MODULES = ("visual_encoder", "prior", "predictor", "interaction")


class CondRefineOptions(LatentDiffusionOptions):
    baseline: Literal["lacontrolnet", "sd_controlnet", "sd_concat"] = "lacontrolnet"
    control_scale: float = Field(1.0, ge=0, description="multiplies every ControlNet residual")
    condition: Literal["pre", "input"] = Field("pre", description="l_c: the stage-1 output's latent z_pre, or z_in")
    prior_steps: int = Field(4, ge=1, description="T of the latent prior (DiffIR's schedule)")
    lambda1: float = Field(1.0, ge=0, description="weight of the latent losses L_g + L_r")
    lambda2: float = Field(1.0, ge=0, description="weight of the pixel losses L_gp + L_rp (0: 'w/o PL')")
    use_ti: bool = Field(True, description="t_i, the space-to-depth stage-1 image ('w/o t_i')")
    use_tl: bool = Field(True, description="t_l, the visual encoder's features ('w/o t_l')")
    prior: Literal["diffusion", "regression", "none"] = Field(
        "diffusion", description="the generative prior, a same-size regression ('w/o gen.') or none ('w/o prior')")
    pyramid: bool = Field(True, description="pyramidal prior target ('w/o pyramid': l_m alone)")
    interact: bool = Field(True, description="bidirectional interaction in the sampler ('w/o interact')")
    attention: bool = Field(True, description="the weight map w ('w/o att.': l_hat = l_c + b)")
    simple: bool = Field(False, description="plain convolutions instead of Swin-Conv layers")


@register
class CondRefine(LatentDiffusionMethod):
    name = "condrefine"
    Options: ClassVar[type[MethodOptions]] = CondRefineOptions
    options: CondRefineOptions

    @classmethod
    def columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        return ("z_in", "z_gt", "srgb_in", "srgb_gt", *STAGE1_COLUMNS)

    @property
    def default_trainable(self) -> tuple[str, ...]:
        baseline = "unet" if self.options.baseline == "sd_concat" else "controlnet"
        return (baseline, *(m for m in REFINEMENT_MODULES if hasattr(self, m)))

    def build_conditioning(self) -> None:
        o = self.options
        channels, factor = self.bundle.vae.config.latent_channels, self.bundle.latent_factor
        if o.baseline == "sd_concat":
            expand_conv_in(self.unet, channels)
        elif o.baseline == "sd_controlnet":
            self.controlnet = pixel_controlnet(self.unet)
        else:
            self.controlnet = latent_controlnet(self.unet, channels)
        condition = channels + (unshuffled_channels(factor) if o.use_ti else 0) + (64 if o.use_tl else 0)
        if o.use_tl:
            self.visual_encoder = VisualEncoder(simple=o.simple)
        prior_channels = channels * (len(PYRAMID_FACTORS) if o.pyramid else 1)
        if o.prior != "none":
            self.prior = LatentPrior(prior_channels, condition, o.prior_steps, simple=o.simple,
                                     generative=o.prior == "diffusion")
        self.predictor = LatentPredictor(condition + (prior_channels if o.prior != "none" else 0), channels,
                                         simple=o.simple, attention=o.attention)
        if o.interact:
            self.interaction = Interaction(channels, simple=o.simple)

    def extra_parameters(self) -> int:
        """Parameters the plug-in adds to its baseline."""
        return sum(parameter_count(getattr(self, m)) for m in REFINEMENT_MODULES if hasattr(self, m))

    def base_condition(self, batch: dict[str, Tensor]) -> Tensor:
        """l_c: the stage-1 output's latent when configured and present, else the input's."""
        if self.options.condition == "pre" and "z_pre" in batch:
            return batch["z_pre"]
        return self.condition_latent(batch)

    def refine(self, batch: dict[str, Tensor], generator: torch.Generator | None,
               target: Tensor | None = None) -> dict[str, Tensor]:
        """{"refined": l_hat, "prior": h_hat (when there is a prior), "target": h_m (when ``target``)} at the
        latent's own size; ``target`` (z_gt) makes the prior start from its forward-noised pyramid."""
        o = self.options
        l_c = self.base_condition(batch).float()
        height, width = l_c.shape[-2:]
        factor = self.bundle.latent_factor
        padded = pad_to(l_c, MULTIPLE)
        parts = [padded]
        if o.use_ti:
            parts.append(F.pixel_unshuffle(pad_to(batch.get("srgb_pre", batch["srgb_in"]).float(), MULTIPLE * factor),
                                           factor))
        if o.use_tl:
            parts.append(self.visual_encoder(pad_to(batch["srgb_in"].float(), MULTIPLE * factor)))
        condition = torch.cat(parts, dim=1)
        out: dict[str, Tensor] = {}
        inputs, start = condition, None
        if target is not None:
            goal = pad_to(target.float(), MULTIPLE)
            start = pyramid(goal) if o.pyramid else goal
            out["target"] = start[..., :height, :width]
        if o.prior != "none":
            prior = self.prior(condition, start, generator)
            out["prior"] = prior[..., :height, :width]
            inputs = torch.cat([prior, condition], dim=1)
        out["refined"] = self.predictor(inputs, padded)[..., :height, :width]
        return out

    def hint(self, batch: dict[str, Tensor]) -> Tensor:
        """The refined condition latent, the prior started from a fixed noise (inference)."""
        generator = torch.Generator(device=batch["srgb_in"].device).manual_seed(PRIOR_SEED)
        return self.refine(batch, generator)["refined"]

    def start_latent(self, batch: dict[str, Tensor]) -> Tensor:
        return self.base_condition(batch)

    def denoise(self, x_t: Tensor, t: Tensor, hint: Tensor) -> Tensor:
        """The baseline's denoiser on (x_t + dx, l_hat + dm); ``hint`` is l_hat, cropped to the tile."""
        if self.options.interact:
            dx, dm = self.interaction(x_t.float(), hint.float())
            x_t, hint = x_t + dx.to(x_t.dtype), hint + dm.to(hint.dtype)
        kind = BASELINE_KINDS[self.options.baseline]
        if kind == "controlnet":
            hint = self.bundle.decode(hint)  # the pixel ControlNet sees the refined condition as an image
        return conditioned_output(kind, self.unet, x_t, t, self.prompt(x_t.shape[0], x_t), hint,
                                  getattr(self, "controlnet", None), self.options.control_scale)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        o = self.options
        z0 = batch["z_gt"]
        n, device = z0.shape[0], z0.device
        noise = torch.randn(z0.shape, generator=generator, device=device)
        t = torch.randint(0, self.schedule.num_train_timesteps, (n,), generator=generator, device=device)
        refined = self.refine(batch, generator, target=z0)
        x_t = self.schedule.add_noise(z0, noise, t)
        out = self.denoise(x_t, t, refined["refined"]).float()
        diffusion = F.mse_loss(out, self.schedule.target(z0, noise, t))
        latent_loss = F.mse_loss(refined["refined"], z0)
        logs = {"loss_diffusion": float(diffusion.detach()), "loss_refined": float(latent_loss.detach())}
        if "prior" in refined:
            prior_loss = F.mse_loss(refined["prior"], refined["target"])
            latent_loss = latent_loss + prior_loss
            logs["loss_prior"] = float(prior_loss.detach())
        loss = diffusion + o.lambda1 * latent_loss
        if o.lambda2:
            with torch.no_grad():
                clean = self.bundle.decode(z0)
            pixel = F.l1_loss(self.bundle.decode(refined["refined"]), clean)
            if "prior" in refined:  # h_m's first level is l_m itself, so D(h_m[:4]) is the clean decode
                pixel = pixel + F.l1_loss(self.bundle.decode(refined["prior"][:, :z0.shape[1]]), clean)
            loss = loss + o.lambda2 * pixel
            logs["loss_pixel"] = float(pixel.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs
