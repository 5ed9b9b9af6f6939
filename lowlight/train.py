"""The Ray Train loop: any registered method, trained from Parquet by a TorchTrainer.

Input streams from Ray Data. The driver only plans lazy datasets; Ray Train splits the training split
across the workers (``streaming_split(equal=True)``: disjoint parts with equal row counts, the remainder of
fewer than ``num_workers`` rows dropped), and each worker iterates its part in full batches (a last partial
batch of an epoch is dropped). A worker holds the blocks in flight, its local shuffle buffer
(``train.shuffle_buffer`` rows) and the current batch, so its memory depends on those and the block size,
not on the size of the split; nothing holds the split.

Order is deterministic by construction. Files are read in an order shuffled by ``train.seed`` (rows within a
file in their order) and Ray Data preserves that order (``ExecutionOptions(preserve_order=True)``), so the
split gives every worker the same rows in the same sequence on every run; in epoch ``e`` they pass through the
worker's local shuffle buffer seeded by ``train.seed + e``. A worker's part of the split is therefore the
same every epoch, in a new order. The method's randomness comes from a generator per (seed, rank, step,
micro-step).

Resume guarantee: exact. A checkpoint records the weights, optimizer, LR schedule, EMA, step and the data
position (epoch, batches taken in that epoch). A resumed worker re-reads that epoch of its part and drops
the batches already taken (reading them again), so it trains on the same batches in the same order with the
same noise as an uninterrupted run; on CPU with two workers (gloo sums of two commute) the weights are
bit-identical. This holds when the Parquet files, ``num_workers``, ``batch_size``, ``grad_accum``,
``shuffle_buffer`` and ``seed`` are those of the interrupted run; with others the run resumes at the
recorded epoch and batch count but sees other batches (or stops with an error if that epoch is now shorter).

Hugging Face ``accelerate`` runs inside each Ray Train worker (Ray has already set up the torch
process group): it wraps the model in DDP, autocasts to bf16, and does gradient accumulation,
clipping and backward. The LR scheduler stays outside ``accelerator.prepare``: its
``AcceleratedScheduler`` steps once per process per call, which would advance the schedule
``num_workers`` times per optimizer step here (``train.batch_size`` is per worker).
"""

from __future__ import annotations

import hashlib
import math
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
from ray.data import DataContext, ExecutionOptions, FileShuffleConfig
from ray.data.expressions import col
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lowlight import checkpoint, storage
from lowlight.config import STAGE1_COLUMNS, Config, ConfigError, TrainConfig
from lowlight.methods import Method, build_method, method_class, parse_options
from lowlight.models import sd
from lowlight.optim import EMA, build_optimizer, lr_lambda
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
    optional = [c for c in method_class(cfg.method.name).optional_columns_for(cfg.method) if c in schema.names]
    if any(c in STAGE1_COLUMNS for c in optional) and not cfg.preprocess.pre_restore:
        raise ConfigError(f"'{cfg.train.data}' has the stage-1 restoration's columns {optional}, but "
                          f"preprocess.pre_restore is unset: name the checkpoint that made them, so the trained "
                          f"model's config lets `lowlight enhance` run it on files too")
    needed = tuple(dict.fromkeys((*needed, *optional)))
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


def check_data_cpus(cfg: Config) -> None:
    """Ray Train keeps its workers' CPUs out of Ray Data's budget; with none left, the first read task
    waits forever. Refuse such a cluster before any worker starts."""
    tc = cfg.train
    if not tc.data_cpus:
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    held = tc.num_workers * tc.cpus_per_worker
    if total - held < tc.data_cpus:
        raise ConfigError(
            f"config keys 'train.num_workers' x 'train.cpus_per_worker' give Ray Train {held:g} of the "
            f"cluster's {total:g} CPUs, leaving {total - held:g}; Ray Data needs train.data_cpus="
            f"{tc.data_cpus:g} to stream the batches (with none it waits forever). Lower "
            "train.cpus_per_worker or train.num_workers, or start the local cluster with "
            f"ray.num_cpus={math.ceil(held + tc.data_cpus)} (logical CPUs may exceed cores)")


def split_dataset(cfg: Config, split: str, columns: list[str], *, file_seed: int | None = None,
                  limit: int | None = None) -> ray.data.Dataset:
    """One split's rows as a lazy dataset: the driver reads file footers (and the few rows Ray samples to
    estimate block sizes), the workers read the rows."""
    fs, _ = storage.arrow_filesystem(cfg.train.data, cfg.storage.endpoint_url)
    paths = [storage.arrow_filesystem(p, cfg.storage.endpoint_url)[1] for p in parquet_files(cfg)]
    shuffle = None if file_seed is None else FileShuffleConfig(seed=file_seed, reseed_after_execution=False)
    # The V1 Parquet reader: Ray 2.60's V2 reader starts a pool of footer-reading actors (new processes) on
    # every execution, i.e. every epoch (measured on a busy 2-core machine: 6 process starts and 19 CPU-s
    # for an epoch of 96 rows), while V1 reuses Ray's workers (under 1 s). Both keep the seeded file order.
    context = DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle)
    finally:
        context.use_datasource_v2 = use_v2
    # Ray Data pushes the split filter and the column selection down into the Parquet reads.
    ds = ds.filter(expr=col("split") == split).select_columns(columns)
    return ds.limit(limit) if limit else ds


class BatchStream:
    """This worker's training batches (float32 tensors on ``device``), epoch after epoch, from a position:
    ``epoch`` and ``batch``, the batches already taken in that epoch (what a checkpoint records)."""

    def __init__(self, shard, tc: TrainConfig, device: torch.device, epoch: int = 0, batch: int = 0):
        self.shard, self.tc, self.device = shard, tc, device
        self.epoch, self.batch = epoch, batch
        self._batches = None

    def _open(self):
        shuffle = self.tc.shuffle_buffer > 0
        batches = iter(self.shard.iter_torch_batches(
            batch_size=self.tc.batch_size, dtypes=torch.float32, device=self.device, drop_last=True,
            local_shuffle_buffer_size=self.tc.shuffle_buffer if shuffle else None,
            local_shuffle_seed=self.tc.seed + self.epoch if shuffle else None))
        for taken in range(self.batch):
            if next(batches, None) is None:
                raise ValueError(f"epoch {self.epoch} of this worker's data has {taken} batches, but the "
                                 f"checkpoint resumes after {self.batch}: the Parquet, train.num_workers or "
                                 "train.batch_size changed since it was written")
        return batches

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = self._open()
        batch = next(self._batches, None)
        if batch is None:
            if self.batch == 0:
                raise ValueError(f"this worker's part of split '{self.tc.train_split}' holds fewer than "
                                 f"train.batch_size={self.tc.batch_size} rows; use a smaller batch or fewer "
                                 "workers")
            self.epoch, self.batch, self._batches = self.epoch + 1, 0, None
            return next(self)
        self.batch += 1
        return batch

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


def read_rows(shard, columns: list[str]) -> dict[str, torch.Tensor]:
    """All rows of a small (limited) dataset shard as float32 CPU tensors, in the dataset's order."""
    batches = list(shard.iter_batches(batch_size=1024, batch_format="numpy"))
    if not batches:
        raise ValueError("the validation split is empty: check train.val_split and the Parquet")
    return {c: torch.from_numpy(np.concatenate([b[c] for b in batches]).astype(np.float32)) for c in columns}


class MemoryPeak:
    """Peak resident and private (anonymous: heap, tensors) memory of this process, sampled when called.
    Resident memory also counts the shared object-store pages Ray Data's blocks are read from."""

    def __init__(self):
        self.rss_mb = self.private_mb = 0.0

    def sample(self, resident_key: str = "VmHWM") -> None:
        """``resident_key``: VmHWM, the peak since the process started, or VmRSS, the resident memory now."""
        try:
            with open("/proc/self/status") as f:
                fields = dict(line.split(":", 1) for line in f)
        except OSError:  # not Linux: no figures
            return
        kb = lambda key: float(fields[key].split()[0]) if key in fields else 0.0
        self.rss_mb = max(self.rss_mb, kb(resident_key) / 1024)
        self.private_mb = max(self.private_mb, kb("RssAnon") / 1024)


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    key = hashlib.sha256(f"{seed}/{rank}/{step}/{micro}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") >> 1)


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
    memory = MemoryPeak()
    torch.manual_seed(tc.seed)
    method: Method = build_method(cfg.method, info["channels"], cfg.model).to(device)
    stream = BatchStream(ray.train.get_dataset_shard("train"), tc, device)
    val_rows = read_rows(ray.train.get_dataset_shard("val"), info["columns"]) if rank == 0 else {}
    optimizer = build_optimizer(method, tc)
    params = [p for group in optimizer.param_groups for p in group["params"]]
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
            if "data" not in state:
                raise RuntimeError(f"checkpoint {resumed.path} has no data position (it predates streamed "
                                   "training input): start a new run (train.name)")
            stream.epoch, stream.batch = state["data"]["epoch"], state["data"]["batch"]
    # The prepared optimizer steps and zeroes only when accelerate syncs gradients (every
    # grad_accum-th accumulate()); `method` stays the unwrapped module for EMA, validation, saving.
    model, prepared_optimizer = accelerator.prepare(method, optimizer)
    tick, seen = time.time(), 0
    for step in range(start, tc.steps):
        logs: dict[str, float] = {}
        for micro in range(tc.grad_accum):
            batch = next(stream)
            generator = step_generator(tc.seed, rank, step, micro, device)
            with accelerator.accumulate(model):
                loss, logs = model(batch, generator)
                memory.sample()  # activations are alive here
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
        memory.sample()
        done = step + 1
        if done % tc.checkpoint_every and done % tc.val_every and done != tc.steps:
            continue
        peaks = accelerator.gather(torch.tensor([[memory.rss_mb, memory.private_mb]], device=device)).cpu()
        metrics = {"step": done, "epoch": stream.epoch, "lr": scheduler.get_last_lr()[0],
                   "images_per_s": seen / (time.time() - tick), **{k: float(v) for k, v in logs.items()},
                   "worker_rss_peak_mb": peaks[:, 0].tolist(), "worker_private_peak_mb": peaks[:, 1].tolist()}
        if rank == 0 and (done % tc.val_every == 0 or done == tc.steps):
            with (ema.swapped_into(method) if ema else nullcontext()):
                metrics.update(validate(method, val_rows, tc.batch_size, device))
        state = {"optimizer": optimizer, "scheduler": scheduler, "ema": ema, "data": stream.position()}
        save = done % tc.checkpoint_every == 0 or done == tc.steps
        report(cfg, method, info, metrics, rank, state, save=save, val_rows=val_rows, device=device)
        tick, seen = time.time(), 0


def report(cfg: Config, method: Method, info: dict, metrics: dict, rank: int, state: dict, *,
           save: bool, val_rows: dict, device: torch.device) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (and sample images) when one is due. ``state``
    holds the optimizer, scheduler, EMA (or None) and the data position, all equal on every rank."""
    if not save or rank != 0:
        ray.train.report(metrics)
        return
    ema = state["ema"]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        training_state = {"optimizer": state["optimizer"].state_dict(),
                          "scheduler": state["scheduler"].state_dict(), "step": metrics["step"],
                          "ema": ema.state_dict() if ema else {}, "data": state["data"]}
        checkpoint.save(directory, cfg, method, info["channels"], metrics, training_state,
                        ema=ema.modules(method) if ema else None)
        if cfg.train.val_images:
            sample_grid(method, val_rows, cfg.train.val_images, device, directory / "samples.png")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{metrics['step']:07d}")


def run_config(cfg: Config, callbacks: list | None = None) -> RunConfig:
    """``callbacks``: e.g. Tune's ``TuneReportCallback`` when a sweep trial drives this run."""
    tc = cfg.train
    if storage.is_remote(tc.storage_path):
        fs, path = storage.arrow_filesystem(tc.storage_path, cfg.storage.endpoint_url)
    else:
        fs, path = None, str(Path(tc.storage_path).resolve())
    return RunConfig(name=tc.name, storage_path=path, storage_filesystem=fs,
                     checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep),
                     failure_config=FailureConfig(max_failures=tc.max_failures), callbacks=callbacks)


def train_datasets(cfg: Config, columns: list[str]) -> dict[str, ray.data.Dataset]:
    """The training split (files in an order seeded by ``train.seed``) and the first
    ``val_batches * batch_size`` rows of the validation split (no more is read)."""
    tc = cfg.train
    return {"train": split_dataset(cfg, tc.train_split, columns, file_seed=tc.seed),
            "val": split_dataset(cfg, tc.val_split, columns, limit=tc.val_batches * tc.batch_size)}


def data_config() -> DataConfig:
    """Only the training split is divided among the workers (rank 0 validates). Preserving the order of the
    seeded file shuffle makes every worker's sequence of rows the same on every run (exact resume)."""
    return DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True))


def build_trainer(cfg: Config, callbacks: list | None = None) -> TorchTrainer:
    info = preflight(cfg)
    cfg = method_class(cfg.method.name).prepare_config(cfg)
    check_data_cpus(cfg)
    tc = cfg.train
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": with_absolute_model_paths(cfg).model_dump(mode="json"), "info": info},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=run_config(cfg, callbacks),
        datasets=train_datasets(cfg, info["columns"]),
        dataset_config=data_config(),
    )


def with_absolute_model_paths(cfg: Config, origin: str | None = None) -> Config:
    """Ray Train workers (and Tune trials) run in their own directory: the local folders the model section
    names (a fitted VAE, an earlier stage), relative to ``origin`` (default: here), are made absolute for
    them, and so in the checkpoint's saved config."""
    base = Path(origin or ".")
    updates = {key: str((base / value).resolve()) for key in ("pretrained", "vae", "init_from")
               if (value := getattr(cfg.model, key)) and not storage.is_remote(value) and (base / value).exists()}
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=updates)}) if updates else cfg


def train(cfg: Config) -> TrainResult:
    ensure_ray(cfg.ray)
    result = build_trainer(cfg).fit()
    if result.error:
        raise result.error
    return TrainResult(checkpoint=result.checkpoint.path if result.checkpoint else "", metrics=result.metrics or {})
