"""Camera calibrations shipped as package data: one YAML file per camera."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml


def available() -> list[str]:
    """Names accepted by ``load_calibration`` (YAML file stems)."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".yaml"))


def load_calibration(name: str) -> dict[str, Any]:
    """The parsed YAML of camera ``name`` (e.g. ``"sony_a7s2"``)."""
    path = resources.files(__name__).joinpath(f"{name}.yaml")
    if not path.is_file():
        raise ValueError(f"unknown camera calibration {name!r}; available: {available()}")
    return yaml.safe_load(path.read_text())
