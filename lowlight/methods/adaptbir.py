"""AdaptBIR (Liu et al., "AdaptBIR: Adaptive Blind Image Restoration with latent diffusion prior for
higher fidelity", Pattern Recognition 2024): quality-adaptive restoration around DiffBIR's latent ControlNet.

* IQA classification (``lowlight.adaptive_quality``): a no-reference score of each input gives k and w
  (severe: 0, 0; mild: 0.7, 1; medium in between);
* dual encoder: z_inter = (1 - k) E_R(x) + k E_I(x), E_R the encoder of a copy of the SD VAE fine-tuned to
  map degraded to clean images (L2), E_I the SD encoder (z_in);
* two-phase control: phase 1 the latent ControlNet fed z_inter; phase 2 CSFT layers on the UNet backbone
  (``lowlight.models.csft``) with strength w, fed the ControlNet's features.

Staged training (``stage``), each stage a run initialised from the previous one's checkpoint
(``model.init_from``): ``vae`` fine-tunes the restoration VAE (the paper: AdamW, lr 4.5e-6), ``controlnet``
trains the ControlNet (lr 1e-4), ``csft`` only the CSFT layers (lr 1e-4), SD and the ControlNet frozen.
Training inputs are the Parquet's low-light ones or blind degradations of the clean image
(``degradations``, chosen per sample), so all three quality classes occur; k and w come from each input's
score. The denoiser's hint carries w as an extra constant channel, so it crops with a tile and the
unconditional (null) hint switches CSFT off. Sampling: spaced DDPM, 50 steps.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from lowlight import adaptive_quality
from lowlight.config import Config
from lowlight.data.degrade import degrade
from lowlight.methods.base import EnhanceOptions, register
from lowlight.methods.latent import LatentDiffusionMethod, LatentDiffusionOptions
from lowlight.models.control import conditioned_output, latent_controlnet
from lowlight.models.csft import CSFTControl
from lowlight.models.vae_tiling import decode_sample, encode_moments

STAGE_TRAINABLE = {"vae": ("restoration_vae",), "controlnet": ("controlnet",), "csft": ("csft",)}
Degradation = Literal["lowlight", "realesrgan", "codeformer"]
CALIBRATION_SEED = 0


class AdaptBIROptions(LatentDiffusionOptions):
    stage: Literal["vae", "controlnet", "csft"] = Field("csft", description="what this run trains (I, II, III)")
    sampler: Literal["ddim", "ddpm"] = "ddpm"
    control_scale: float = Field(1.0, ge=0, description="multiplies every ControlNet residual")
    quality: adaptive_quality.QualityOptions = Field(default_factory=adaptive_quality.QualityOptions)
    csft_position: Literal["backbone", "skip"] = Field("backbone", description="Fig. 3(d), or (c) the ablation")
    csft_hidden: int = Field(128, ge=8, description="channels of M_theta's shared conv")
    degradations: list[Degradation] = Field(
        default_factory=lambda: ["lowlight", "realesrgan", "codeformer"],
        description="training inputs, one drawn per sample: the Parquet's low-light input or a degradation of "
                    "the clean image", min_length=1)


@register
class AdaptBIR(LatentDiffusionMethod):
    name = "adaptbir"
    Options = AdaptBIROptions
    options: AdaptBIROptions

    @property
    def default_trainable(self) -> tuple[str, ...]:
        return STAGE_TRAINABLE[self.options.stage]

    def build_conditioning(self) -> None:
        self.restoration_vae = copy.deepcopy(self.vae).float()
        self.controlnet = latent_controlnet(self.unet, self.bundle.vae.config.latent_channels)
        self.csft = CSFTControl(self.unet, self.controlnet, self.options.csft_position, self.options.csft_hidden)
        self.metric = adaptive_quality.resolve_metric(self.options.quality.metric)

    @classmethod
    def prepare_config(cls, cfg: Config) -> Config:
        """Fix the IQA metric (``auto`` resolved here, so every worker and the checkpoint say which) and its
        thresholds (calibrated on the training inputs when the metric has no published ones)."""
        from lowlight.data.parquet import read_split

        options = cls.Options.model_validate(cfg.method.options)
        q = options.quality
        metric = adaptive_quality.resolve_metric(q.metric)
        severe, mild = q.severe, q.mild
        if q.adaptive and options.stage != "vae":  # stage I and the plain baseline use no thresholds
            scores = None
            if (severe is None or mild is None) and metric != adaptive_quality.PREFERRED:
                rows = read_split(cfg.train.data, cfg.train.train_split, ["srgb_in", "srgb_gt"],
                                  cfg.storage.endpoint_url, limit=q.calibration_images)
                batch = {k: torch.from_numpy(np.asarray(rows[k], dtype=np.float32)) for k in ("srgb_in", "srgb_gt")}
                generator = torch.Generator().manual_seed(CALIBRATION_SEED)
                inputs = training_inputs(batch, options.degradations, generator)
                scores = adaptive_quality.score(inputs, metric).numpy()
            severe, mild = adaptive_quality.thresholds(metric, q, scores)
        resolved = {**cfg.method.options,
                    "quality": {**q.model_dump(), "metric": metric, "severe": severe, "mild": mild}}
        return cfg.model_copy(update={"method": cfg.method.model_copy(update={"options": resolved})})

    def restoration_latent(self, images: Tensor) -> Tensor:
        """z_R = E_R(x): the restoration VAE's posterior mean, scaled like the SD latents."""
        vae = self.restoration_vae
        moments = encode_moments(vae, images.to(vae.dtype) * 2 - 1, self.bundle.vae_stats_size)
        return moments.float() * self.bundle.scaling_factor

    def restore(self, images: Tensor) -> Tensor:
        """I_IR = V_R(I_LQ), sRGB in [0, 1] (stage I's output)."""
        vae = self.restoration_vae
        z = self.restoration_latent(images) / self.bundle.scaling_factor
        return ((decode_sample(vae, z.to(vae.dtype), self.bundle.vae_stats_size).float() + 1) / 2).clamp(0, 1)

    def adaptive(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``batch`` with k, w (from the input's quality score) and z_R, computed once per batch."""
        if "adapt_k" in batch:
            return batch
        scores = adaptive_quality.score(batch["srgb_in"], self.metric)
        k, w = adaptive_quality.coefficients(scores, self.options.quality, self.metric)
        with torch.no_grad():
            z_restore = self.restoration_latent(batch["srgb_in"])
        return {**batch, "adapt_score": scores, "adapt_k": k, "adapt_w": w, "z_restore": z_restore}

    def with_condition_latent(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.adaptive(super().with_condition_latent(batch))

    def dual_latent(self, batch: dict[str, Tensor]) -> Tensor:
        """z_inter = (1 - k) z_R + k z_I."""
        batch = self.adaptive(batch)
        k = batch["adapt_k"].view(-1, 1, 1, 1)
        return (1 - k) * batch["z_restore"] + k * self.condition_latent(batch)

    def hint(self, batch: dict[str, Tensor]) -> Tensor:
        batch = self.adaptive(batch)
        z = self.dual_latent(batch)
        w = batch["adapt_w"].to(z).view(-1, 1, 1, 1).expand(-1, 1, *z.shape[-2:])
        return torch.cat([z, w], dim=1)

    def start_latent(self, batch: dict[str, Tensor]) -> Tensor:
        return self.dual_latent(batch)

    def denoise(self, x_t: Tensor, t: Tensor, hint: Tensor) -> Tensor:
        z, w = hint[:, :-1], hint[:, -1].mean(dim=(1, 2))
        self.csft.set_strength(w)
        return conditioned_output("latent_controlnet", self.unet, x_t, t, self.prompt(x_t.shape[0], x_t), z,
                                  self.controlnet, self.options.control_scale)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        inputs = training_inputs(batch, self.options.degradations, generator)
        if self.options.stage == "vae":
            loss = F.mse_loss(self.restore(inputs), batch["srgb_gt"])
            return loss, {"loss": float(loss.detach()), "loss_restoration": float(loss.detach())}
        changed = not torch.equal(inputs, batch["srgb_in"])
        batch = {**batch, "srgb_in": inputs}
        if changed:
            with torch.no_grad():
                batch["z_in"] = self.bundle.encode(inputs)
        batch = self.adaptive(batch)
        loss, logs = super().loss(batch, generator)
        logs.update({f"share_{name}": float(np.mean([c == name for c in adaptive_quality.classes(batch["adapt_w"])]))
                     for name in ("mild", "medium", "severe")})
        return loss, logs

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], opts: EnhanceOptions) -> Tensor:
        if self.options.stage == "vae":
            return self.restore(batch["srgb_in"])
        return super().predict(batch, opts)


def training_inputs(batch: dict[str, Tensor], degradations: list[str], generator: torch.Generator) -> Tensor:
    """Per sample, one of ``degradations``: the low-light input as stored, or a degradation of the clean image."""
    images = batch["srgb_in"]
    if degradations == ["lowlight"]:
        return images
    choice = torch.randint(len(degradations), (images.shape[0],), generator=generator, device=generator.device)
    out = []
    for i, c in enumerate(choice.tolist()):
        name = degradations[c]
        out.append(images[i] if name == "lowlight" else
                   degrade(batch["srgb_gt"][i:i + 1], name, generator)[0].to(images))
    return torch.stack(out)
