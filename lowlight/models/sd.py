"""Stable Diffusion parts: resolve ``pretrained`` (hub id, local dir, s3:// dir or ``tiny``) and load them,
one part at a time (``load_vae``) or as the whole ``SDBundle``.

``tiny`` builds the same diffusers classes a cluster loads for SD 1.5/2.1 (AutoencoderKL with a
4-channel latent and x8 downsampling, UNet2DConditionModel, DDPMScheduler) at small widths from a
fixed seed, saves them with ``save_pretrained`` and loads them back through ``from_pretrained``,
so tests exercise the loading path real weights take.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor

from lowlight import storage
from lowlight.config import ConfigError, ModelConfig
from lowlight.models import prompt
from lowlight.models.prompt import PROMPT_EMBEDDING_FILE, PROMPT_LENGTH, encode_empty_prompt
from lowlight.models.vae_tiling import decode_sample, encode_moments, pool_group_norms

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


def vae_directory(vae: str, endpoint_url: str | None = None) -> str:
    """The diffusers VAE folder ``model.vae`` names: the folder itself (``config.json``), a checkpoint holding
    one as ``vae/`` (DarkDiff's stage 1), or a run directory (its latest checkpoint's ``vae/``)."""
    local = Path(resolve(vae, endpoint_url))
    if (local / "config.json").exists():
        return str(local)
    if (local / "vae" / "config.json").exists():
        return str(local / "vae")
    latest = sorted(local.glob("checkpoint_*/vae/config.json"))
    if latest:
        return str(latest[-1].parent)
    raise ConfigError(f"config key 'model.vae': '{vae}' is neither a diffusers VAE folder (config.json) nor a "
                      f"checkpoint or run directory holding one as vae/ (train DarkDiff's stage 1 first?)")


def load_vae(pretrained: str = TINY, vae: str | None = None, endpoint_url: str | None = None) -> AutoencoderKL:
    """The bundle's VAE, or the VAE ``vae`` names (a fitted or fine-tuned one; see ``vae_directory``)."""
    if vae:
        model = AutoencoderKL.from_pretrained(vae_directory(vae, endpoint_url))
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


def changed_schedule_keys(source: str, model: ModelConfig) -> list[str]:
    """The config keys that change the bundle's prediction type or noise schedule (set to what it already
    has is no change)."""
    config = DDPMScheduler.load_config(source, subfolder="scheduler")
    changed = []
    if model.prediction_type and model.prediction_type != config.get("prediction_type", "epsilon"):
        changed.append("model.prediction_type")
    if model.zero_terminal_snr is not None and model.zero_terminal_snr != config.get("rescale_betas_zero_snr", False):
        changed.append("model.zero_terminal_snr")
    return changed


def load_scheduler(source: str, model: ModelConfig) -> DDPMScheduler:
    """The training noise scheduler from the bundle's scheduler config (SD 1.5 ships PNDM, 2.1 DDIM: same
    betas), with the prediction type and zero-terminal-SNR overrides of the config applied."""
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    overrides = {}
    if model.prediction_type:
        overrides["prediction_type"] = model.prediction_type
    if model.zero_terminal_snr is not None:
        overrides["rescale_betas_zero_snr"] = model.zero_terminal_snr
        if model.zero_terminal_snr:  # Lin et al. 2024: sample from the last timestep, which 'leading' skips
            overrides["timestep_spacing"] = "trailing"
    return DDPMScheduler.from_config(scheduler.config, **overrides) if overrides else scheduler


def save_prompt_embedding(pretrained: str, text_encoder: str | None = None,
                          endpoint_url: str | None = None) -> str:
    """Write CLIP's embedding of "" (from ``text_encoder``, default ``pretrained`` itself) into the
    ``pretrained`` directory (local or ``s3://``), so the bundle loads without its text encoder."""
    source = resolve(pretrained, endpoint_url)
    if pretrained == TINY or not (storage.is_remote(pretrained) or Path(pretrained).is_dir()):
        raise ConfigError(f"'{pretrained}' is not a local or s3:// diffusers directory to save the embedding into")
    unet_config = UNet2DConditionModel.load_config(source, subfolder="unet")
    embedding = encode_empty_prompt(resolve(text_encoder, endpoint_url) if text_encoder else source)
    data = prompt.to_bytes(embedding)
    prompt.from_bytes(data, f"the text encoder of '{text_encoder or pretrained}'", unet_config["cross_attention_dim"])
    url = storage.join(pretrained, PROMPT_EMBEDDING_FILE)
    storage.atomic_write_bytes(url, data, endpoint_url)
    if source != pretrained:  # the node-local copy of an s3:// bundle, which later loads read
        storage.atomic_write_bytes(str(Path(source) / PROMPT_EMBEDDING_FILE), data)
    return url


def bundle_prompt_embedding(pretrained: str, source: str, unet: UNet2DConditionModel) -> Tensor:
    """[1, 77, D]. ``tiny`` has no text encoder and its UNet was never trained with one: zeros."""
    if pretrained == TINY:
        return torch.zeros(1, PROMPT_LENGTH, unet.config.cross_attention_dim)
    return prompt.empty_prompt_embedding(pretrained, source, unet.config.cross_attention_dim)


def apply_denoiser_memory_options(module: torch.nn.Module, model: ModelConfig) -> None:
    """Attention and gradient-checkpointing switches on a UNet, a ControlNet or any diffusers model with
    attention: what trains must get them, not only the UNet."""
    if hasattr(module, "set_attention_slice"):
        if model.attention == "sliced":
            module.set_attention_slice("auto")
        else:
            module.set_attn_processor(AttnProcessor2_0())
    if model.gradient_checkpointing and getattr(module, "_supports_gradient_checkpointing", False):
        module.enable_gradient_checkpointing()


def apply_memory_options(vae: AutoencoderKL, unet: UNet2DConditionModel, model: ModelConfig) -> None:
    apply_denoiser_memory_options(unet, model)
    if model.vae_tiling:
        vae.enable_tiling()
        pool_group_norms(vae)
        if model.vae_tile:
            vae.tile_sample_min_size = model.vae_tile
            vae.tile_latent_min_size = model.vae_tile // 2 ** (len(vae.config.block_out_channels) - 1)
    if model.vae_slicing:
        vae.enable_slicing()


@dataclass
class SDBundle:
    """What every latent-diffusion method stands on: VAE, denoiser, noise scheduler, the fixed
    empty-prompt embedding and the VAE's latent scaling factor."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    prompt_embedding: Tensor
    source: str
    vae_stats_size: int | None = None

    @classmethod
    def load(cls, model: ModelConfig, endpoint_url: str | None = None) -> SDBundle:
        source = resolve(model.pretrained, endpoint_url)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        vae = load_vae(model.pretrained, model.vae, endpoint_url)
        apply_memory_options(vae, unet, model)
        return cls(vae=vae, unet=unet, scheduler=load_scheduler(source, model),
                   prompt_embedding=bundle_prompt_embedding(model.pretrained, source, unet), source=source,
                   vae_stats_size=model.vae_stats_size)

    @classmethod
    def tiny(cls) -> SDBundle:
        return cls.load(ModelConfig(pretrained=TINY))

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel (8 for every SD VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: Tensor) -> Tensor:
        """sRGB in [0, 1] -> scaled latents (the posterior mean, as the Parquet latents are)."""
        x = images.to(self.vae.dtype) * 2 - 1
        return (encode_moments(self.vae, x, self.vae_stats_size) * self.scaling_factor).float()

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> sRGB in [0, 1]."""
        x = decode_sample(self.vae, (latents / self.scaling_factor).to(self.vae.dtype), self.vae_stats_size)
        return ((x.float() + 1) / 2).clamp(0, 1)

    def prompt(self, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return self.prompt_embedding.to(device, dtype).expand(batch, -1, -1)
