"""What a served application is made of: ``serve/config.yaml``'s application ``args``, the CLI's flags.
Unknown keys are errors, so a misspelt setting is not silently ignored."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lowlight.checkpoint import run_name

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(Strict):
    name: str = Field(description="what clients ask for (the `model` field)")
    checkpoint: str = Field(description="checkpoint or run directory (its latest checkpoint), local or s3://")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"model name {value!r}: use letters, digits, '_', '.', '-' (at most 64)")
        return value


class Limits(Strict):
    max_bytes: int = Field(100 * 2**20, ge=1, description="largest upload")
    max_pixels: int = Field(25_000_000, ge=1, description="largest image (sRGB pixels; a 24 MP RAW fits)")
    max_steps: int = Field(200, ge=1)
    max_ratio: float = Field(1000.0, gt=1)


class Batching(Strict):
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)


class ModelDeployment(Strict):
    """Serve options of every model deployment (scale these; the ingress stays one replica)."""

    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = Field(8, ge=1, description=">= max_batch_size, or batches never fill")
    max_queued_requests: int = Field(32, ge=-1, description="beyond this the API answers 503 (-1: no limit)")
    health_check_period_s: float = Field(2.0, gt=0, description="how soon a dead replica is noticed")
    num_cpus: float = Field(1.0, ge=0)
    gpu: Literal["auto", "never"] = Field("auto", description="auto: one GPU per replica when the cluster has any")


class UI(Strict):
    enabled: bool = True
    auth: str | None = Field(None, description="'user:password' for the Gradio page (off by default)")
    examples: list[str] = Field(default_factory=lambda: ["out/samples/raw/*/short/*", "out/samples/lol/eval15/low/*"],
                                description="glob patterns of sample files offered as examples")
    max_examples: int = 24
    concurrency_limit: int = Field(8, ge=1, description="UI requests in flight at once (so batches can form)")


class ServeArgs(Strict):
    models: list[ModelEntry] = Field(min_length=1)
    limits: Limits = Limits()
    batching: Batching = Batching()
    model_deployment: ModelDeployment = ModelDeployment()
    ui: UI = UI()
    endpoint_url: str | None = Field(None, description="S3 endpoint for s3:// checkpoints (default: AWS_ENDPOINT_URL)")

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelEntry]) -> list[ModelEntry]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {names}")
        return models


def models_from_checkpoints(checkpoints: list[str]) -> list[ModelEntry]:
    """Names for bare checkpoint paths: the run's name (``runs/<name>/checkpoint_N`` or ``runs/<name>``)."""
    entries = []
    for checkpoint in checkpoints:
        name = run_name(checkpoint)
        taken = {e.name for e in entries}
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}-{n}", n + 1
        entries.append(ModelEntry(name=re.sub(r"[^A-Za-z0-9_.-]", "-", unique)[:64], checkpoint=checkpoint))
    return entries


def application_args(config: Path) -> dict[str, Any]:
    """The ``args`` of the single application in a ``serve deploy`` config file."""
    apps = yaml.safe_load(config.read_text()).get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{config}: expected one application, found {len(apps)}")
    return apps[0].get("args") or {}
