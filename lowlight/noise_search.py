"""Boundary-condition search (Ma et al., ICLR 2024) for a trained latent-diffusion checkpoint.

A deterministic sampler (DDIM, eta = 0) maps each initial noise to one output, and some noises
restore better than others. Draw ``candidates`` noises (the first is the default seed's), score
each by running the sampler on a small reference set of condition/target pairs from the training
split, keep the best, and save it next to the checkpoint (``initial_noise.safetensors``): every
later enhancement of that checkpoint starts from it, tiled to the input's latent shape by
``sampling.fit_noise``. The gain is reported on the validation split, which the search never saw.

Score: PSNR of the decoded output against srgb_gt (LPIPS needs downloaded weights, which an offline
machine lacks; ``metric=ssim`` is the other choice).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import save_file

from lowlight import storage
from lowlight.checkpoint import load_method
from lowlight.config import ConfigError
from lowlight.data.parquet import read_split
from lowlight.enhance import local_checkpoint
from lowlight.methods import EnhanceOptions
from lowlight.methods.latent import INITIAL_NOISE_FILE, LatentDiffusionMethod
from lowlight.metrics import psnr, ssim
from lowlight.sampling import search_initial_noise

REPORT_FILE = "noise_search.json"


@dataclass
class NoiseSearchReport:
    metric: str
    candidates: int
    scores: list[float]
    best: int
    reference_default: float
    reference_best: float
    val_default: float
    val_best: float
    steps: int
    seconds: float

    @property
    def val_gain(self) -> float:
        return self.val_best - self.val_default


def mean_score(method: LatentDiffusionMethod, rows: dict[str, torch.Tensor], opts: EnhanceOptions, metric: str,
               batch_size: int) -> float:
    score = psnr if metric == "psnr" else ssim
    n = rows["z_in"].shape[0]
    total = 0.0
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        total += score(method.predict(batch, opts), batch["srgb_gt"]) * batch["z_in"].shape[0]
    return total / n


def search_checkpoint_noise(checkpoint: str, *, candidates: int = 8, reference: int = 8, val: int = 16,
                            steps: int | None = None, metric: str = "psnr", seed: int = 0, batch_size: int = 8,
                            endpoint_url: str | None = None) -> NoiseSearchReport:
    if metric not in ("psnr", "ssim"):
        raise ConfigError(f"metric '{metric}': choose psnr or ssim")
    tick = time.perf_counter()
    directory = local_checkpoint(checkpoint, endpoint_url)
    cfg, method = load_method(directory)
    if not isinstance(method, LatentDiffusionMethod):
        raise ConfigError(f"method '{method.name}' starts from no noise: the search is for latent-diffusion methods")
    if method.options.eta:
        raise ConfigError("config key 'method.options.eta': the search needs a deterministic sampler (eta = 0)")
    method.initial_noise = None
    columns = ["z_in", "srgb_in", "srgb_gt"]
    data = cfg.train.data
    load = lambda split, limit: {k: torch.from_numpy(v) for k, v in read_split(
        data, split, columns, endpoint_url or cfg.storage.endpoint_url, limit).items()}
    ref_rows, val_rows = load(cfg.train.train_split, reference), load(cfg.train.val_split, val)
    steps = steps or method.options.steps
    opts = lambda noise: EnhanceOptions(steps=steps, sampler="ddim", initial_noise=noise)
    result = search_initial_noise(lambda noise: mean_score(method, ref_rows, opts(noise), metric, batch_size),
                                  tuple(ref_rows["z_in"].shape[1:]), candidates, seed=seed)
    report = NoiseSearchReport(
        metric=metric, candidates=candidates, scores=result.scores, best=result.best,
        reference_default=result.default_score, reference_best=result.scores[result.best],
        val_default=mean_score(method, val_rows, opts(None), metric, batch_size),
        val_best=mean_score(method, val_rows, opts(result.noise), metric, batch_size),
        steps=steps, seconds=0.0)
    report.seconds = time.perf_counter() - tick
    save_file({"noise": result.noise.contiguous()}, str(directory / INITIAL_NOISE_FILE))
    (directory / REPORT_FILE).write_text(json.dumps(asdict(report) | {"val_gain": report.val_gain}, indent=2))
    if storage.is_remote(checkpoint):
        for name in (INITIAL_NOISE_FILE, REPORT_FILE):
            storage.atomic_write_bytes(storage.join(checkpoint, name), (directory / name).read_bytes(), endpoint_url)
    return report

