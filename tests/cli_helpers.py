"""Checks several tests make through the command line."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from lowlight.cli import app
from lowlight.data.images import read_image


def assert_enhances_a_sample_png(checkpoint: Path, sample_root: Path, out: Path, steps: int = 2) -> None:
    """`lowlight enhance` runs ``checkpoint`` on the first low-light PNG of the sample set and writes an image
    of the input's size."""
    png = min((sample_root / "lol").rglob("low/*.png"))
    result = CliRunner().invoke(app, ["enhance", "--checkpoint", str(checkpoint), "--input", str(png),
                                      "--output", str(out), "--steps", str(steps)])
    assert result.exit_code == 0, result.output
    assert read_image(str(out)).shape == read_image(str(png)).shape
