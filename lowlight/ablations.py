"""A method's ablation table (``lowlight/configs/ablations/<method>.yaml``): each row is the config overrides
of each training stage, so a paper's ablation rows run as configs of the one implementation."""

from __future__ import annotations

from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lowlight.config import ConfigError


class Ablation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table: str  # the paper's table(s) the row belongs to
    restorer: list[str] = []  # overrides of the stage-1 restoration network's training (empty: the default)
    vae: list[str] = []  # overrides of the stage that fine-tunes the VAE (empty: the default one is reused)
    latents: list[str] = []  # overrides of the preprocessing that makes the next stage's latents
    diffusion: list[str] = []  # overrides of the diffusion stage

    @property
    def own_vae(self) -> bool:
        return bool(self.vae)


def load_ablations(method: str) -> dict[str, Ablation]:
    source = resources.files("lowlight.configs").joinpath("ablations", f"{method}.yaml")
    if not source.is_file():
        raise ConfigError(f"no ablation table for method '{method}' (lowlight/configs/ablations/{method}.yaml)")
    rows = yaml.safe_load(source.read_text()) or {}
    try:
        return {name: Ablation.model_validate(row) for name, row in rows.items()}
    except ValidationError as e:
        raise ConfigError(f"ablations/{method}.yaml: {e}") from None
