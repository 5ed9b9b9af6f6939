"""The shared base of every latent-diffusion method (the SD baselines, DarkDiff, condition
refinement, AdaptBIR). Not registered: a method subclasses it and says how the condition enters
the denoiser (``denoise``); training objective, sampling, tiling, the searched initial noise
and colour fix live here once.

Training: z0 = z_gt (Parquet latents, already scaled), t ~ U{0..T-1}, x_t = q(x_t | z0, eps); the loss
is the scheduler's objective (eps or v MSE), plus an optional decoder-space L1 between the decoded
one-step x0 estimate and srgb_gt. With probability ``cond_dropout`` a sample's condition is replaced
by zeros (the null condition InstructPix2Pix and ControlNet train with), which is what classifier-free
guidance uses as the unconditional branch at inference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file
from torch import Tensor, nn

from lowlight.colorfix import color_fix
from lowlight.config import ConfigError, MethodConfig, ModelConfig
from lowlight.methods.base import EnhanceOptions, Method, MethodOptions
from lowlight.models.sd import SDBundle
from lowlight.sampling import (
    Callback,
    Denoiser,
    NoiseSchedule,
    Region,
    SamplerOptions,
    default_noise,
    fit_noise,
    sample,
    tiled_denoiser,
)

INITIAL_NOISE_FILE = "initial_noise.safetensors"


class LatentDiffusionOptions(MethodOptions):
    trainable: list[str] | None = Field(None, description="modules to train (None: the method's default)")
    cond_dropout: float = Field(0.0, ge=0, le=1, description="probability of training with the null condition")
    recon_weight: float = Field(0.0, ge=0, description="weight of the decoder-space L1 on the one-step x0")
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0, description="DDIM stochasticity (0: deterministic)")
    guidance_scale: float = Field(1.0, description="classifier-free guidance; 1 = conditional only")
    strength: float = Field(1.0, gt=0, le=1, description="1: start from noise; <1: from the noised condition latent")
    tile: int = Field(64, ge=8, description="latent pixels per denoiser tile (64 = 512 px for SD)")
    tile_overlap: int = Field(16, ge=0, description="latent pixels shared by neighbouring tiles")
    color_fix: Literal["none", "adain", "wavelet"] = "none"


class LatentDiffusionMethod(Method):
    Options: ClassVar[type[MethodOptions]] = LatentDiffusionOptions
    domains = ("srgb",)
    default_trainable: ClassVar[tuple[str, ...]]
    hint_scale: ClassVar[int] = 1  # condition pixels per latent pixel (the VAE factor for image hints)

    def __init__(self, cfg: MethodConfig, options: LatentDiffusionOptions, channels: int, model: ModelConfig):
        super().__init__(cfg, options, channels, model)
        self.bundle = SDBundle.load(model)
        self.vae, self.unet = self.bundle.vae, self.bundle.unet
        self.schedule = NoiseSchedule.from_scheduler(self.bundle.scheduler)
        self.register_buffer("prompt_embedding", self.bundle.prompt_embedding, persistent=False)
        self.initial_noise: Tensor | None = None
        self.build_conditioning()
        self._freeze(model)

    @classmethod
    def columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        return ("z_in", "z_gt", "srgb_in", "srgb_gt")

    def build_conditioning(self) -> None:
        """Add the modules through which the condition reaches the denoiser."""

    def hint(self, batch: dict[str, Tensor]) -> Tensor:
        """The condition as the denoiser takes it (default: the condition latent)."""
        return self.condition_latent(batch)

    def denoise(self, x_t: Tensor, t: Tensor, hint: Tensor) -> Tensor:
        raise NotImplementedError(self.name + " must say how the condition enters the denoiser")

    def named_trainables(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, **{n: m for n, m in self.named_children() if n not in ("unet", "vae")}}

    def _freeze(self, model: ModelConfig) -> None:
        modules = self.named_trainables()
        names = self.options.trainable if self.options.trainable is not None else list(self.default_trainable)
        unknown = sorted(set(names) - set(modules))
        if unknown:
            raise ConfigError(f"config key 'method.options.trainable': {unknown} are not modules of "
                              f"'{self.name}'; choose from {sorted(modules)}")
        self.trainable_names = tuple(names)
        self.requires_grad_(False)
        for name in names:
            modules[name].requires_grad_(True)
        frozen = model.frozen_dtype
        if frozen == "auto":
            frozen = "bf16" if torch.cuda.is_available() else "fp32"
        if frozen != "fp32":
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[frozen]
            self.vae.to(dtype)
            if "unet" not in names:
                self.unet.to(dtype)

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        modules = self.named_trainables()
        return {name: modules[name] for name in self.trainable_names}

    def load_artifacts(self, directory: Path) -> None:
        path = directory / INITIAL_NOISE_FILE
        self.initial_noise = load_file(str(path))["noise"] if path.exists() else None

    def condition_latent(self, batch: dict[str, Tensor]) -> Tensor:
        """z_in from the Parquet, or encoded from srgb_in when enhancing a file."""
        if "z_in" in batch:
            return batch["z_in"]
        with torch.no_grad():
            return self.bundle.encode(batch["srgb_in"])

    def prompt(self, batch: int, like: Tensor) -> Tensor:
        return self.prompt_embedding.to(like.device, self.unet.dtype).expand(batch, -1, -1)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        z0, hint = batch["z_gt"], self.hint(batch)
        n, device = z0.shape[0], z0.device
        noise = torch.randn(z0.shape, generator=generator, device=device)
        t = torch.randint(0, self.schedule.num_train_timesteps, (n,), generator=generator, device=device)
        if self.options.cond_dropout:
            keep = torch.rand(n, generator=generator, device=device) >= self.options.cond_dropout
            hint = hint * keep.view(-1, *[1] * (hint.dim() - 1)).to(hint.dtype)
        x_t = self.schedule.add_noise(z0, noise, t)
        out = self.denoise(x_t, t, hint).float()
        diffusion = F.mse_loss(out, self.schedule.target(z0, noise, t))
        logs = {"loss_diffusion": float(diffusion.detach())}
        loss = diffusion
        if self.options.recon_weight:
            x0, _ = self.schedule.x0_eps(x_t, t, out)
            recon = F.l1_loss(self.bundle.decode(x0), batch["srgb_gt"])
            loss = loss + self.options.recon_weight * recon
            logs["loss_recon"] = float(recon.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def denoiser_for(self, hint: Tensor) -> Callable[[Region], Denoiser]:
        """Region -> a denoiser over that latent region, its hint cropped to match; the unconditional
        branch (classifier-free guidance) gets the null (zero) hint."""
        s = self.hint_scale

        def for_region(region: Region) -> Denoiser:
            top, left, height, width = region
            local = hint[..., top * s:(top + height) * s, left * s:(left + width) * s]

            def denoiser(x_t: Tensor, t: Tensor, conditional: bool) -> Tensor:
                return self.denoise(x_t, t, local if conditional else torch.zeros_like(local)).float()

            return denoiser

        return for_region

    def sampler_options(self, opts: EnhanceOptions) -> SamplerOptions:
        o = self.options
        return SamplerOptions(sampler=opts.sampler or o.sampler, steps=opts.steps or o.steps, eta=o.eta,
                              guidance_scale=o.guidance_scale if opts.guidance_scale is None else opts.guidance_scale,
                              strength=opts.strength or o.strength)

    def start_noise(self, shape: tuple[int, ...], opts: EnhanceOptions, device: torch.device) -> Tensor:
        """One noise for every image of the batch, so an image's result does not depend on its batch-mates;
        the searched noise (or ``opts.initial_noise``) when there is one, else the seed's."""
        noise = opts.initial_noise if opts.initial_noise is not None else self.initial_noise
        if noise is None:
            noise = default_noise(shape[1:], opts.seed)
        return fit_noise(noise, shape).to(device)

    @torch.no_grad()
    def sample_latent(self, batch: dict[str, Tensor], opts: EnhanceOptions, callback: Callback | None = None) -> Tensor:
        """The restored image's latent; ``callback`` sees every step (condition refinement hooks in here)."""
        z_in, hint = self.condition_latent(batch), self.hint(batch)
        shape = tuple(z_in.shape)
        height, width = shape[-2:]
        tile = opts.tile or self.options.tile
        for_region = self.denoiser_for(hint)
        denoiser = (for_region((0, 0, height, width)) if max(height, width) <= tile
                    else tiled_denoiser(for_region, (height, width), tile, min(self.options.tile_overlap, tile // 2)))
        generator = torch.Generator(device=z_in.device).manual_seed(opts.seed + 1)
        return sample(denoiser, self.schedule, self.sampler_options(opts), self.start_noise(shape, opts, z_in.device),
                      init=z_in, generator=generator, callback=callback)

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], opts: EnhanceOptions) -> Tensor:
        device = batch["srgb_in"].device
        # Frozen parts in bf16/fp16 meet fp32 trainable ones (ControlNet residuals): let autocast pick.
        mixed = self.vae.dtype != torch.float32 or self.unet.dtype != torch.float32
        with torch.autocast(device.type, dtype=self.vae.dtype, enabled=mixed):
            image = self.bundle.decode(self.sample_latent(batch, opts))
        # The colour reference should be a restored image (DiffBIR fixes towards its stage-1 output): a
        # pre-enhanced image when the batch has one; the dark input itself would pull the colours down.
        reference = batch.get("srgb_pre", batch["srgb_in"])
        return color_fix(image.float(), reference, opts.color_fix or self.options.color_fix)
