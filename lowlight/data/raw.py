"""RAW reading (rawpy), Bayer packing, linear RGB and the sRGB ISPs.

Two ISPs live here:

* ``render_srgb`` is the *target* ISP: rawpy/LibRaw ``postprocess`` with the settings
  SID used for its ground truth, so rendered targets match the published datasets.
* ``simple_isp`` is the documented, differentiable-in-spirit ISP used on packed
  tensors and for metrics; on ``half_size`` renders it reproduces LibRaw.

``read_raw`` takes black and white levels from LibRaw, except for the cameras whose released
datasets pin them (``camera_levels``), and refuses sensors that are not 2x2 Bayer.

All arrays are float32 unless stated otherwise.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import cache

import numpy as np
import rawpy
import tifffile

from lowlight.data.camera_levels import pinned_levels

Source = str | os.PathLike | bytes

PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")

# Linear sRGB (D65) -> XYZ, the constants dcraw/LibRaw use to build rgb_cam.
XYZ_FROM_SRGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)

# TIFF tags that name the camera (TIFF 6.0 Make and Model; DNG 1.4 UniqueCameraModel).
MAKE, MODEL, UNIQUE_CAMERA_MODEL = 271, 272, 50708

# rawpy's default postprocess gamma, (power, toe slope); SID rendered its targets with it.
DEFAULT_GAMMA = (2.222, 4.5)


@dataclass
class RawFrame:
    """One RAW exposure, as read from a file."""

    bayer: np.ndarray  # (H, W) uint16, visible area cropped to even H, W
    pattern: str  # colours of the 2x2 cell in raster order, one of PATTERNS
    black_level: np.ndarray  # (4,) float32, per 2x2 cell position in raster order
    white_level: float
    camera_wb: np.ndarray  # (3,) as-shot R, G, B multipliers with G == 1
    cam_to_srgb: np.ndarray  # (3, 3) white-balanced camera RGB -> linear sRGB


class UnsupportedSensor(ValueError):
    """A RAW file whose colour filter array is not 2x2 Bayer (X-Trans, Foveon, linear DNG)."""


def _open(source: Source) -> rawpy.RawPy:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return rawpy.imread(io.BytesIO(bytes(source)))
    return rawpy.imread(os.fspath(source))


def cam_to_srgb_from_xyz(xyz_to_cam: np.ndarray) -> np.ndarray:
    """dcraw's ``cam_xyz_coeff``: camera RGB -> linear sRGB from an XYZ -> camera matrix.

    Rows of camera<-sRGB are normalised to sum to 1 so that white-balanced camera
    white (1, 1, 1) maps to sRGB white; the result is that matrix's inverse.
    """
    cam_from_srgb = np.asarray(xyz_to_cam, np.float64) @ XYZ_FROM_SRGB
    cam_from_srgb /= cam_from_srgb.sum(axis=1, keepdims=True)
    return np.linalg.inv(cam_from_srgb).astype(np.float32)


def camera_names(source: Source) -> tuple[str, ...]:
    """How a TIFF-based RAW (ARW, NEF, CR2, DNG) names its camera: (Model, Make + Model,
    UniqueCameraModel), empty strings where absent; all empty for other formats (RAF, CR3).

    rawpy does not expose LibRaw's make and model, so they are read from the TIFF tags.
    """
    handle = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with tifffile.TiffFile(handle) as tif:
            tags = tif.pages[0].tags
            make, model, unique = (str(tags[c].value).strip() if c in tags else "" for c in
                                   (MAKE, MODEL, UNIQUE_CAMERA_MODEL))
    except (tifffile.TiffFileError, ValueError, OSError):
        return ("", "", "")
    return model, f"{make} {model}".strip() if model else "", unique


def _source_name(source: Source) -> str:
    return "RAW data" if isinstance(source, (bytes, bytearray, memoryview)) else f"'{os.fspath(source)}'"


def read_raw(source: Source) -> RawFrame:
    """Read a RAW file (path or bytes) into a RawFrame.

    ``cam_to_srgb`` is derived from rawpy's ``rgb_xyz_matrix`` (the file's or LibRaw's
    built-in XYZ -> camera matrix) exactly as LibRaw derives the ``rgb_cam`` it applies in
    ``postprocess``; rawpy's ``color_matrix`` is only a fallback because it is zero for
    many non-DNG files. Black and white levels are LibRaw's for the file unless the camera
    has pinned levels (``camera_levels.PINNED_LEVELS``). A colour filter array other than
    2x2 Bayer raises ``UnsupportedSensor``: an X-Trans sensor's top-left 2x2 can look like
    a Bayer cell, so the repeating pattern's size is checked, not its corner.
    """
    pinned = pinned_levels(camera_names(source))
    with _open(source) as raw:
        cfa = raw.raw_pattern
        if cfa is None or np.shape(cfa) != (2, 2):
            size = "no" if cfa is None else "x".join(map(str, np.shape(cfa)))
            kind = " (Fujifilm X-Trans)" if size == "6x6" else ""
            raise UnsupportedSensor(
                f"{_source_name(source)} has a {size} colour filter array{kind}; only 2x2 Bayer sensors are "
                "packed (SID and ELD pack X-Trans into 9 channels, which lowlight does not)")
        visible = raw.raw_image_visible
        h, w = (visible.shape[0] // 2) * 2, (visible.shape[1] // 2) * 2
        bayer = np.array(visible[:h, :w], dtype=np.uint16)
        # Colour index of each 2x2 cell position; LibRaw's index 3 is the second green.
        cell_colors = np.asarray(raw.raw_colors_visible[:2, :2]).ravel()
        desc = raw.color_desc.decode()
        pattern = "".join(desc[c] for c in cell_colors)
        if pattern not in PATTERNS:
            raise UnsupportedSensor(f"{_source_name(source)}: unsupported colour filter array {pattern!r} "
                                    "(only 2x2 Bayer)")
        black = np.asarray(raw.black_level_per_channel, np.float32)[cell_colors]
        white = float(raw.white_level)
        if pinned is not None:
            white = float(pinned.white_level)
            if pinned.black_level is not None:
                black = np.full(4, pinned.black_level, np.float32)
        wb = np.asarray(raw.camera_whitebalance[:3], np.float32)
        if not np.all(wb > 0):
            wb = np.asarray(raw.daylight_whitebalance[:3], np.float32)
        xyz_to_cam = np.asarray(raw.rgb_xyz_matrix[:3], np.float64)
        if np.any(xyz_to_cam):
            ccm = cam_to_srgb_from_xyz(xyz_to_cam)
        else:
            ccm = np.asarray(raw.color_matrix[:, :3], np.float32)
        return RawFrame(
            bayer=bayer,
            pattern=pattern,
            black_level=black,
            white_level=white,
            camera_wb=(wb / wb[1]).astype(np.float32),
            cam_to_srgb=ccm,
        )


def channel_offsets(pattern: str) -> list[tuple[int, int]]:
    """(row, col) inside the 2x2 cell of R, G1, B, G2; G1 shares a row with R, G2 with B."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown Bayer pattern {pattern!r}; expected one of {PATTERNS}")
    ry, rx = divmod(pattern.index("R"), 2)
    by, bx = divmod(pattern.index("B"), 2)
    return [(ry, rx), (ry, 1 - rx), (by, bx), (by, 1 - bx)]


def pack_mosaic(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    """(H, W) mosaic -> (4, H/2, W/2) in R, G1, B, G2 order (dtype kept)."""
    return np.stack([mosaic[dy::2, dx::2] for dy, dx in channel_offsets(pattern)])


def unpack_mosaic(packed: np.ndarray, pattern: str) -> np.ndarray:
    """Inverse of ``pack_mosaic``: (4, h, w) R, G1, B, G2 -> (2h, 2w) mosaic."""
    _, h, w = packed.shape
    mosaic = np.empty((2 * h, 2 * w), packed.dtype)
    for channel, (dy, dx) in zip(packed, channel_offsets(pattern), strict=True):
        mosaic[dy::2, dx::2] = channel
    return mosaic


def packed_black_level(frame: RawFrame) -> np.ndarray:
    """(4,) float32 black level in the packed R, G1, B, G2 order (``frame.black_level`` is in raster order)."""
    return np.array([frame.black_level[2 * dy + dx] for dy, dx in channel_offsets(frame.pattern)], np.float32)


def pack_bayer(frame: RawFrame) -> np.ndarray:
    """(4, H/2, W/2) float32 in R, G1, B, G2 order, black-subtracted, scaled to [0, 1]."""
    packed = pack_mosaic(frame.bayer.astype(np.float32), frame.pattern)
    black = packed_black_level(frame)[:, None, None]
    return np.clip((packed - black) / (frame.white_level - black), 0.0, 1.0)


def linear_rgb(packed: np.ndarray, wb: np.ndarray, ratio: float = 1.0) -> np.ndarray:
    """DarkDiff-style linear RGB (3, h, w): amplify by ``ratio``, white balance, average greens.

    Each Bayer channel is clipped to [0, 1] before the greens are averaged, as a sensor
    (and LibRaw) saturates per photosite.
    """
    r, g, b = (float(v) for v in wb)
    gains = np.array([r, g, b, g], np.float32)[:, None, None] * np.float32(ratio)
    balanced = np.clip(packed * gains, 0.0, 1.0)
    return np.stack([balanced[0], 0.5 * (balanced[1] + balanced[3]), balanced[2]])


@cache
def _gamma_params(power: float, slope: float) -> tuple[float, float]:
    """dcraw's ``gamma_curve`` solve: (linear-segment threshold, offset) for a given curve.

    The curve is ``slope * x`` below the threshold and ``(1 + offset) x^(1/power) - offset``
    above it, with the constants found by bisection so the pieces join continuously.
    """
    g0, g1 = 1.0 / power, slope
    bounds = [0.0, 0.0]
    bounds[1 if g1 >= 1 else 0] = 1.0
    g2 = 0.0
    for _ in range(48):
        g2 = (bounds[0] + bounds[1]) / 2
        bounds[1 if ((g2 / g1) ** -g0 - 1) / g0 - 1 / g2 > -1 else 0] = g2
    return g2 / g1, g2 * (1 / g0 - 1)


def srgb_gamma(linear: np.ndarray, gamma: tuple[float, float] = DEFAULT_GAMMA) -> np.ndarray:
    """Display encoding used by rawpy's postprocess by default (and so by SID's targets).

    A BT.709-shaped curve: ``4.5 x`` below ~0.018, ``1.099 x^(1/2.222) - 0.099`` above
    (constants solved as dcraw does), not the IEC 61966-2-1 sRGB curve.
    """
    threshold, offset = _gamma_params(*gamma)
    x = np.clip(linear, 0.0, 1.0)
    curve = (1 + offset) * np.power(np.maximum(x, threshold), 1 / gamma[0]) - offset
    return np.where(x < threshold, x * gamma[1], curve).astype(np.float32)


def srgb_gamma_inverse(encoded: np.ndarray, gamma: tuple[float, float] = DEFAULT_GAMMA) -> np.ndarray:
    """Inverse of ``srgb_gamma`` on [0, 1]."""
    threshold, offset = _gamma_params(*gamma)
    y = np.clip(encoded, 0.0, 1.0)
    curve = np.power((np.maximum(y, threshold * gamma[1]) + offset) / (1 + offset), gamma[0])
    return np.where(y < threshold * gamma[1], y / gamma[1], curve).astype(np.float32)


def simple_isp(packed: np.ndarray, wb: np.ndarray, cam_to_srgb: np.ndarray) -> np.ndarray:
    """The documented simple ISP: packed (4, h, w) raw -> (3, h, w) display sRGB in [0, 1].

    Steps, mirroring LibRaw's half-size ``postprocess``: white balance with the multipliers
    divided by their minimum (LibRaw's default highlight-clip normalisation; identical to
    G == 1 whenever R, B >= G), clip each Bayer channel, average the greens, apply
    ``cam_to_srgb``, clip to [0, 1], encode with ``srgb_gamma`` (rawpy's default curve).
    Without demosaicing it has half the sensor's resolution.
    """
    wb = np.asarray(wb, np.float32)
    lin = linear_rgb(packed, wb / wb.min())
    rgb = np.einsum("ij,jhw->ihw", np.asarray(cam_to_srgb, np.float32), lin)
    return srgb_gamma(rgb)


def _amplify_in_place(raw: rawpy.RawPy, ratio: float) -> None:
    """Multiply LibRaw's raw buffer above black by ``ratio``, clipped to white."""
    image = raw.raw_image
    black = np.asarray(raw.black_level_per_channel, np.float64)[raw.raw_colors]
    amplified = black + (image.astype(np.float64) - black) * ratio
    image[...] = np.rint(np.clip(amplified, 0, raw.white_level)).astype(image.dtype)


def render_srgb(source: Source, ratio: float = 1.0, half_size: bool = False) -> np.ndarray:
    """The target ISP: (H, W, 3) float32 sRGB in [0, 1] from rawpy's ``postprocess``.

    Settings follow SID's ground-truth rendering (camera WB, no auto-brightening, 16 bit,
    default gamma) plus ``user_flip=0`` and ``adjust_maximum_thr=0`` so LibRaw neither
    rotates nor rescales. With ``ratio != 1`` the raw values above black are amplified
    inside LibRaw's own buffer first, so amplified short exposures go through exactly
    the ISP that renders the targets.
    """
    with _open(source) as raw:
        if ratio != 1:
            _amplify_in_place(raw, ratio)
        rgb = raw.postprocess(
            use_camera_wb=True,
            no_auto_bright=True,
            output_bps=16,
            user_flip=0,
            adjust_maximum_thr=0,
            gamma=DEFAULT_GAMMA,
            half_size=half_size,
        )
    return rgb.astype(np.float32) / np.float32(65535)
