"""sRGB image files <-> float arrays (8- and 16-bit PNG/TIFF/JPEG), from a path or bytes."""

from __future__ import annotations

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """HWC float32 RGB in [0, 1]; grey is expanded to RGB, alpha dropped."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise ValueError(f"'{name}' is not a readable image (truncated or not an image)")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)
    scale = np.iinfo(img.dtype).max if np.issubdtype(img.dtype, np.integer) else 1.0
    return np.clip(img.astype(np.float32) / scale, 0.0, 1.0)


def read_image(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_image(f.read(), path)


def encode_png(img: np.ndarray, bits: int = 16) -> bytes:
    """HWC float in [0, 1] -> PNG bytes (16-bit keeps dark low-light values distinguishable)."""
    dtype = np.uint16 if bits == 16 else np.uint8
    q = np.round(np.clip(img, 0, 1) * np.iinfo(dtype).max).astype(dtype)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(q, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
