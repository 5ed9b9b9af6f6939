"""The Ray Train loop: any registered method, trained from Parquet by a TorchTrainer.

Determinism is by construction rather than by saved RNG state: every worker builds the model
from the same seed, takes its rows of the (id-sorted) split, and draws each step's batch and
noise from a generator seeded by (seed, rank, step, micro-step). A run resumed from a
checkpoint (weights, optimizer, scheduler, EMA, step) therefore continues exactly as an
uninterrupted run would.

Hugging Face ``accelerate`` runs inside each Ray Train worker (Ray has already set up the torch
process group): it wraps the model in DDP, autocasts to bf16, and does gradient accumulation,
clipping and backward. The LR scheduler stays outside ``accelerator.prepare``: its
``AcceleratedScheduler`` steps once per process per call, which would advance the schedule
``num_workers`` times per optimizer step here (``train.batch_size`` is per worker).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from accelerate import Accelerator
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lowlight import checkpoint, storage
from lowlight.config import Config, ConfigError
from lowlight.methods import Method, build_method, method_class, parse_options
from lowlight.models import sd
from lowlight.optim import EMA, lr_lambda
from lowlight.raycluster import ensure_ray
from lowlight.validation import sample_grid, validate


@dataclass
class TrainResult:
    checkpoint: str
    metrics: dict


def parquet_files(cfg: Config) -> list[str]:
    files = storage.listdir(cfg.train.data, "part-*.parquet", cfg.storage.endpoint_url)
    if not files:
        raise ConfigError(f"config key 'train.data': no part-*.parquet under '{cfg.train.data}' (run preprocess first)")
    return files


def preflight(cfg: Config) -> dict:
    """Fail before any worker starts: method/options, columns present, latents from the right VAE."""
    parse_options(cfg.method)
    files = parquet_files(cfg)
    fs = storage.filesystem(files[0], cfg.storage.endpoint_url)
    with fs.open(files[0], "rb") as f:
        schema = pq.read_schema(f)
    needed = method_class(cfg.method.name).columns_for(cfg.method)
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise ConfigError(f"'{cfg.train.data}' lacks column(s) {missing} that method '{cfg.method.name}' "
                          f"({cfg.method.domain}) needs; re-run preprocess with them in preprocess.columns")
    if any(c.startswith("z_") for c in needed):
        _check_vae(cfg, files, fs)
    image_column = "raw_in" if cfg.method.domain == "raw" else "srgb_in"
    return {"channels": int(schema.field(image_column).type.shape[0]), "columns": list(needed)}


def _check_vae(cfg: Config, files: list[str], fs) -> None:
    made_by = set()
    for path in files:
        with fs.open(path, "rb") as f:
            made_by |= set(pq.read_table(f, columns=["vae_id"]).column("vae_id").to_pylist())
    expected = sd.fingerprint(sd.load_vae(cfg.model.pretrained, cfg.model.vae, cfg.storage.endpoint_url))
    if made_by != {expected}:
        raise ConfigError(f"latents in '{cfg.train.data}' were made by VAE {sorted(made_by)}, but the configured VAE "
                          f"(model.pretrained={cfg.model.pretrained}, model.vae={cfg.model.vae}) is {expected}; "
                          "re-run preprocess with this VAE or point model.vae at the one that made them")


def read_split(cfg: Config, split: str, columns: list[str]) -> ray.data.Dataset:
    fs, _ = storage.arrow_filesystem(cfg.train.data, cfg.storage.endpoint_url)
    paths = [storage.arrow_filesystem(p, cfg.storage.endpoint_url)[1] for p in parquet_files(cfg)]
    # Materialised on the driver before the workers take their CPUs: read tasks scheduled later
    # would wait for CPUs the training workers hold (a deadlock when they hold them all).
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["id", "split", *columns])
    return ds.filter(expr=f"split == '{split}'").drop_columns(["split"]).materialize()


def load_rows(shard, columns: list[str], rank: int, world: int, limit: int | None = None) -> dict[str, torch.Tensor]:
    """This worker's rows as float32 tensors: sorted by id, then every world-th row from rank."""
    batches = list(shard.iter_batches(batch_size=1024, batch_format="numpy"))
    if not batches:
        raise ValueError("a training split is empty: check train.train_split / train.val_split and the Parquet")
    ids = np.concatenate([b["id"] for b in batches])
    order = np.argsort(ids, kind="stable")[rank::world][:limit]
    return {c: torch.from_numpy(np.concatenate([b[c] for b in batches])[order].astype(np.float32)) for c in columns}


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    key = hashlib.sha256(f"{seed}/{rank}/{step}/{micro}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") >> 1)


def batch_at(rows: dict[str, torch.Tensor], size: int, generator: torch.Generator,
             device: torch.device) -> dict[str, torch.Tensor]:
    n = next(iter(rows.values())).shape[0]
    index = torch.randperm(n, generator=torch.Generator().manual_seed(generator.initial_seed()))[:size]
    return {k: v[index].to(device) for k, v in rows.items()}


def make_accelerator(cfg: Config, world: int) -> Accelerator:
    """An Accelerator joined to the process group Ray Train has already set up."""
    ray_device = ray.train.torch.get_device()
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and ray_device.type == "cuda")
    # cpu=True on CPU workers: without it accelerate sees no GPU, takes the run for a single
    # process and would neither wrap the model in DDP nor skip gradient sync while accumulating.
    accelerator = Accelerator(cpu=ray_device.type == "cpu", mixed_precision="bf16" if bf16 else "no",
                              gradient_accumulation_steps=cfg.train.grad_accum)
    # Both must agree, or gradients go unsynchronised / batches land on another GPU than the model.
    if accelerator.num_processes != world or (ray_device.type == "cuda" and accelerator.device != ray_device):
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} process(es) ({accelerator.distributed_type}) "
                           f"on {accelerator.device}, Ray Train {world} worker(s) on {ray_device}")
    return accelerator


def train_loop(loop_config: dict) -> None:
    cfg = Config.model_validate(loop_config["cfg"])
    info, tc = loop_config["info"], cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    accelerator = make_accelerator(cfg, world)
    device = accelerator.device
    torch.manual_seed(tc.seed)
    method: Method = build_method(cfg.method, info["channels"], cfg.model).to(device)
    columns = info["columns"]
    rows = load_rows(ray.train.get_dataset_shard("train"), columns, rank, world)
    val_rows = load_rows(ray.train.get_dataset_shard("val"), columns, 0, 1, tc.val_batches * tc.batch_size)
    params = list(method.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    ema = EMA(method, tc.ema_decay) if tc.ema_decay else None
    start = 0
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            checkpoint.load_weights(Path(d), method)
            state = checkpoint.load_training_state(Path(d))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema:
                ema.load_state_dict(state["ema"])
            start = state["step"]
    # The prepared optimizer steps and zeroes only when accelerate syncs gradients (every
    # grad_accum-th accumulate()); `method` stays the unwrapped module for EMA, validation, saving.
    model, prepared_optimizer = accelerator.prepare(method, optimizer)
    tick, seen = time.time(), 0
    for step in range(start, tc.steps):
        logs: dict[str, float] = {}
        for micro in range(tc.grad_accum):
            generator = step_generator(tc.seed, rank, step, micro, device)
            batch = batch_at(rows, tc.batch_size, generator, device)
            with accelerator.accumulate(model):
                loss, logs = model(batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.grad_clip:
                    accelerator.clip_grad_norm_(params, tc.grad_clip)
                prepared_optimizer.step()
                prepared_optimizer.zero_grad(set_to_none=True)
            seen += tc.batch_size * world
        if not accelerator.sync_gradients:
            raise RuntimeError(f"accelerate did not step the optimizer after {tc.grad_accum} micro-steps")
        scheduler.step()
        if ema:
            ema.update(method)
        done = step + 1
        if done % tc.checkpoint_every and done % tc.val_every and done != tc.steps:
            continue
        metrics = {"step": done, "lr": scheduler.get_last_lr()[0], "images_per_s": seen / (time.time() - tick),
                   **{k: float(v) for k, v in logs.items()}}
        if rank == 0 and (done % tc.val_every == 0 or done == tc.steps):
            with (ema.swapped_into(method) if ema else nullcontext()):
                metrics.update(validate(method, val_rows, tc.batch_size, device))
        report(cfg, method, info, metrics, rank, ema, optimizer, scheduler,
               save=done % tc.checkpoint_every == 0 or done == tc.steps, val_rows=val_rows, device=device)
        tick, seen = time.time(), 0


def report(cfg: Config, method: Method, info: dict, metrics: dict, rank: int, ema, optimizer, scheduler, *,
           save: bool, val_rows: dict, device: torch.device) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (and sample images) when one is due."""
    if not save or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": metrics["step"],
                 "ema": ema.state_dict() if ema else {}}
        checkpoint.save(directory, cfg, method, info["channels"], metrics, state,
                        ema=ema.modules(method) if ema else None)
        if cfg.train.val_images:
            sample_grid(method, val_rows, cfg.train.val_images, device, directory / "samples.png")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{metrics['step']:07d}")


def run_config(cfg: Config) -> RunConfig:
    tc = cfg.train
    if storage.is_remote(tc.storage_path):
        fs, path = storage.arrow_filesystem(tc.storage_path, cfg.storage.endpoint_url)
    else:
        fs, path = None, str(Path(tc.storage_path).resolve())
    return RunConfig(name=tc.name, storage_path=path, storage_filesystem=fs,
                     checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep),
                     failure_config=FailureConfig(max_failures=tc.max_failures))


def build_trainer(cfg: Config) -> TorchTrainer:
    info = preflight(cfg)
    tc = cfg.train
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "info": info},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=run_config(cfg),
        datasets={"train": read_split(cfg, tc.train_split, info["columns"]),
                  "val": read_split(cfg, tc.val_split, info["columns"])},
        # Every worker sees the whole split and keeps its own deterministic rows (see load_rows).
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def train(cfg: Config) -> TrainResult:
    ensure_ray(cfg.ray)
    result = build_trainer(cfg).fit()
    if result.error:
        raise result.error
    return TrainResult(checkpoint=result.checkpoint.path if result.checkpoint else "", metrics=result.metrics or {})
