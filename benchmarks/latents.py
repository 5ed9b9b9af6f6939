"""Training-batch throughput: precomputed latents read from Parquet vs VAE-encoding the crops on the fly.

Both sides use the same loader, pyarrow's ``ParquetFile.iter_batches`` over the same Parquet
files with column projection, and yield the same training batch, ``{"z_in", "z_gt"}`` as
float32 tensors of shape (B, 4, crop/8, crop/8):

* parquet: read the ``z_in``/``z_gt`` columns (float16 latents made by ``lowlight preprocess``);
* on the fly: read the ``srgb_in``/``srgb_gt`` crops and run ``vae.encode`` (mode x scaling
  factor, exactly what the pipeline stores) in the training process, torch's default threads.

VAEs timed on the fly: the tiny bundle's VAE; with ``--pretrained <hub id or dir>`` the VAE of
those weights when they load (else the reason is recorded); with ``--sd-architecture`` an
``AutoencoderKL`` with Stable Diffusion's VAE configuration and random weights, which times the
real architecture's encoder without its weights (speed does not depend on the weights). The
Parquet side does not depend on the VAE: every SD-style VAE's latent is 4 x crop/8 x crop/8.

    .venv/bin/python benchmarks/latents.py [--parquet DIR] [--batch-size 16] [--pretrained ID]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from common import CpuShare, build_bench_samples, load_at_start, print_table, write_result
from diffusers import AutoencoderKL

from lowlight.config import load_config
from lowlight.data.preprocess import preprocess
from lowlight.models import sd

# Stable Diffusion 1.x/2.x VAE (vae/config.json of those checkpoints).
SD_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 512, "scaling_factor": 0.18215,
}
Batch = dict[str, torch.Tensor]


def arrow_batches(files: list[Path], columns: list[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of full batches of ``batch_size`` rows (the last partial batch is dropped, as a
    training loader with drop_last does), tensor columns as (B, C, H, W) float16 numpy arrays."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
            pending.append(rb)
            rows += rb.num_rows
            while rows >= batch_size:
                table = pa.Table.from_batches(pending)
                head, rest = table.slice(0, batch_size), table.slice(batch_size)
                yield {c: head.column(c).combine_chunks().to_numpy_ndarray() for c in columns}
                pending, rows = rest.to_batches(), rest.num_rows


def latent_batches(files: list[Path], batch_size: int) -> Iterator[Batch]:
    for b in arrow_batches(files, ["z_in", "z_gt"], batch_size):
        yield {k: torch.from_numpy(v.astype(np.float32)) for k, v in b.items()}


def onthefly_batches(files: list[Path], batch_size: int, vae: AutoencoderKL) -> Iterator[Batch]:
    for b in arrow_batches(files, ["srgb_in", "srgb_gt"], batch_size):
        with torch.no_grad():
            yield {"z" + k[4:]: vae.encode(torch.from_numpy(v.astype(np.float32)) * 2 - 1).latent_dist.mode()
                   * vae.config.scaling_factor for k, v in b.items()}


def throughput(make_epoch: Callable[[], Iterator[Batch]], seconds: float, max_batches: int) -> dict:
    """Batches/s over whole epochs until ``seconds`` or ``max_batches``; the first batch is a warm-up."""
    first = next(make_epoch())
    shape = tuple(first["z_gt"].shape)
    n, start = 0, time.perf_counter()
    with CpuShare() as cpu:
        while n < max_batches and time.perf_counter() - start < seconds:
            for _ in make_epoch():
                n += 1
                if n >= max_batches or time.perf_counter() - start >= seconds:
                    break
        elapsed = time.perf_counter() - start
    return {"batches": n, "seconds": elapsed, "batches_per_s": n / elapsed, "latent_shape": shape, **cpu.record()}


def ensure_parquet(args) -> Path:
    """The Parquet to read: ``--parquet``, or the sample set preprocessed by the pipeline (resumes)."""
    if args.parquet:
        return Path(args.parquet)
    work = Path(args.out).resolve()
    root = build_bench_samples(work, args.records_scale, 512)
    output = work / f"parquet-x{args.records_scale}-{args.crop_size}"
    cfg = load_config("sample_raw", [
        f"dataset.root={root}", "model.pretrained=tiny", "model.vae=null", f"preprocess.output={output}",
        f"preprocess.crop_size={args.crop_size}", "preprocess.records_per_shard=4096",
        f"ray.num_cpus={os.cpu_count()}"])
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    print(preprocess(cfg).line())
    ray.shutdown()  # no idle cluster beside the timed loops
    return output


def vaes(args) -> list[tuple[str, AutoencoderKL | None, str | None]]:
    """(label, VAE or None, why not) for each VAE to time on the fly."""
    out: list[tuple[str, AutoencoderKL | None, str | None]] = [("tiny", sd.load_vae("tiny"), None)]
    if args.pretrained:
        try:
            out.append((args.pretrained, sd.load_vae(args.pretrained), None))
        except Exception as e:  # noqa: BLE001 - offline hub ids and missing dirs fail many ways
            out.append((args.pretrained, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    if args.sd_architecture:
        torch.manual_seed(0)
        out.append(("sd-architecture (random weights)", AutoencoderKL(**SD_VAE_CONFIG).eval().requires_grad_(False),
                    None))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parquet", default=None, help="a preprocess output folder (default: make one)")
    p.add_argument("--out", default="out/bench/latents", help="work folder when --parquet is not given")
    p.add_argument("--records-scale", type=int, default=3, help="sample records = 21 x scale (without --parquet)")
    p.add_argument("--crop-size", type=int, default=128, help="crop size of the Parquet made without --parquet")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0, help="time budget of each measurement")
    p.add_argument("--max-batches", type=int, default=2000)
    p.add_argument("--pretrained", default=None, help="also time this hub id / diffusers dir's VAE on the fly")
    p.add_argument("--sd-architecture", action="store_true",
                   help="also time SD's VAE architecture with random weights (speed only)")
    p.add_argument("--name", default="latents", help="results/<name>.json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    load = load_at_start()
    parquet = ensure_parquet(args)
    files = sorted(parquet.glob("part-*.parquet"))
    if not files:
        raise SystemExit(f"no part-*.parquet under {parquet}")
    meta = pq.ParquetFile(files[0]).schema_arrow
    crop = meta.field("srgb_gt").type.shape[-1]
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    bs = args.batch_size
    if rows < bs:
        raise SystemExit(f"{parquet} holds {rows} rows, fewer than one batch of {bs}")

    parquet_rate = throughput(lambda: latent_batches(files, bs), args.seconds, args.max_batches)
    results, table = [], []
    for label, vae, why in vaes(args):
        if vae is None:
            results.append({"vae": label, "unavailable": why})
            table.append([label, parquet_rate["batches_per_s"], None, None, f"unavailable: {why}", None])
            continue
        fly = throughput(lambda v=vae: onthefly_batches(files, bs, v), args.seconds, args.max_batches)
        if fly["latent_shape"] != parquet_rate["latent_shape"]:
            raise RuntimeError(f"{label}: latents {fly['latent_shape']} differ from the Parquet's "
                               f"{parquet_rate['latent_shape']}")
        ratio = parquet_rate["batches_per_s"] / fly["batches_per_s"]
        results.append({"vae": label, "onthefly_batches_per_s": fly["batches_per_s"], "ratio": ratio,
                        "onthefly_batches": fly["batches"], "onthefly_seconds": fly["seconds"],
                        "onthefly_other_cpu_share": fly["other_cpu_share"],
                        "vae_parameters": sum(q.numel() for q in vae.parameters())})
        table.append([label, parquet_rate["batches_per_s"], fly["batches_per_s"], ratio,
                      f"{fly['batches']} batches in {fly['seconds']:.1f} s", f"{fly['other_cpu_share']:.0%}"])
        del vae

    print_table(["vae", "parquet b/s", "on-the-fly b/s", "ratio", "on-the-fly measured", "others' CPU"], table,
                f"{rows} rows in {parquet}, batch {bs}, crop {crop}, latents {parquet_rate['latent_shape']}, "
                f"torch threads {torch.get_num_threads()}; parquet: {parquet_rate['batches']} batches in "
                f"{parquet_rate['seconds']:.1f} s, others' CPU {parquet_rate['other_cpu_share']:.0%}")
    tiny = results[0]
    write_result(args.name, {
        "parquet_batches_per_s": parquet_rate["batches_per_s"],
        "onthefly_batches_per_s": tiny["onthefly_batches_per_s"],
        "ratio": tiny["ratio"],
        "vae": tiny["vae"],
        "batch_size": bs,
        "crop_size": crop,
        "latent_shape": list(parquet_rate["latent_shape"]),
        "loader": "pyarrow ParquetFile.iter_batches (column projection), same for both sides",
        "parquet": str(parquet),
        "parquet_rows": rows,
        "parquet_batches": parquet_rate["batches"],
        "parquet_seconds": parquet_rate["seconds"],
        "parquet_other_cpu_share": parquet_rate["other_cpu_share"],
        "torch_threads": torch.get_num_threads(),
        "vaes": results,
        "load_average_at_start": load,
    })


if __name__ == "__main__":
    main()
