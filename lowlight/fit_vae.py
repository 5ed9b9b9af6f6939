"""Fit (or fine-tune) the VAE on images, as DarkDiff and AdaptBIR fine-tune SD's VAE.

The embedded workflow needs it because a randomly initialised tiny VAE's latents mean
nothing; on a cluster the same stage fine-tunes a real SD VAE. Loss: L1 + KL (+ LPIPS when
its weights are available offline). The latent scaling factor is re-estimated at the end so
scaled latents have unit variance, as SD's 0.18215 was chosen.

Images are listed, not loaded: training crops come from a least-recently-used cache of decoded
images bounded by ``fit_vae.cache_mb``, so memory does not grow with the folder. The reported
reconstruction PSNR is measured on held-out images that training never reads: the dataset's own
split when its folders have one (``eval15``, ``val``, ``test``, ...), otherwise a deterministic
share of file names chosen by hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowlight.config import Config
from lowlight.data.images import IMAGE_SUFFIXES, read_image
from lowlight.iqa import lpips_loss_or_none
from lowlight.metrics import psnr
from lowlight.models import sd

# Folder names that mark a dataset's evaluation split (LOL's eval15, LOLv2's Test, ...).
HELD_OUT_FOLDERS = frozenset({"eval15", "eval", "val", "valid", "validation", "test"})
SCALING_BATCHES = 4


def list_images(root: str) -> list[Path]:
    """Every image file under ``root`` (recursive), sorted; nothing is decoded."""
    paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"fit-vae: no images ({', '.join(IMAGE_SUFFIXES)}) under '{root}'")
    return paths


@dataclass(frozen=True)
class ImageSplit:
    train: list[Path]
    held_out: list[Path]
    rule: str  # how the held-out images were chosen, for the report


def _name_hash(path: Path) -> float:
    """A stable number in [0, 1) from the file name (without folder or suffix)."""
    return int.from_bytes(hashlib.sha1(path.stem.encode()).digest()[:8], "big") / 2.0**64


def split_images(root: str, paths: list[Path], fraction: float) -> ImageSplit:
    """Held-out images: the dataset's evaluation folders when there are any, else a hashed share.

    By hash, every file with the same name (a pair's low and high in sibling folders) lands on the
    same side, and at least one name is held out.
    """
    in_eval_folder = [bool(HELD_OUT_FOLDERS & {part.lower() for part in p.relative_to(root).parts[:-1]})
                      for p in paths]
    if any(in_eval_folder):
        held_out = [p for p, held in zip(paths, in_eval_folder) if held]
        rule = f"the dataset's evaluation folders ({', '.join(sorted(HELD_OUT_FOLDERS))})"
    else:
        cut = max(fraction, min(_name_hash(p) for p in paths))
        held_out = [p for p in paths if _name_hash(p) <= cut]
        rule = f"file names whose SHA-1 share is at most {cut:.4f} (holdout_fraction {fraction})"
    held = set(held_out)
    train = [p for p in paths if p not in held]
    if not train:
        raise ValueError(f"fit-vae: every image under '{root}' is held out by {rule}; nothing is left to train on")
    return ImageSplit(train=train, held_out=held_out, rule=rule)


class ImageCache:
    """Decoded images by path; the least recently used go once ``max_bytes`` is exceeded."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._images: OrderedDict[Path, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.peak_nbytes = 0
        self.loads = 0

    def __len__(self) -> int:
        return len(self._images)

    def get(self, path: Path) -> np.ndarray:
        if path in self._images:
            self._images.move_to_end(path)
            return self._images[path]
        image = read_image(str(path))
        self.loads += 1
        self._images[path] = image
        self.nbytes += image.nbytes
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)
        while self.nbytes > self.max_bytes and len(self._images) > 1:
            _, evicted = self._images.popitem(last=False)
            self.nbytes -= evicted.nbytes
        return image


class CropSampler:
    """Random crops with random flips from the training images, read through an ``ImageCache``."""

    def __init__(self, paths: list[Path], size: int, cache: ImageCache, root: str):
        self.paths = list(paths)
        self.size = size
        self.cache = cache
        self.root = root
        self.too_small: list[Path] = []

    def batch(self, count: int, rng: np.random.Generator) -> torch.Tensor:
        """``count`` crops as an NCHW tensor in [-1, 1]; images smaller than a crop are dropped."""
        crops = []
        while len(crops) < count:
            if not self.paths:
                raise ValueError(f"fit-vae: no training image under '{self.root}' is at least {self.size} px "
                                 "on its short side")
            index = int(rng.integers(len(self.paths)))
            image = self.cache.get(self.paths[index])
            h, w = image.shape[:2]
            if min(h, w) < self.size:
                self.too_small.append(self.paths.pop(index))
                continue
            y, x = rng.integers(0, h - self.size + 1), rng.integers(0, w - self.size + 1)
            crop = image[y : y + self.size, x : x + self.size]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crops.append(np.ascontiguousarray(crop.transpose(2, 0, 1)))
        return torch.from_numpy(np.stack(crops)) * 2 - 1


def latent_scaling_factor(vae, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        latents = torch.cat([vae.encode(b).latent_dist.mode() for b in batches])
    return float(1.0 / latents.std())


def evenly_spaced(paths: list[Path], count: int) -> list[Path]:
    """At most ``count`` paths spread over the sorted list (so they span scenes, not one folder)."""
    if len(paths) <= count:
        return list(paths)
    return [paths[i] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]


@torch.no_grad()
def held_out_psnr(vae, paths: list[Path], max_side: int) -> dict[Path, float]:
    """Reconstruction PSNR (dB) of each image's centre crop (side a multiple of 8, at most ``max_side``),
    one image in memory at a time."""
    scores = {}
    for path in paths:
        image = read_image(str(path))
        side = min(max_side, *image.shape[:2]) // 8 * 8
        if side < 8:
            continue
        y, x = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        crop = torch.from_numpy(np.ascontiguousarray(image[y : y + side, x : x + side].transpose(2, 0, 1)))
        target = crop[None] * 2 - 1
        recon = vae.decode(vae.encode(target).latent_dist.mode()).sample
        scores[path] = psnr(recon, target, data_range=2.0)
    return scores


def fit_vae(cfg: Config, images_root: str) -> dict:
    fc = cfg.fit_vae
    torch.manual_seed(fc.seed)
    rng = np.random.default_rng(fc.seed)
    split = split_images(images_root, list_images(images_root), fc.holdout_fraction)
    cache = ImageCache(fc.cache_mb * 2**20)
    sampler = CropSampler(split.train, fc.crop_size, cache, images_root)
    vae = sd.load_vae(cfg.model.pretrained, cfg.model.vae, cfg.storage.endpoint_url).train().requires_grad_(True)
    lpips = lpips_loss_or_none() if fc.lpips_weight > 0 else None
    opt = torch.optim.AdamW(vae.parameters(), lr=fc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / fc.steps, 1.0))))
    started = time.time()
    bar = tqdm(range(fc.steps), desc="fit-vae", unit="step")
    for step in bar:
        x = sampler.batch(fc.batch_size, rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + fc.kl_weight * posterior.kl().mean()
        if lpips is not None:
            loss = loss + fc.lpips_weight * lpips(recon.clamp(-1, 1) * 0.5 + 0.5, x * 0.5 + 0.5).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % fc.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    # The scaling factor describes the training distribution's latents, as SD's was chosen.
    scaling_rng = np.random.default_rng(fc.seed + 1)
    vae.register_to_config(scaling_factor=latent_scaling_factor(
        vae, [sampler.batch(fc.batch_size, scaling_rng) for _ in range(SCALING_BATCHES)]))
    scores = held_out_psnr(vae, evenly_spaced(split.held_out, fc.eval_images), fc.eval_crop)
    if not scores:
        raise ValueError(f"fit-vae: no held-out image under '{images_root}' is at least 8 px on its short side")
    report = {
        "steps": fc.steps,
        "seconds": round(time.time() - started, 1),
        "recon_psnr_db": round(float(np.mean(list(scores.values()))), 2),
        "recon_on": "held_out",
        "scaling_factor": vae.config.scaling_factor,
        "lpips_used": lpips is not None,
        "images": len(split.train) + len(split.held_out),
        "train_images": len(split.train),
        "train_images_too_small": len(sampler.too_small),
        "held_out": {
            "rule": split.rule,
            "images": len(split.held_out),
            "evaluated": [str(p.relative_to(images_root)) for p in scores],
            "eval_crop": fc.eval_crop,
        },
        "image_cache": {"max_mb": fc.cache_mb, "peak_mb": round(cache.peak_nbytes / 2**20, 1), "loads": cache.loads},
        "vae_id": sd.fingerprint(vae),
    }
    save_vae(vae, Path(fc.out), report)
    return report


def save_vae(vae, out: Path, report: dict) -> None:
    """Whole or not at all: save beside the target, then swap it in."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    vae.save_pretrained(partial)
    (partial / "fit_report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
