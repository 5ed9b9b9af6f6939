"""sRGB image files <-> float arrays (8/16-bit PNG, TIFF, JPEG; SMID's .npy frames), from a path or bytes."""

from __future__ import annotations

import io

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file (NumPy format spec)


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """HWC float32 RGB in [0, 1]; grey is expanded to RGB, alpha dropped. NumPy .npy arrays are
    read as ``decode_npy_image`` reads them."""
    if bytes(data[: len(NPY_MAGIC)]) == NPY_MAGIC:
        return decode_npy_image(data, name)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise ValueError(f"'{name}' is not a readable image (truncated or not an image)")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)
    scale = np.iinfo(img.dtype).max if np.issubdtype(img.dtype, np.integer) else 1.0
    return np.clip(img.astype(np.float32) / scale, 0.0, 1.0)


def decode_npy_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """An sRGB frame stored as a NumPy array, as SMID is released (``SMID_LQ_np``, ``SMID_Long_np``).

    The arrays are H x W x 3 uint8 in OpenCV's BGR order: the released loaders (SNR-Aware and
    Retinexformer, ``data/util.py`` ``read_img2`` + ``read_img_seq2``) divide by 255 and reverse
    the channels to get RGB, and so does this. Anything else is refused, naming the file.
    """
    try:
        array = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"'{name}' is not a readable .npy image: {e}") from e
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"'{name}': expected an H x W x 3 uint8 array (SMID's .npy frames), "
                         f"got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array[:, :, ::-1], dtype=np.float32) / np.float32(255)


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
