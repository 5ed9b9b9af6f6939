"""Typed configuration: one YAML file plus ``--set a.b=c`` overrides, validated by pydantic.

Every model forbids unknown keys, so a typo is an error that names the key instead of a
silently ignored setting. The resolved config is saved next to every output.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_COLUMNS = ("raw_in", "raw_gt", "lrgb_in", "srgb_in", "srgb_gt", "z_in", "z_gt")
TENSOR_COLUMNS = (*DEFAULT_COLUMNS, "lrgb_gt")  # lrgb_gt: the clean frame as linear RGB (DarkDiff's z_0 source)
RAW_ONLY_COLUMNS = ("raw_in", "raw_gt", "lrgb_in", "lrgb_gt")
HALF_RES_SOURCES = ("raw", "lrgb")  # packed Bayer / linear RGB live at half the sRGB resolution
STAGE1_COLUMNS = ("srgb_pre", "z_pre")  # written when preprocess.pre_restore names a stage-1 checkpoint
LATENT_COLUMNS = {"z_in": "srgb_in", "z_gt": "srgb_gt"}


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Strict):
    endpoint_url: str | None = Field(None, description="S3 endpoint; falls back to AWS_ENDPOINT_URL")


class RayConfig(Strict):
    address: str | None = Field(None, description="'auto' to join a running cluster; None starts a local one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster (None: all)")


class DatasetConfig(Strict):
    layout: str = "sid"
    root: str = "out/samples/raw"
    camera: str | None = None
    splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]
    drop_misaligned: bool = Field(False, description="sid: drop the misaligned Sony test scenes 10034, 10045, "
                                  "10172 as DNF's Sony_new_test_list.txt does (SID's, ELD's and PMN's lists keep them)")
    eld_ratios: list[Literal[1, 10, 100, 200]] = Field(
        [100, 200], min_length=1, description="eld: the low-light factors whose frames become records "
        "(default: the x100 and x200 sets ELD's test_ELD.py evaluates)")


class SamplesConfig(Strict):
    out: str = "out/samples"
    from_dir: str | None = Field(None, description="folder of photos to synthesise from (default: skimage.data)")
    photos: Literal["default", "extended"] = Field(
        "default", description="default: 7 skimage.data photos (small, fast); extended: the photos `lowlight photos` "
        "extracted to photos_dir, split as its manifest says")
    photos_dir: str = Field("out/photos/extended", description="folder of the extended photo set")
    seed: int = 0
    max_side: int = Field(512, ge=64)


class ModelConfig(Strict):
    pretrained: str = Field("tiny", description="'tiny', a hub id, or a local diffusers directory")
    vae: str | None = Field(None, description="a fitted/fine-tuned AutoencoderKL directory that replaces the bundle's VAE")
    init_from: str | None = Field(None, description="checkpoint of an earlier training stage whose modules "
                                  "initialise this one's (frozen and trainable alike; its own init_from first)")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="override the scheduler's (None: as the pretrained scheduler config says)")
    zero_terminal_snr: bool | None = Field(None, description="rescale betas to zero terminal SNR (None: as configured)")
    attention: Literal["sdpa", "sliced"] = Field("sdpa", description="sliced attention trades speed for memory")
    gradient_checkpointing: bool = False
    vae_tiling: bool = Field(True, description="encode/decode large images tile by tile")
    vae_tile: int | None = Field(None, ge=64, description="VAE tile side in pixels (None: the VAE's sample_size)")
    vae_stats_size: int | None = Field(1024, ge=64, description="long side (px) of the untiled pass whose GroupNorm "
                                       "statistics every VAE tile uses (None: the whole image, exact but untiled memory)")
    vae_slicing: bool = Field(False, description="encode/decode a batch one image at a time")
    frozen_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype of the frozen VAE/UNet (auto: bf16 on CUDA, fp32 on CPU)")


class FitVaeConfig(Strict):
    out: str = "out/vae"
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(8, ge=1)
    crop_size: int = Field(64, ge=16)
    lr: float = Field(2e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    lpips_weight: float = Field(0.0, ge=0, description="used only when LPIPS weights are available offline")
    seed: int = 0
    log_every: int = Field(100, ge=1)
    holdout_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of file names held out when the folders have no val/test/eval15 split")
    eval_images: int = Field(32, ge=1, description="held-out images whose reconstruction PSNR is reported")
    eval_crop: int = Field(256, ge=16, description="side of each held-out image's centre crop (at most the image)")
    cache_mb: int = Field(1024, ge=1, description="decoded training images kept in memory (least recently used go)")

    @field_validator("crop_size", "eval_crop")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8 (the VAE downsamples by 8)")
        return v


class PreprocessConfig(Strict):
    output: str = "out/parquet/sample_raw"
    crop_size: int = Field(128, ge=16, description="crop side in sRGB pixels (raw crops are half of it)")
    crops_per_image: int = Field(4, ge=1, description="random crops per training image")
    eval_crop: Literal["center", "grid"] = "center"
    seed: int = 0
    columns: list[str] = list(DEFAULT_COLUMNS)
    latents_from: Literal["srgb", "lrgb", "raw"] = Field(
        "srgb", description="what z_in/z_gt encode: srgb_in/srgb_gt, or (RAW sets, DarkDiff) lrgb_in/lrgb_gt or "
        "raw_in/raw_gt, upsampled x2 to the crop size (the simple demosaic) for a VAE with as many input channels")
    vae_batch_size: int = Field(8, ge=1)
    vae_actors: int | None = Field(None, ge=1, description="VAE actors (None: one per GPU; on a CPU-only cluster, "
                                   "one fused decode+encode actor per decode_cpus CPUs)")
    fuse_decode_encode: bool | None = Field(None, description="decode and VAE-encode in one actor stage "
                                            "(None: when the cluster has no GPU)")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode task or fused actor; also its threads")
    decode_memory: int = Field(3 * 2**29, gt=0, description="bytes Ray reserves per decode task or fused actor "
                               "(1.5 GiB: a 4256x2848 RAW pair peaks at about 1 GiB with every column)")
    file_bytes: int = Field(128 * 2**20, ge=2**10, description="largest Parquet file, in bytes of Arrow data")
    row_group_bytes: int = Field(128 * 2**20, ge=2**10, description="largest row group, in bytes of Arrow data")
    records_per_shard: int = Field(256, ge=1, description="resume granularity: a shard is written whole or not at all")
    pre_restore: str | None = Field(None, description="checkpoint (local or s3://) of a non-diffusion sRGB method "
                                    "run on srgb_in: its output and latent are written as srgb_pre and z_pre")

    @field_validator("crop_size")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError("must be a multiple of 16 (Bayer packing halves it, the VAE divides by 8)")
        return v

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(TENSOR_COLUMNS) - set(STAGE1_COLUMNS))
        if unknown:
            raise ValueError(f"unknown columns {unknown}; choose from {list(TENSOR_COLUMNS + STAGE1_COLUMNS)}")
        return v

    @model_validator(mode="after")
    def _stage1_needs_a_checkpoint(self) -> PreprocessConfig:
        asked = [c for c in self.columns if c in STAGE1_COLUMNS]
        if asked and not self.pre_restore:
            raise ValueError(f"columns {asked} are the stage-1 restoration's output: set preprocess.pre_restore "
                             f"to the checkpoint that makes them")
        return self


class MethodConfig(Strict):
    name: str = Field("exposure_diffusion", description="a registered method (lowlight.methods.REGISTRY)")
    domain: Literal["raw", "srgb"] = Field("raw", description="restore packed raw or sRGB images")
    backbone: str = Field("nafnet-l4-w16", description="'unet' (SID U-Net) or a NAFNet preset")
    width: int | None = Field(None, ge=1, description="backbone width (None: the preset's)")
    options: dict[str, Any] = Field(default_factory=dict, description="method-specific, validated by the method")


class TrainConfig(Strict):
    data: str = Field("out/parquet/sample_raw", description="preprocessed Parquet folder (local or s3://)")
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1, description="per worker")
    steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_every: int = Field(1000, ge=1, description="'step' schedule: halve the lr this often")
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    shuffle_buffer: int = Field(256, ge=0, description="rows in each worker's local shuffle buffer, on top of the "
                                "seeded file order (memory: rows x row size; 0: file order only)")
    data_cpus: float = Field(1.0, ge=0, description="CPUs the cluster must have beyond the workers' so Ray Data can "
                             "stream batches (checked before training; 0 skips the check, e.g. while autoscaling)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    ema_decay: float | None = Field(None, gt=0, lt=1)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    val_every: int = Field(50, ge=1)
    val_batches: int = Field(4, ge=1)
    val_images: int = Field(4, ge=0, description="sample images written next to each checkpoint")
    storage_path: str = "out/runs"
    name: str = "sample"
    num_to_keep: int | None = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)


class Config(Strict):
    dataset: DatasetConfig = DatasetConfig()
    samples: SamplesConfig = SamplesConfig()
    model: ModelConfig = ModelConfig()
    fit_vae: FitVaeConfig = FitVaeConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("lowlight.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.is_file():
        text = path.read_text()
    elif source in preset_names():
        text = resources.files("lowlight.configs").joinpath(f"{source}.yaml").read_text()
    else:
        raise ConfigError(f"config '{source}' is neither a file nor a preset ({', '.join(preset_names())})")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config '{source}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config '{source}' must be a mapping at the top level")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` in place; the value is parsed as YAML (so 3, 1e-4, [a, b], null work)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{override}' must look like key.path=value")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        lines.append(f"config key '{key}': {e['msg']}")
    return "\n".join(lines)


def load_config(source: str | None = None, overrides: list[str] | None = None) -> Config:
    data = _read_yaml(source) if source else {}
    for override in overrides or []:
        apply_override(data, override)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
