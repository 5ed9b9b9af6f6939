"""The Method contract and the registry.

The train loop, Tune, evaluation and Serve know only this: which Parquet columns a method
needs, how to build it, its training loss on a batch, and how it enhances images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from lowlight.config import Config, ConfigError, MethodConfig, ModelConfig
from lowlight.models import isp


class MethodOptions(BaseModel):
    """Base for a method's own options (``method.options``); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class EnhanceOptions:
    """Per-call inference settings; None means the method's configured default."""

    steps: int | None = None  # sampler/exposure steps
    seed: int = 0
    guidance_scale: float | None = None
    sampler: str | None = None
    strength: float | None = None  # partial diffusion from the noised condition latent, in (0, 1]
    tile: int | None = None  # latent pixels per denoiser tile
    color_fix: str | None = None
    initial_noise: Tensor | None = None  # overrides the searched/seeded start noise (boundary-condition search)
    progress: Callable[[int, int], None] | None = None  # called (steps done, steps in all) after each step


class Method(nn.Module):
    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    domains: ClassVar[tuple[str, ...]] = ("raw", "srgb")

    def __init__(self, cfg: MethodConfig, options: MethodOptions, channels: int, model: ModelConfig):
        super().__init__()
        self.cfg, self.options, self.channels, self.model_cfg = cfg, options, channels, model

    @classmethod
    def columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        """Parquet columns a batch must hold, for the configured domain."""
        raise NotImplementedError(cls.__name__ + " must declare its columns")

    @classmethod
    def optional_columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        """Parquet columns a batch holds when the data has them (e.g. the stage-1 restoration's)."""
        return ()

    @classmethod
    def prepare_config(cls, cfg: Config) -> Config:
        """Settings resolved on the driver before any worker starts, from the data if need be (AdaptBIR fixes
        its IQA metric and calibrates its thresholds on the training inputs); saved in the checkpoint."""
        return cfg

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def optimizer_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups for base learning rate ``lr`` (``train.lr``): one group by
        default; a method may give parts their own learning rate or Adam betas."""
        return [{"params": list(self.trainable_parameters()), "lr": lr}]

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Modules saved as one safetensors file each."""
        return {"model": self}

    def save_artifacts(self, directory: Path) -> None:
        """Write files other stages read from a checkpoint (DarkDiff's stage-1 VAE as a diffusers folder)."""

    def enhance_defaults(self) -> dict[str, object]:
        """The ``EnhanceOptions`` fields this method honours (besides ``seed``), with its configured values:
        what a user interface offers for it."""
        return {}

    def load_artifacts(self, directory: Path) -> None:
        """Read what was added to a checkpoint after training (e.g. a searched initial noise)."""

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError(self.name + " must define its loss")

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The training loss: calling the (DDP-wrapped) module is what synchronises gradients."""
        return self.loss(batch, generator)

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], opts: EnhanceOptions) -> Tensor:
        """The restored image in the method's domain (packed raw or sRGB)."""
        raise NotImplementedError(self.name + " must define predict")

    @property
    def output_domain(self) -> str:
        """What ``predict`` returns: the input's domain by default (DarkDiff maps raw in to sRGB out)."""
        return self.cfg.domain

    def target(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["raw_gt"] if self.output_domain == "raw" else batch["srgb_gt"]

    def degraded(self, batch: dict[str, Tensor]) -> Tensor:
        """The input in the output's domain and brightness (the 'do nothing' baseline)."""
        if self.cfg.domain == "raw":
            return (batch["raw_in"] * batch["ratio"].view(-1, 1, 1, 1)).clamp(0, 1)
        return batch["srgb_in"]

    def to_srgb(self, image: Tensor, batch: dict[str, Tensor]) -> Tensor:
        if self.output_domain == "raw":
            return isp.render(image, batch["wb"], batch["ccm"])
        return image.clamp(0, 1)

    @torch.no_grad()
    def enhance(self, batch: dict[str, Tensor], opts: EnhanceOptions) -> Tensor:
        """sRGB in [0, 1]."""
        return self.to_srgb(self.predict(batch, opts), batch)


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY:
        raise ValueError(f"method name '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ConfigError(f"config key 'method.name': unknown method '{name}'; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def parse_options(cfg: MethodConfig) -> MethodOptions:
    cls = method_class(cfg.name)
    if cfg.domain not in cls.domains:
        raise ConfigError(f"config key 'method.domain': '{cfg.name}' works on {list(cls.domains)}, not '{cfg.domain}'")
    try:
        return cls.Options.model_validate(cfg.options)
    except ValidationError as e:
        keys = "; ".join(f"config key 'method.options.{'.'.join(map(str, err['loc']))}': {err['msg']}"
                         for err in e.errors())
        raise ConfigError(keys) from None


def build_method(cfg: MethodConfig, channels: int, model: ModelConfig | None = None) -> Method:
    """``model`` names the pretrained parts (the SD bundle, a fitted VAE) for the methods that use them."""
    return method_class(cfg.name)(cfg, parse_options(cfg), channels, model or ModelConfig())
