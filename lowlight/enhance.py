"""Enhance one image file with a trained checkpoint: an sRGB image (PNG, JPEG, TIFF) or a RAW
file (DNG, ARW, NEF, ...) in, an sRGB PNG out.

The file becomes the batch the method's columns describe, at full size: ``srgb_in`` for sRGB
methods (a RAW is amplified by ``ratio`` and rendered by LibRaw, as preprocessing does), or
``raw_in`` with ``ratio``, ``iso``, ``wb``, ``ccm`` for raw methods. Sides are reflect-padded to a
multiple of ``PAD`` (the VAE's x8 times the backbones' downsamplings) and cropped back after.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowlight import storage
from lowlight.checkpoint import load_method
from lowlight.config import STAGE1_COLUMNS
from lowlight.data.images import IMAGE_SUFFIXES, decode_image, encode_png
from lowlight.data.layouts import read_exif
from lowlight.data.raw import pack_bayer, read_raw, render_srgb
from lowlight.methods import EnhanceOptions, Method
from lowlight.models.sd import cache_root
from lowlight.pre_restore import with_stage1

PAD = 64  # sRGB pixels
AUTO_EXPOSURE_MEAN = 0.1  # 'auto' ratio: brighten the packed raw to this mean (a mid-grey-ish exposure)


@dataclass
class EnhanceReport:
    output: str
    height: int
    width: int
    ratio: float | None
    seconds: float

    def line(self) -> str:
        ratio = f", ratio x{self.ratio:.1f}" if self.ratio else ""
        return f"{self.output}: {self.width}x{self.height}{ratio} in {self.seconds:.1f} s"


def local_checkpoint(checkpoint: str, endpoint_url: str | None = None) -> Path:
    """A local directory for a checkpoint given as a path or an s3:// URL (downloaded once)."""
    if not storage.is_remote(checkpoint):
        path = Path(checkpoint)
        if not (path / "config.yaml").exists():
            raise FileNotFoundError(f"'{checkpoint}' is not a checkpoint directory (no config.yaml)")
        return path
    local = cache_root() / "checkpoints" / hashlib.sha256(checkpoint.encode()).hexdigest()[:16]
    if not local.exists():
        partial = local.with_name(local.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        storage.filesystem(checkpoint, endpoint_url).get(checkpoint.rstrip("/") + "/", str(partial), recursive=True)
        partial.rename(local)
    return local


def auto_ratio(packed: np.ndarray) -> float:
    return float(np.clip(AUTO_EXPOSURE_MEAN / max(float(packed.mean()), 1e-6), 1.0, 1000.0))


def load_batch(data: bytes, name: str, method: Method, ratio: float | None, iso: float | None
               ) -> tuple[dict[str, torch.Tensor], float | None]:
    """The method's input columns for one file (batch of 1), and the ratio used for a RAW."""
    if name.lower().endswith(IMAGE_SUFFIXES):
        if method.cfg.domain == "raw":
            raise ValueError(f"'{name}' is an sRGB image but method '{method.name}' restores raw: give a RAW file")
        image = decode_image(data, name).transpose(2, 0, 1)
        return {"srgb_in": torch.from_numpy(np.ascontiguousarray(image))[None]}, None
    try:
        frame = read_raw(data)
    except Exception as e:  # LibRaw raises many types for foreign or truncated files
        raise ValueError(f"'{name}' is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a readable RAW file: "
                         f"{type(e).__name__}: {e}") from e
    packed = pack_bayer(frame)
    ratio = ratio or auto_ratio(packed)
    if method.cfg.domain == "srgb":
        image = render_srgb(data, ratio=ratio).transpose(2, 0, 1)
        return {"srgb_in": torch.from_numpy(np.ascontiguousarray(image))[None]}, ratio
    iso = iso or read_exif(io.BytesIO(data)).iso
    if not iso:
        raise ValueError(f"'{name}' has no ISO in its EXIF and method '{method.name}' needs it: pass --iso")
    batch = {"raw_in": torch.from_numpy(packed)[None], "ratio": torch.tensor([ratio]), "iso": torch.tensor([iso]),
             "wb": torch.from_numpy(frame.camera_wb)[None], "ccm": torch.from_numpy(frame.cam_to_srgb)[None]}
    return batch, ratio


def pad_images(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Reflect-pad every image tensor's sides up to a multiple (raw is packed: half the sRGB size)."""
    out = {}
    for key, value in batch.items():
        if value.dim() != 4:
            out[key] = value
            continue
        step = multiple // 2 if key.startswith("raw") else multiple
        h, w = value.shape[-2:]
        out[key] = F.pad(value, (0, -w % step, 0, -h % step), mode="reflect")
    return out


def enhance_file(checkpoint: str, input_path: str, output_path: str, opts: EnhanceOptions | None = None, *,
                 ratio: float | None = None, iso: float | None = None, device: str | None = None,
                 endpoint_url: str | None = None) -> EnhanceReport:
    tick = time.perf_counter()
    cfg, method = load_method(local_checkpoint(checkpoint, endpoint_url))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    method.to(device)
    batch, used_ratio = load_batch(storage.read_bytes(input_path, endpoint_url), input_path, method, ratio, iso)
    height, width = (batch["srgb_in"].shape[-2:] if "srgb_in" in batch
                     else tuple(2 * s for s in batch["raw_in"].shape[-2:]))
    padded = {k: v.to(device) for k, v in pad_images(batch, PAD).items()}
    if cfg.preprocess.pre_restore and set(STAGE1_COLUMNS) & set(method.optional_columns_for(cfg.method)):
        padded = with_stage1(padded, cfg.preprocess.pre_restore, method.bundle.encode, endpoint_url)
    image = method.enhance(padded, opts or EnhanceOptions())[0, :, :height, :width]
    png = encode_png(np.ascontiguousarray(image.permute(1, 2, 0).float().cpu().numpy()), bits=8)
    storage.atomic_write_bytes(output_path, png, endpoint_url)
    return EnhanceReport(output_path, int(height), int(width), used_ratio, time.perf_counter() - tick)
