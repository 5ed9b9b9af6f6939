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

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors.torch import load_file
from torch import Tensor, nn

from lowlight.colorfix import color_fix
from lowlight.config import STAGE1_COLUMNS, ConfigError, MethodConfig, ModelConfig
from lowlight.methods.base import EnhanceOptions, Method, MethodOptions
from lowlight.models.sd import SDBundle, apply_denoiser_memory_options, changed_schedule_keys
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


@dataclass
class Condition:
    """The condition of one sampling run, read at every denoiser call: a step callback may replace
    ``hint`` between steps (condition refinement updates it with x_t), and each tile crops it then."""

    hint: Tensor


class LatentDiffusionOptions(MethodOptions):
    trainable: list[str] | None = Field(None, description="modules to train (None: the method's default)")
    cond_dropout: float = Field(0.0, ge=0, le=1, description="probability of training with the null condition")
    recon_weight: float = Field(0.0, ge=0, description="weight of the decoder-space loss on the one-step x0")
    recon_loss: Literal["l1", "mse"] = Field("l1", description="the decoder-space loss (DarkDiff's Eq. 9 is mse)")
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0, description="DDIM stochasticity (0: deterministic)")
    guidance_scale: float = Field(1.0, description="classifier-free guidance; 1 = conditional only")
    strength: float = Field(1.0, gt=0, le=1, description="1: start from noise; <1: from the noised condition latent")
    tile: int = Field(64, ge=8, description="latent pixels per denoiser tile (64 = 512 px for SD)")
    tile_overlap: int = Field(16, ge=0, description="latent pixels shared by neighbouring tiles")
    color_fix: Literal["none", "adain", "wavelet"] = "none"

    @model_validator(mode="after")
    def _guidance_needs_dropout(self) -> LatentDiffusionOptions:
        check_guidance(self.guidance_scale, self.cond_dropout, "method.options.guidance_scale")
        return self


def check_guidance(scale: float, cond_dropout: float, key: str) -> None:
    """Guidance mixes in the null-condition output, which only condition dropout trains."""
    if scale > 1 and cond_dropout == 0:
        raise ConfigError(f"{key}={scale} needs the unconditional branch, but method.options.cond_dropout is 0: "
                          f"the model never saw the null condition in training, so guiding with it extrapolates "
                          f"from an untrained output. Train with cond_dropout > 0 (InstructPix2Pix: 0.05) or use 1")


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
        for name, module in self.named_trainables().items():
            if name not in ("unet", "vae"):  # the bundle applied them to the UNet; the VAE does not train
                apply_denoiser_memory_options(module, model)
        self._freeze(model)
        if model.init_from:
            self._initialise_from(model.init_from)

    @classmethod
    def columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        return ("z_in", "z_gt", "srgb_in", "srgb_gt")

    @classmethod
    def optional_columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        return STAGE1_COLUMNS

    def build_conditioning(self) -> None:
        """Add the modules through which the condition reaches the denoiser."""

    def hint(self, batch: dict[str, Tensor]) -> Tensor:
        """The condition as the denoiser takes it (default: the condition latent)."""
        return self.condition_latent(batch)

    def null_hint(self, hint: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The condition that stands for "no condition": what condition dropout trains with (``generator``
        given) and the unconditional branch of guidance gets. Zeros by default (a zero latent, or a black
        image for a pixel ControlNet, which is close to a low-light input: a method may choose better)."""
        return torch.zeros_like(hint)

    def drop_condition(self, hint: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``hint`` with each sample replaced by the null condition with probability ``cond_dropout``, and
        the mask of the samples that kept theirs."""
        keep = torch.rand(hint.shape[0], generator=generator, device=hint.device) >= self.options.cond_dropout
        null = self.null_hint(hint, generator)
        return torch.where(keep.view(-1, *[1] * (hint.dim() - 1)), hint, null), keep

    def decode(self, latent: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Latent -> sRGB in [0, 1], for ``predict`` and the decoder-space loss; ``batch`` is there for
        decoders that read the input too (DarkDiff's residual VAE)."""
        return self.bundle.decode(latent)

    def denoise(self, x_t: Tensor, t: Tensor, hint: Tensor) -> Tensor:
        raise NotImplementedError(self.name + " must say how the condition enters the denoiser")

    def named_trainables(self) -> dict[str, nn.Module]:
        """The top-level modules: the UNet, the VAE and what ``build_conditioning`` added."""
        return {"unet": self.unet, "vae": self.vae,
                **{n: m for n, m in self.named_children() if n not in ("unet", "vae")}}

    def _chosen_trainables(self, names: list[str]) -> dict[str, nn.Module]:
        """``method.options.trainable`` resolved: top-level names, dotted module paths or glob patterns of
        them (``vae.decoder``, ``unet.up_blocks.*``); a path inside another chosen one is dropped."""
        roots = self.named_trainables()
        paths = {path: module for path, module in self.named_modules() if path.split(".")[0] in roots}
        chosen: dict[str, nn.Module] = {}
        for name in names:
            matches = [p for p in paths if p == name or fnmatch.fnmatchcase(p, name)]
            if not matches:
                raise ConfigError(f"config key 'method.options.trainable': '{name}' matches no module of "
                                  f"'{self.name}'; top-level modules are {sorted(roots)}, and dotted paths or glob "
                                  f"patterns inside them (e.g. 'vae.decoder') choose parts")
            chosen.update({p: paths[p] for p in matches})
        return {p: m for p, m in chosen.items()
                if not any(p.startswith(other + ".") for other in chosen if other != p)}

    def _freeze(self, model: ModelConfig) -> None:
        names = self.options.trainable if self.options.trainable is not None else list(self.default_trainable)
        chosen = self._chosen_trainables(names)
        changed = changed_schedule_keys(self.bundle.source, model)
        if changed and not any(p == "unet" or p.startswith("unet.") for p in chosen):
            raise ConfigError(f"config key(s) {changed} change what the UNet predicts or its noise schedule, but the "
                              f"UNet is frozen (method.options.trainable={names}): it would keep answering the "
                              f"schedule it was trained on. Train the UNet too, or leave them unset")
        self.trainable_names = tuple(chosen)
        self.requires_grad_(False)
        for module in chosen.values():
            module.requires_grad_(True)
        frozen = model.frozen_dtype
        if frozen == "auto":
            frozen = "bf16" if torch.cuda.is_available() else "fp32"
        if frozen != "fp32":
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[frozen]
            for root in ("vae", "unet"):
                if root not in chosen:
                    getattr(self, root).to(dtype)
            for module in chosen.values():  # a trainable part inside a frozen module keeps fp32 weights
                module.to(torch.float32)

    def _initialise_from(self, directory: str) -> None:
        from lowlight.checkpoint import initialise_from  # checkpoint builds methods

        modules = {path: m for path, m in self.named_modules() if path}
        try:
            loaded = initialise_from(directory, modules)
        except FileNotFoundError as e:
            raise ConfigError(f"config key 'model.init_from': {e}") from None
        if not loaded:
            raise ConfigError(f"config key 'model.init_from': '{directory}' holds no weights of '{self.name}' "
                              f"modules (<module path>.safetensors, e.g. controlnet.safetensors)")

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        modules = dict(self.named_modules())
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

    def start_latent(self, batch: dict[str, Tensor]) -> Tensor:
        """What partial diffusion (strength < 1) noises and starts from: the latent the method conditions on."""
        return batch["z_in"]

    def with_condition_latent(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``batch`` with z_in, encoded here when missing, so a whole sampling run encodes the input once
        (on a 4000x6000 photo the tiled VAE encode costs as much as several denoiser steps)."""
        return batch if "z_in" in batch else {**batch, "z_in": self.condition_latent(batch)}

    def prompt(self, batch: int, like: Tensor) -> Tensor:
        return self.prompt_embedding.to(like.device, self.unet.dtype).expand(batch, -1, -1)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        z0, hint = batch["z_gt"], self.hint(batch)
        n, device = z0.shape[0], z0.device
        noise = torch.randn(z0.shape, generator=generator, device=device)
        t = torch.randint(0, self.schedule.num_train_timesteps, (n,), generator=generator, device=device)
        if self.options.cond_dropout:
            hint, _ = self.drop_condition(hint, generator)
        x_t = self.schedule.add_noise(z0, noise, t)
        out = self.denoise(x_t, t, hint).float()
        diffusion = F.mse_loss(out, self.schedule.target(z0, noise, t))
        logs = {"loss_diffusion": float(diffusion.detach())}
        loss = diffusion
        if self.options.recon_weight:
            x0, _ = self.schedule.x0_eps(x_t, t, out)
            distance = F.l1_loss if self.options.recon_loss == "l1" else F.mse_loss
            recon = distance(self.decode(x0, batch), self.target(batch))
            loss = loss + self.options.recon_weight * recon
            logs["loss_recon"] = float(recon.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def denoiser_for(self, condition: Condition | Tensor) -> Callable[[Region], Denoiser]:
        """Region -> a denoiser over that latent region, the condition's hint cropped to match when it is
        called (so a step callback's update reaches every tile); the unconditional branch (classifier-free
        guidance) gets the null hint."""
        condition = condition if isinstance(condition, Condition) else Condition(condition)
        s = self.hint_scale

        def for_region(region: Region) -> Denoiser:
            top, left, height, width = region

            def denoiser(x_t: Tensor, t: Tensor, conditional: bool) -> Tensor:
                local = condition.hint[..., top * s:(top + height) * s, left * s:(left + width) * s]
                return self.denoise(x_t, t, local if conditional else self.null_hint(local)).float()

            return denoiser

        return for_region

    def step_callback(self, batch: dict[str, Tensor], condition: Condition) -> Callback | None:
        """What ``predict`` runs after every sampler step (None: nothing). Condition refinement returns one
        that refines x̂0 and updates ``condition.hint``."""
        return None

    def sampler_options(self, opts: EnhanceOptions) -> SamplerOptions:
        o = self.options
        guidance = o.guidance_scale if opts.guidance_scale is None else opts.guidance_scale
        check_guidance(guidance, o.cond_dropout, "guidance_scale")
        return SamplerOptions(sampler=opts.sampler or o.sampler, steps=opts.steps or o.steps, eta=o.eta,
                              guidance_scale=guidance, strength=opts.strength or o.strength)

    def enhance_defaults(self) -> dict[str, object]:
        o = self.options
        return {"steps": o.steps, "guidance_scale": o.guidance_scale, "sampler": o.sampler, "strength": o.strength,
                "tile": o.tile, "color_fix": o.color_fix}

    def start_noise(self, shape: tuple[int, ...], opts: EnhanceOptions, device: torch.device) -> Tensor:
        """One noise for every image of the batch, so an image's result does not depend on its batch-mates;
        the searched noise (or ``opts.initial_noise``) when there is one, else the seed's."""
        noise = opts.initial_noise if opts.initial_noise is not None else self.initial_noise
        if noise is None:
            noise = default_noise(shape[1:], opts.seed)
        return fit_noise(noise, shape).to(device)

    @torch.no_grad()
    def sample_latent(self, batch: dict[str, Tensor], opts: EnhanceOptions, callback: Callback | None = None) -> Tensor:
        """The restored image's latent; ``callback`` (default: ``step_callback``) sees every step."""
        batch = self.with_condition_latent(batch)
        start, condition = self.start_latent(batch), Condition(self.hint(batch))
        callback = callback or self.step_callback(batch, condition)
        shape = tuple(start.shape)
        height, width = shape[-2:]
        tile = opts.tile or self.options.tile
        for_region = self.denoiser_for(condition)
        denoiser = (for_region((0, 0, height, width)) if max(height, width) <= tile
                    else tiled_denoiser(for_region, (height, width), tile, min(self.options.tile_overlap, tile // 2)))
        generator = torch.Generator(device=start.device).manual_seed(opts.seed + 1)
        return sample(denoiser, self.schedule, self.sampler_options(opts), self.start_noise(shape, opts, start.device),
                      init=start, generator=generator, callback=callback, progress=opts.progress)

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], opts: EnhanceOptions) -> Tensor:
        device = batch["srgb_in"].device
        # Frozen parts in bf16/fp16 meet fp32 trainable ones (ControlNet residuals): let autocast pick.
        mixed = self.vae.dtype != torch.float32 or self.unet.dtype != torch.float32
        with torch.autocast(device.type, dtype=self.vae.dtype, enabled=mixed):
            batch = self.with_condition_latent(batch)
            image = self.decode(self.sample_latent(batch, opts), batch)
        # The colour reference should be a restored image (DiffBIR fixes towards its stage-1 output): a
        # pre-enhanced image when the batch has one; the dark input itself would pull the colours down.
        reference = batch.get("srgb_pre", batch["srgb_in"])
        return color_fix(image.float(), reference, opts.color_fix or self.options.color_fix)
