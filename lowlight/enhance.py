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
    """A local directory for a checkpoint given as a path or an s3:// URL (downloaded once). A local run
    directory (``train.storage_path/train.name``) stands for its latest checkpoint."""
    if not storage.is_remote(checkpoint):
        path = Path(checkpoint)
        if not (path / "config.yaml").exists():
            latest = sorted(path.glob("checkpoint_*/config.yaml"))
            if not latest:
                raise FileNotFoundError(f"'{checkpoint}' is neither a checkpoint directory (no config.yaml) "
                                        "nor a run directory with checkpoints")
            path = latest[-1].parent
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
    batch = {"raw_in": torch.from_numpy(packed)[None], "ratio": torch.tensor([ratio]),
             "wb": torch.from_numpy(frame.camera_wb)[None], "ccm": torch.from_numpy(frame.cam_to_srgb)[None]}
    if "iso" in method.columns_for(method.cfg):  # the noise-model methods condition on it
        iso = iso or read_exif(io.BytesIO(data)).iso
        if not iso:
            raise ValueError(f"'{name}' has no ISO in its EXIF and method '{method.name}' needs it: pass --iso")
        batch["iso"] = torch.tensor([iso])
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


@dataclass
class Prepared:
    """One decoded input, padded for the networks; ``height``/``width`` are the sRGB size to crop back to."""

    batch: dict[str, torch.Tensor]
    height: int
    width: int
    ratio: float | None

    def shape_key(self) -> tuple:
        """Inputs with equal keys stack into one batch."""
        return tuple(sorted((k, tuple(v.shape[1:])) for k, v in self.batch.items()))


class Enhancer:
    """A checkpoint loaded once onto a device (the CLI builds one per call, a serving replica one for its
    life): ``prepare`` decodes a file into the method's columns, ``run`` enhances inputs of one shape as
    a batch."""

    def __init__(self, checkpoint: str, device: str | None = None, endpoint_url: str | None = None):
        self.directory = local_checkpoint(checkpoint, endpoint_url)
        self.cfg, self.method = load_method(self.directory)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.method.to(self.device)
        self.endpoint_url = endpoint_url

    def prepare(self, data: bytes, name: str, ratio: float | None = None, iso: float | None = None) -> Prepared:
        batch, used_ratio = load_batch(data, name, self.method, ratio, iso)
        height, width = (batch["srgb_in"].shape[-2:] if "srgb_in" in batch
                         else tuple(2 * s for s in batch["raw_in"].shape[-2:]))
        return Prepared(pad_images(batch, PAD), int(height), int(width), used_ratio)

    @torch.no_grad()
    def run(self, inputs: list[Prepared], opts: EnhanceOptions) -> list[np.ndarray]:
        """HWC float32 sRGB in [0, 1], one per input; all inputs must share ``shape_key``."""
        if len({p.shape_key() for p in inputs}) != 1:
            raise ValueError("Enhancer.run: inputs of different shapes cannot form one batch")
        batch = {k: torch.cat([p.batch[k] for p in inputs]).to(self.device) for k in inputs[0].batch}
        cfg = self.cfg
        if cfg.preprocess.pre_restore and set(STAGE1_COLUMNS) & set(self.method.optional_columns_for(cfg.method)):
            batch = with_stage1(batch, cfg.preprocess.pre_restore, self.method.bundle.encode, self.endpoint_url)
        return crop_outputs(self.method.enhance(batch, opts), inputs)

    @torch.no_grad()
    def input_preview(self, prepared: Prepared) -> np.ndarray:
        """The input as the method sees it, in sRGB (a RAW amplified by its ratio and rendered with its own
        white balance and colour matrix): the 'before' of a comparison."""
        batch = {k: v.to(self.device) for k, v in prepared.batch.items()}
        return crop_outputs(self.method.to_srgb(self.method.degraded(batch), batch), [prepared])[0]


def crop_outputs(images: torch.Tensor, inputs: list[Prepared]) -> list[np.ndarray]:
    """Undo the padding: HWC float32 arrays. A raw method renders its packed Bayer planes, so its output
    is half the sensor's size; the crop scales with the output."""
    padded = inputs[0].batch.get("srgb_in")
    padded_height = padded.shape[-2] if padded is not None else 2 * inputs[0].batch["raw_in"].shape[-2]
    scale = images.shape[-2] / padded_height
    return [np.ascontiguousarray(image[:, :round(p.height * scale), :round(p.width * scale)]
                                 .permute(1, 2, 0).float().cpu().numpy()) for image, p in zip(images, inputs, strict=True)]


def enhance_file(checkpoint: str, input_path: str, output_path: str, opts: EnhanceOptions | None = None, *,
                 ratio: float | None = None, iso: float | None = None, device: str | None = None,
                 endpoint_url: str | None = None) -> EnhanceReport:
    tick = time.perf_counter()
    enhancer = Enhancer(checkpoint, device, endpoint_url)
    prepared = enhancer.prepare(storage.read_bytes(input_path, endpoint_url), input_path, ratio, iso)
    (image,) = enhancer.run([prepared], opts or EnhanceOptions())
    storage.atomic_write_bytes(output_path, encode_png(image, bits=8), endpoint_url)
    return EnhanceReport(output_path, image.shape[0], image.shape[1], prepared.ratio, time.perf_counter() - tick)
