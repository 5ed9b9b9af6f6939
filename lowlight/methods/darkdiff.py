"""DarkDiff (Zheng et al., "DarkDiff: Advancing Low-Light Raw Enhancement by Retasking Diffusion Models for
Camera ISP"), Sec. 4 and its appendix.

The mature ISP steps run before the network: the packed raw is black-level subtracted, amplified by the
ratio, white balanced and its greens averaged (linear RGB, LRGB), then demosaiced x2 (bilinear) to the
sensor's resolution. Stable Diffusion maps that to the clean sRGB image, in two stages:

* ``stage: vae`` fine-tunes the VAE with residual connections from each encoder block to the decoder
  block at the same resolution (``models/residual_vae.py``) on (noisy LRGB -> clean sRGB) pairs: L1 +
  LPIPS on the sRGB rendering (when its weights exist) + KL (+ a patch discriminator when ``disc_weight`` > 0), Adam betas
  (0.5, 0.9), lr 4e-5. Its checkpoint also holds the VAE as a diffusers folder (``vae/``): preprocess with
  ``model.vae`` pointing there and ``preprocess.latents_from: lrgb`` to make stage 2's latents
  (z_in = E(noisy LRGB), z_gt = E(clean LRGB), as the appendix says).
* ``stage: diffusion`` trains the UNet with the condition latent z_y entering through region-based
  cross-attention (``models/region_attention.py``; K = g^2 regions per layer, g = 1 is global
  cross-attention), or for the ablations through input concatenation or a latent ControlNet. Loss:
  L_LDM + lambda * ||x - D(z0_hat)||^2, the one-step z0_hat decoded by the residual decoder with the
  input's encoder features (``recon_weight`` is lambda). 5 % of the condition latents are replaced by pure
  Gaussian noise (the null condition classifier-free guidance uses); inference: DDIM 50, omega = 2.

Every component is switchable (``data_format``, ``residual_vae``, ``conditioning``, ``recon_weight``), so
the paper's Tables 4-6 are configs (``lowlight/configs/darkdiff_ablations.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from lowlight.config import ConfigError, MethodConfig
from lowlight.iqa import lpips_loss_or_none
from lowlight.methods.base import EnhanceOptions, MethodOptions, parse_options, register
from lowlight.methods.latent import LatentDiffusionMethod, LatentDiffusionOptions
from lowlight.models import isp
from lowlight.models.control import conditioned_output, expand_conv_in, latent_controlnet, unet_output
from lowlight.models.discriminator import PatchDiscriminator, adversarial_losses
from lowlight.models.region_attention import (
    ContextProcessor,
    ContextState,
    install_region_attention,
    replaced_projections,
)
from lowlight.models.residual_vae import ResidualVAE

NULL_CONDITION_SEED = 0  # the unconditional branch's Gaussian condition at inference: fixed, like the zero one


class DarkDiffOptions(LatentDiffusionOptions):
    stage: Literal["vae", "diffusion"] = Field("diffusion", description="vae: stage 1 (residual VAE); "
                                               "diffusion: stage 2 (UNet + conditioning)")
    data_format: Literal["lrgb_srgb", "raw_srgb", "raw_raw"] = Field(
        "lrgb_srgb", description="VAE input -> output (Table 5): linear RGB or amplified packed raw in, sRGB or raw out")
    residual_vae: bool = Field(True, description="encoder -> decoder residual convolutions (Sec. 4.3)")
    conditioning: Literal["region", "global", "concat", "controlnet"] = Field(
        "region", description="how z_y enters the UNet (Table 6): region / global cross-attention, input "
        "concatenation, latent ControlNet")
    region_grid: list[int] = Field([4], min_length=1, description="regions per side g (K = g^2) of each "
                                   "down-block cross-attention layer, in order; one value: every layer")
    cond_dropout: float = Field(0.05, ge=0, le=1, description="share of condition latents replaced by Gaussian noise")
    guidance_scale: float = Field(2.0, description="omega (2.0 for SID and LRD, 2.5 for ELD)")
    recon_weight: float = Field(1.0, ge=0, description="lambda of the decoder loss ||x - D(z0_hat)||^2 (Sec. 4.4)")
    recon_loss: Literal["l1", "mse"] = "mse"
    condition_lr_multiplier: float = Field(5.0, gt=0, description="learning rate of the context processor and "
                                           "conditioning layers over train.lr (2.5e-4 vs 5e-5)")
    kl_weight: float = Field(1e-6, ge=0, description="stage 1: KL weight (LDM's autoencoder)")
    lpips_weight: float = Field(1.0, ge=0, description="stage 1: LPIPS weight, when its weights exist offline")
    disc_weight: float = Field(0.0, ge=0, description="stage 1: patch-discriminator weight (0: no discriminator)")
    vae_betas: tuple[float, float] = Field((0.5, 0.9), description="stage 1: Adam betas")

    @model_validator(mode="after")
    def _supported(self) -> DarkDiffOptions:
        if self.color_fix != "none":
            raise ConfigError("method.options.color_fix: DarkDiff has no sRGB reference to fix colours towards "
                              "(its input is linear raw); its decoder loss is what keeps colours (Sec. 4.4)")
        return self


@register
class DarkDiff(LatentDiffusionMethod):
    name = "darkdiff"
    Options: ClassVar[type[MethodOptions]] = DarkDiffOptions
    domains = ("raw",)
    options: DarkDiffOptions

    def __init__(self, cfg, options, channels, model):
        super().__init__(cfg, options, channels, model)
        lpips = lpips_loss_or_none() if options.stage == "vae" and options.lpips_weight else None
        # Held outside the module tree: a fixed loss network, not part of the model or its checkpoint.
        self._lpips = (lpips.requires_grad_(False),) if lpips is not None else ()

    @classmethod
    def columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        o: DarkDiffOptions = parse_options(cfg)
        source, target = o.data_format.split("_")
        columns = ["raw_in", f"{source}_in", f"{target}_gt", "ratio", "wb", "ccm"]
        if o.stage == "diffusion":
            columns += ["z_in", "z_gt"]
        return tuple(dict.fromkeys(columns))

    @classmethod
    def optional_columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        return ()

    @property
    def output_domain(self) -> str:
        return self.options.data_format.split("_")[1]

    @property
    def input_kind(self) -> str:
        return self.options.data_format.split("_")[0]

    @property
    def default_trainable(self) -> tuple[str, ...]:
        o = self.options
        if o.stage == "vae":
            return ("vae", *(("residual",) if o.residual_vae else ()), *(("discriminator",) if o.disc_weight else ()))
        return ("unet", *{"region": ("context", "region_attention"), "global": ("context", "region_attention"),
                          "concat": (), "controlnet": ("controlnet",)}[o.conditioning])

    def build_conditioning(self) -> None:
        o = self.options
        _adapt_vae_channels(self.vae, 4 if self.input_kind == "raw" else 3, 4 if self.output_domain == "raw" else 3)
        self.residual = ResidualVAE(self.vae, self.bundle.vae_stats_size) if o.residual_vae else None
        if o.stage == "vae":
            if o.disc_weight:
                self.discriminator = PatchDiscriminator(self.vae.config.out_channels)
            return
        latent_channels = self.vae.config.latent_channels
        if o.conditioning in ("region", "global"):
            self.context_state = ContextState()
            self.context = ContextProcessor(self.unet)  # copied before the UNet gets the region processors
            grids = o.region_grid if o.conditioning == "region" else [1]
            try:
                self.region_attention = install_region_attention(self.unet, grids, self.context_state)
            except ValueError as e:
                raise ConfigError(f"config key 'method.options.region_grid': {e}") from None
        elif o.conditioning == "concat":
            expand_conv_in(self.unet, latent_channels)
        else:
            self.controlnet = latent_controlnet(self.unet, latent_channels)

    def _freeze(self, model) -> None:
        super()._freeze(model)
        if hasattr(self, "region_attention"):
            for projection in replaced_projections(self.unet):
                projection.requires_grad_(False)

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Stage 1: every trainable at ``lr`` with Adam betas (0.5, 0.9). Stage 2: the context processor and the
        conditioning layers at ``lr * condition_lr_multiplier``, the rest of the UNet at ``lr``."""
        o = self.options
        if o.stage == "vae":
            return [{"params": list(self.trainable_parameters()), "lr": lr, "betas": tuple(o.vae_betas)}]
        fast = [p for name in ("context", "region_attention", "controlnet") if hasattr(self, name)
                for p in getattr(self, name).parameters() if p.requires_grad]
        chosen = {id(p) for p in fast}
        rest = [p for p in self.trainable_parameters() if id(p) not in chosen]
        groups = [{"params": rest, "lr": lr}, {"params": fast, "lr": lr * o.condition_lr_multiplier}]
        return [g for g in groups if g["params"]]

    def save_artifacts(self, directory: Path) -> None:
        """Stage 1 writes its VAE as a diffusers folder, for ``model.vae`` when preprocessing stage 2's latents."""
        if self.options.stage == "vae":
            self.vae.save_pretrained(directory / "vae")

    # -- images in and out ------------------------------------------------------------------------------

    def input_image(self, batch: dict[str, Tensor]) -> Tensor:
        """The VAE's input in [0, 1] at the sensor's resolution: the LRGB (from the Parquet, or made from the
        packed raw when enhancing a file) or the amplified packed raw, demosaiced x2."""
        if self.input_kind == "lrgb":
            lrgb = batch.get("lrgb_in")
            if lrgb is None:
                lrgb = isp.linear_rgb(batch["raw_in"], batch["wb"], batch["ratio"])
            return isp.demosaic(lrgb)
        return isp.demosaic((batch["raw_in"] * batch["ratio"].view(-1, 1, 1, 1)).clamp(0, 1))

    def to_output(self, image: Tensor) -> Tensor:
        """Decoded image in [-1, 1] -> the output domain in [0, 1] (a raw output is packed back: x2 average)."""
        out = ((image.float() + 1) / 2).clamp(0, 1)
        return F.avg_pool2d(out, 2) if self.output_domain == "raw" else out

    def degraded(self, batch: dict[str, Tensor]) -> Tensor:
        amplified = super().degraded(batch)
        if self.output_domain == "raw":
            return amplified
        return isp.demosaic(isp.render(amplified, batch["wb"], batch["ccm"]))  # at the sRGB target's resolution

    def encode_input(self, batch: dict[str, Tensor]):
        """The posterior of the input image and its encoder features (None without the residual VAE)."""
        x = self.input_image(batch) * 2 - 1
        if self.residual is not None:
            return self.residual.encode(x)
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist, None

    def decode_latent(self, latent: Tensor, features: list[Tensor] | None) -> Tensor:
        """Unscaled latent -> the output domain, through the residual decoder when there is one."""
        if self.residual is not None:
            return self.to_output(self.residual.decode(latent, features))
        return self.to_output(self.vae.decode(latent.to(self.vae.dtype)).sample)

    def decode(self, latent: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Scaled latent -> output, with the encoder features of ``batch``'s input (the decoder loss's D)."""
        with torch.no_grad():
            _, features = self.encode_input(batch)
        return self.decode_latent(latent / self.bundle.scaling_factor, features)

    def condition_latent(self, batch: dict[str, Tensor]) -> Tensor:
        if "z_in" in batch:
            return batch["z_in"]
        with torch.no_grad():
            return self.encode_input(batch)[0].mode() * self.bundle.scaling_factor

    # -- the condition --------------------------------------------------------------------------------

    def null_hint(self, hint: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pure Gaussian noise, as the paper trains its null condition (not zeros): fresh in training, one
        fixed draw at inference."""
        if generator is not None:
            return torch.randn(hint.shape, generator=generator, device=hint.device).to(hint.dtype)
        fixed = torch.Generator().manual_seed(NULL_CONDITION_SEED)
        return torch.randn(hint.shape, generator=fixed).to(hint.device, hint.dtype)

    def denoise(self, x_t: Tensor, t: Tensor, hint: Tensor) -> Tensor:
        prompt = self.prompt(x_t.shape[0], x_t)
        conditioning = self.options.conditioning
        if conditioning in ("region", "global"):
            with self.context_state.using(self.context(hint, t, prompt)):
                return unet_output(self.unet, x_t, t, prompt)
        kind = "concat" if conditioning == "concat" else "latent_controlnet"
        return conditioned_output(kind, self.unet, x_t, t, prompt, hint, getattr(self, "controlnet", None))

    # -- training and inference ---------------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        if self.options.stage == "diffusion":
            return super().loss(batch, generator)
        return self.vae_loss(batch, generator)

    def vae_loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Stage 1 (LDM's autoencoder loss): L1 + LPIPS + KL (+ hinge GAN) of noisy input -> clean target."""
        o = self.options
        posterior, features = self.encode_input(batch)
        latent = posterior.sample(generator=generator)
        output = self.decode_latent(latent, features)
        target = self.target(batch)
        l1 = F.l1_loss(output, target)
        kl = posterior.kl().mean()
        loss = l1 + o.kl_weight * kl
        logs = {"loss_l1": float(l1.detach()), "loss_kl": float(kl.detach())}
        if self._lpips:
            lpips = self._lpips[0].to(output.device)
            perceptual = lpips(self.to_srgb(output, batch), self.to_srgb(target, batch)).mean()
            loss = loss + o.lpips_weight * perceptual
            logs["loss_lpips"] = float(perceptual.detach())
        if o.disc_weight:
            fooled, critic = adversarial_losses(self.discriminator, target, output)
            loss = loss + o.disc_weight * fooled + critic
            logs |= {"loss_generator": float(fooled.detach()), "loss_discriminator": float(critic.detach())}
        logs["loss"] = float(loss.detach())
        return loss, logs

    def enhance_defaults(self) -> dict[str, object]:
        if self.options.stage == "vae":
            return {}
        return {k: v for k, v in super().enhance_defaults().items() if k != "color_fix"}

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], opts: EnhanceOptions) -> Tensor:
        """Stage 1: the VAE's own mapping (noisy in -> clean out); stage 2: DDIM from noise with z_y as the
        condition, decoded with the input's encoder features."""
        device = batch["raw_in"].device
        mixed = self.vae.dtype != torch.float32 or self.unet.dtype != torch.float32
        with torch.autocast(device.type, dtype=self.vae.dtype, enabled=mixed):
            posterior, features = self.encode_input(batch)
            latent = posterior.mode()
            if self.options.stage == "diffusion":
                scale = self.bundle.scaling_factor
                conditioned = {**batch, "z_in": latent.float() * scale}
                latent = self.sample_latent(conditioned, opts) / scale
            return self.decode_latent(latent, features).float()


@torch.no_grad()
def _adapt_vae_channels(vae: nn.Module, inputs: int, outputs: int) -> None:
    """Make an RGB VAE take packed RGBG (R, G1, B, G2) in or give it out, so that a raw image whose two greens
    are equal passes exactly as its RGB twin would: G's input weights are split over G1 and G2, G's output row
    is copied to both. A VAE already of that shape (a stage-1 one) is left alone."""
    if vae.config.in_channels != inputs:
        if (vae.config.in_channels, inputs) != (3, 4):
            raise ConfigError(f"the VAE takes {vae.config.in_channels} channels; DarkDiff can only adapt 3 -> 4")
        old = vae.encoder.conv_in
        new = nn.Conv2d(4, old.out_channels, old.kernel_size, old.stride, old.padding).to(old.weight)
        new.weight.copy_(old.weight[:, [0, 1, 2, 1]] * torch.tensor([1, 0.5, 1, 0.5]).to(old.weight).view(1, 4, 1, 1))
        new.bias.copy_(old.bias)
        vae.encoder.conv_in = new
        vae.register_to_config(in_channels=4)
    if vae.config.out_channels != outputs:
        if (vae.config.out_channels, outputs) != (3, 4):
            raise ConfigError(f"the VAE gives {vae.config.out_channels} channels; DarkDiff can only adapt 3 -> 4")
        old = vae.decoder.conv_out
        new = nn.Conv2d(old.in_channels, 4, old.kernel_size, old.stride, old.padding).to(old.weight)
        new.weight.copy_(old.weight[[0, 1, 2, 1]])
        new.bias.copy_(old.bias[[0, 1, 2, 1]])
        vae.decoder.conv_out = new
        vae.register_to_config(out_channels=4)
