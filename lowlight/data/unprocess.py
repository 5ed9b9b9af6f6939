"""sRGB photo -> camera RAW (inverse ISP) and a minimal DNG writer.

``unprocess`` inverts ``raw.simple_isp`` step by step (Brooks et al. 2019,
"Unprocessing Images for Learned Raw Denoising", without the random parameters):
display curve, colour matrix, white balance. ``write_dng`` stores a Bayer mosaic
so that rawpy/LibRaw reads back exactly the values, pattern, levels and
white balance given here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import IO, Any

import numpy as np
import tifffile

from lowlight.data.calibrations import load_calibration
from lowlight.data.layouts import EXIF_EXPOSURE_TIME, EXIF_ISO, read_exif
from lowlight.data.raw import PATTERNS, cam_to_srgb_from_xyz, channel_offsets, srgb_gamma_inverse

# DNG tag codes (DNG 1.4 specification; the EXIF ones come from layouts).
CFA_REPEAT_PATTERN_DIM = 33421
CFA_PATTERN = 33422
DNG_VERSION = 50706
DNG_BACKWARD_VERSION = 50707
UNIQUE_CAMERA_MODEL = 50708
BLACK_LEVEL_REPEAT_DIM = 50713
BLACK_LEVEL = 50714
WHITE_LEVEL = 50717
COLOR_MATRIX_1 = 50721
AS_SHOT_NEUTRAL = 50728
CALIBRATION_ILLUMINANT_1 = 50778

# TIFF field types.
BYTE, ASCII, SHORT, LONG, RATIONAL, SRATIONAL = 1, 2, 3, 4, 5, 10

_CFA_CODES = {"R": 0, "G": 1, "B": 2}
_D65 = 21  # EXIF LightSource code of the illuminant ColorMatrix1 refers to
MIN_SIDE = 22  # LibRaw's identify() treats smaller images as "not RAW"


@dataclass(frozen=True)
class CameraProfile:
    """What a synthetic camera writes into its DNGs."""

    name: str
    pattern: str
    black_level: float | tuple[float, float, float, float]  # scalar or per 2x2 cell (raster order)
    white_level: float
    wb: np.ndarray = field(repr=False)  # (3,) as-shot R, G, B multipliers, G == 1
    xyz_to_cam: np.ndarray = field(repr=False)  # (3, 3) XYZ (D65) -> camera RGB

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown Bayer pattern {self.pattern!r}; expected one of {PATTERNS}")

    @property
    def cam_to_srgb(self) -> np.ndarray:
        """(3, 3) white-balanced camera RGB -> linear sRGB, as LibRaw derives it."""
        return cam_to_srgb_from_xyz(self.xyz_to_cam)

    @property
    def black_cells(self) -> np.ndarray:
        """(4,) black level per 2x2 cell position in raster order."""
        return np.broadcast_to(np.asarray(self.black_level, np.float32), (4,)).copy()

    @classmethod
    def load(cls, camera: str = "sony_a7s2") -> CameraProfile:
        """The profile section of a shipped calibration YAML."""
        p = load_calibration(camera)["profile"]
        black = p["black_level"]
        return cls(
            name=p["model"],
            pattern=p["pattern"],
            black_level=tuple(black) if isinstance(black, list) else float(black),
            white_level=float(p["white_level"]),
            wb=np.asarray(p["wb"], np.float32),
            xyz_to_cam=np.asarray(p["xyz_to_cam"], np.float64),
        )


def unprocess(srgb: np.ndarray, profile: CameraProfile) -> np.ndarray:
    """(H, W, 3) display sRGB in [0, 1] -> (H, W, 3) camera-linear RGB in [0, 1].

    Undoes ``simple_isp``'s display curve, colour matrix and white balance; colours
    outside the camera gamut are clipped.
    """
    linear = srgb_gamma_inverse(np.asarray(srgb, np.float32))
    srgb_to_cam = np.linalg.inv(profile.cam_to_srgb).astype(np.float32)
    balanced = linear @ srgb_to_cam.T
    return np.clip(balanced / np.asarray(profile.wb, np.float32), 0.0, 1.0)


def mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """(H, W, 3) RGB with even H, W -> (H, W) Bayer mosaic sampled through ``pattern``."""
    if rgb.shape[0] % 2 or rgb.shape[1] % 2:
        raise ValueError(f"mosaic needs even height and width, got {rgb.shape[:2]}")
    out = np.empty(rgb.shape[:2], rgb.dtype)
    for colour, (dy, dx) in zip((0, 1, 2, 1), channel_offsets(pattern), strict=True):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, colour]
    return out


def _rationals(values: Sequence[float], denominator: int) -> tuple[int, ...]:
    return tuple(v for x in values for v in (round(float(x) * denominator), denominator))


def _dng_tags(
    profile: CameraProfile, iso: int | None, exposure_time: float | None
) -> list[tuple[int, int, int, Any, bool]]:
    cfa = tuple(_CFA_CODES[c] for c in profile.pattern)
    neutral = 1.0 / np.asarray(profile.wb, np.float64)
    black = [round(float(b)) for b in np.atleast_1d(profile.black_level)]
    tags: list[tuple[int, int, int, Any, bool]] = [
        (DNG_VERSION, BYTE, 4, (1, 4, 0, 0), True),
        (DNG_BACKWARD_VERSION, BYTE, 4, (1, 4, 0, 0), True),
        (UNIQUE_CAMERA_MODEL, ASCII, 0, profile.name, True),
        (CFA_REPEAT_PATTERN_DIM, SHORT, 2, (2, 2), True),
        (CFA_PATTERN, BYTE, 4, cfa, True),
        (BLACK_LEVEL, LONG, len(black), tuple(black), True),
        (WHITE_LEVEL, LONG, 1, (round(profile.white_level),), True),
        (COLOR_MATRIX_1, SRATIONAL, 9, _rationals(np.ravel(profile.xyz_to_cam), 10_000), True),
        (CALIBRATION_ILLUMINANT_1, SHORT, 1, (_D65,), True),
        (AS_SHOT_NEUTRAL, RATIONAL, 3, _rationals(neutral / neutral.max(), 1_000_000), True),
    ]
    if len(black) == 4:
        tags.append((BLACK_LEVEL_REPEAT_DIM, SHORT, 2, (2, 2), True))
    if exposure_time is not None:
        t = Fraction(exposure_time).limit_denominator(1_000_000)
        tags.append((EXIF_EXPOSURE_TIME, RATIONAL, 1, (t.numerator, t.denominator), True))
    if iso is not None:
        tags.append((EXIF_ISO, SHORT, 1, (int(iso),), True))
    return sorted(tags)


def write_dng(
    dest: str | os.PathLike | IO[bytes],
    bayer: np.ndarray,
    profile: CameraProfile,
    *,
    iso: int | None = None,
    exposure_time: float | None = None,
) -> None:
    """Write a (H, W) uint16 Bayer mosaic as an uncompressed CFA DNG.

    ``exposure_time`` (seconds) and ``iso`` go into the EXIF ExposureTime and
    ISOSpeedRatings tags of IFD0 (``read_exposure_tags`` reads them back).
    """
    if bayer.dtype != np.uint16 or bayer.ndim != 2:
        raise ValueError(f"write_dng needs a 2-D uint16 mosaic, got {bayer.dtype} {bayer.shape}")
    if min(bayer.shape) < MIN_SIDE:
        raise ValueError(f"LibRaw rejects raw images under {MIN_SIDE} px a side, got {bayer.shape}")
    tifffile.imwrite(
        dest,
        bayer,
        photometric="cfa",
        extratags=_dng_tags(profile, iso, exposure_time),
        metadata=None,
        software="lowlight",
    )


def read_exposure_tags(source: str | os.PathLike | IO[bytes]) -> tuple[int | None, float | None]:
    """(ISO, exposure time in s) of a TIFF-based RAW (DNG, ARW, NEF, CR2); None when missing.

    A thin view of ``layouts.read_exif`` (IFD0 or EXIF sub-IFD) with None for absent tags.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            exif = read_exif(fh)
    else:
        exif = read_exif(source)
    return (int(exif.iso) if exif.iso > 0 else None), (exif.exposure if exif.exposure > 0 else None)
