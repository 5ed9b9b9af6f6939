"""One enhancement request, checked before any model work: the upload (size, kind, domain) and the
options (ranges). Every refusal is a ``Refusal`` with the HTTP status and a message naming the problem."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import PurePath

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lowlight.data.images import IMAGE_SUFFIXES
from lowlight.data.layouts import RAW_EXTS
from lowlight.methods import EnhanceOptions
from lowlight.serving.settings import Limits

RAW_SUFFIXES = tuple(sorted("." + ext for ext in RAW_EXTS))
COLOR_FIXES = ("none", "adain", "wavelet")


class Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class EnhanceParams(BaseModel):
    """What a client may set; None leaves the model's default. Bounds beyond ``Limits`` are sanity ones."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0, le=30)
    seed: int = Field(0, ge=0, lt=2**31)
    ratio: float | None = Field(None, ge=1, description="RAW input: exposure amplification (default: auto)")
    tile: int | None = Field(None, ge=8, le=1024, description="latent pixels per denoiser tile")
    color_fix: str | None = Field(None, pattern="^(" + "|".join(COLOR_FIXES) + ")$")


def parse_params(raw: dict, limits: Limits) -> EnhanceParams:
    given = {k: v for k, v in raw.items() if v not in (None, "")}
    try:
        params = EnhanceParams.model_validate(given)
    except ValidationError as e:
        raise Refusal(422, "; ".join(f"option '{'.'.join(map(str, err['loc']))}': {err['msg']}"
                                     f" (got {err.get('input')!r})" for err in e.errors())) from None
    if params.steps is not None and params.steps > limits.max_steps:
        raise Refusal(422, f"option 'steps': at most {limits.max_steps} on this server (got {params.steps})")
    if params.ratio is not None and params.ratio > limits.max_ratio:
        raise Refusal(422, f"option 'ratio': at most {limits.max_ratio:g} (got {params.ratio:g})")
    return params


def options_for(params: EnhanceParams, honoured: set[str]) -> tuple[EnhanceOptions, dict, list[str]]:
    """The method's options from the request: those it honours are set, the rest are listed as ignored."""
    wanted = {"steps": params.steps, "guidance_scale": params.guidance, "tile": params.tile,
              "color_fix": params.color_fix}
    used = {k: v for k, v in wanted.items() if v is not None and k in honoured}
    ignored = sorted(k for k, v in wanted.items() if v is not None and k not in honoured)
    return EnhanceOptions(seed=params.seed, **used), used | {"seed": params.seed}, ignored


@dataclass
class Upload:
    data: bytes
    filename: str

    @property
    def suffix(self) -> str:
        return PurePath(self.filename).suffix.lower()

    @property
    def is_raw(self) -> bool:
        return self.suffix in RAW_SUFFIXES


def check_upload(upload: Upload, domain: str, model: str, limits: Limits) -> None:
    """Size, kind and domain, from the bytes and the name alone (nothing decoded yet)."""
    if not upload.data:
        raise Refusal(400, f"'{upload.filename}' is empty (0 bytes)")
    if len(upload.data) > limits.max_bytes:
        raise Refusal(413, f"'{upload.filename}' is {len(upload.data)} bytes; this server takes at most "
                           f"{limits.max_bytes}")
    if upload.suffix not in IMAGE_SUFFIXES + RAW_SUFFIXES:
        raise Refusal(415, f"'{upload.filename}': unsupported file type '{upload.suffix}'; send an sRGB image "
                           f"({', '.join(IMAGE_SUFFIXES)}) or a RAW file ({', '.join(RAW_SUFFIXES)})")
    if domain == "raw" and not upload.is_raw:
        raise Refusal(415, f"model '{model}' restores RAW sensor data: send a RAW file ({', '.join(RAW_SUFFIXES)}),"
                           f" not the sRGB image '{upload.filename}'")
    if domain == "srgb" and upload.is_raw:
        raise Refusal(415, f"model '{model}' restores sRGB images: send a PNG, JPEG or TIFF, not the RAW file "
                           f"'{upload.filename}' (RAW files go to a raw model)")
    if not upload.is_raw:
        check_image_header(upload, limits)


def check_image_header(upload: Upload, limits: Limits) -> None:
    """The pixel limit from the header, before a decompression bomb is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(upload.data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as e:
        raise Refusal(413, f"'{upload.filename}': {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise Refusal(400, f"'{upload.filename}' is not a readable image: {e}") from None
    check_pixels(upload.filename, width * height, limits)


def check_pixels(filename: str, pixels: int, limits: Limits) -> None:
    if pixels > limits.max_pixels:
        raise Refusal(413, f"'{filename}' has {pixels} pixels; this server takes at most {limits.max_pixels}")
