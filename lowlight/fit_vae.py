"""Fit (or fine-tune) the VAE on images, as DarkDiff and AdaptBIR fine-tune SD's VAE.

The embedded workflow needs it because a randomly initialised tiny VAE's latents mean
nothing; on a cluster the same stage fine-tunes a real SD VAE. Loss: L1 + KL (+ LPIPS when
its weights are available offline). The latent scaling factor is re-estimated at the end so
scaled latents have unit variance, as SD's 0.18215 was chosen.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowlight.config import Config
from lowlight.data.images import IMAGE_SUFFIXES, read_image
from lowlight.metrics import psnr
from lowlight.models import sd

MAX_IMAGES = 4000


def collect_images(root: str) -> list[np.ndarray]:
    """All images under ``root`` (recursive) as HWC float32 in [0, 1]."""
    paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"fit-vae: no images ({', '.join(IMAGE_SUFFIXES)}) under '{root}'")
    return [read_image(str(p)) for p in paths[:MAX_IMAGES]]


def random_crops(images: list[np.ndarray], size: int, count: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random crops with random flips, as an NCHW tensor in [-1, 1]."""
    crops = []
    for _ in range(count):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        crop = img[y : y + size, x : x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop.transpose(2, 0, 1)))
    return torch.from_numpy(np.stack(crops)) * 2 - 1


def _lpips_or_none():
    try:
        import pyiqa

        return pyiqa.create_metric("lpips", as_loss=True)
    except Exception:  # noqa: BLE001 - weights absent offline: train without LPIPS, report it
        return None


def latent_scaling_factor(vae, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        latents = torch.cat([vae.encode(b).latent_dist.mode() for b in batches])
    return float(1.0 / latents.std())


def fit_vae(cfg: Config, images_root: str) -> dict:
    fc = cfg.fit_vae
    torch.manual_seed(fc.seed)
    rng = np.random.default_rng(fc.seed)
    images = [im for im in collect_images(images_root) if min(im.shape[:2]) >= fc.crop_size]
    if not images:
        raise ValueError(f"fit-vae: no image under '{images_root}' is at least {fc.crop_size} px on its short side")
    vae = sd.load_vae(cfg.model.pretrained, cfg.model.vae, cfg.storage.endpoint_url).train().requires_grad_(True)
    lpips = _lpips_or_none() if fc.lpips_weight > 0 else None
    opt = torch.optim.AdamW(vae.parameters(), lr=fc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / fc.steps, 1.0))))
    started = time.time()
    bar = tqdm(range(fc.steps), desc="fit-vae", unit="step")
    for step in bar:
        x = random_crops(images, fc.crop_size, fc.batch_size, rng)
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
    held_out = [random_crops(images, fc.crop_size, fc.batch_size, np.random.default_rng(fc.seed + 1)) for _ in range(4)]
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, held_out))
    with torch.no_grad():
        recon_psnr = float(np.mean([psnr(vae.decode(vae.encode(b).latent_dist.mode()).sample, b, data_range=2.0)
                                    for b in held_out]))
    report = {
        "steps": fc.steps,
        "seconds": round(time.time() - started, 1),
        "recon_psnr_db": round(recon_psnr, 2),
        "scaling_factor": vae.config.scaling_factor,
        "lpips_used": lpips is not None,
        "images": len(images),
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
