"""Stable Diffusion parts: resolve ``pretrained`` (hub id, local dir, s3:// dir or ``tiny``) and load them.

``tiny`` builds the same diffusers classes a cluster loads for SD 1.5/2.1 (AutoencoderKL with a
4-channel latent and x8 downsampling, UNet2DConditionModel, DDPMScheduler) at small widths from a
fixed seed, saves them with ``save_pretrained`` and loads them back through ``from_pretrained``,
so tests exercise the loading path real weights take.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from lowlight import storage

TINY = "tiny"
TINY_VERSION = "v1"
TINY_SEED = 0
TINY_CROSS_ATTENTION_DIM = 32


def cache_root() -> Path:
    return Path(os.environ.get("LOWLIGHT_CACHE", Path.home() / ".cache" / "lowlight"))


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def sd_scheduler() -> DDPMScheduler:
    """The noise schedule SD 1.x/2.x-base train with."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def build_tiny(directory: Path) -> Path:
    """Write the tiny bundle in the diffusers folder layout (vae/, unet/, scheduler/)."""
    torch.manual_seed(TINY_SEED)
    staging = directory.with_name(directory.name + f".{os.getpid()}.partial")
    tiny_vae().save_pretrained(staging / "vae")
    tiny_unet().save_pretrained(staging / "unet")
    sd_scheduler().save_pretrained(staging / "scheduler")
    try:
        staging.rename(directory)
    except OSError:
        if not (directory / "unet").exists():  # lost a race with another worker: theirs is identical
            raise
    return directory


def tiny_dir() -> Path:
    directory = cache_root() / f"tiny-{TINY_VERSION}"
    if not (directory / "unet").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        build_tiny(directory)
    return directory


def resolve(pretrained: str, endpoint_url: str | None = None) -> str:
    """A local directory or hub id that ``from_pretrained`` accepts. ``s3://`` dirs are copied to the cache."""
    if pretrained == TINY:
        return str(tiny_dir())
    if pretrained.startswith("s3://"):
        key = hashlib.sha256(pretrained.encode()).hexdigest()[:16]
        local = cache_root() / "s3" / key
        if not local.exists():
            partial = local.with_name(key + f".{os.getpid()}.partial")
            storage.filesystem(pretrained, endpoint_url).get(pretrained.rstrip("/") + "/", str(partial), recursive=True)
            partial.rename(local)
        return str(local)
    return pretrained


def load_vae(pretrained: str = TINY, vae: str | None = None, endpoint_url: str | None = None) -> AutoencoderKL:
    """The bundle's VAE, or the VAE directory ``vae`` (a fitted or fine-tuned one) when given."""
    if vae:
        model = AutoencoderKL.from_pretrained(resolve(vae, endpoint_url))
    else:
        model = AutoencoderKL.from_pretrained(resolve(pretrained, endpoint_url), subfolder="vae")
    return model.eval().requires_grad_(False)


def fingerprint(module: torch.nn.Module) -> str:
    """Identifies a module's weights: latents are only valid for the VAE that made them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
