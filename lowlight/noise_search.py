"""Boundary-condition search (Ma et al., ICLR 2024) for a trained latent-diffusion checkpoint.

A deterministic sampler (DDIM, eta = 0) maps each initial noise to one output, and some noises
restore better than others. Draw ``candidates`` noises (the first is the default seed's), score
each by running the sampler on a small reference set of condition/target pairs from the training
split, keep the best, and save it next to the checkpoint (``initial_noise.safetensors``): every
later enhancement of that checkpoint starts from it, tiled to the input's latent shape by
``sampling.fit_noise``. The gain is measured on the validation split, which the search never saw, and
the noise is saved only when it is positive; the report also scores validation inputs of twice the
side, with the noise tiled periodically and with noise drawn fresh for that size, since full-size
images are where it is used.

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
    # At twice the side (2 x 2 validation crops joined), where the noise is tiled periodically
    # (``fit_noise``), against noise drawn fresh for the larger latent; None with fewer than 4 rows.
    val_large_tiled: float | None = None
    val_large_fresh: float | None = None

    @property
    def val_gain(self) -> float:
        return self.val_best - self.val_default

    @property
    def saved(self) -> bool:
        """Only a noise that beats the default seed on the held-out rows is kept."""
        return self.val_gain > 0


def mean_score(method: LatentDiffusionMethod, rows: dict[str, torch.Tensor], opts: EnhanceOptions, metric: str,
               batch_size: int) -> float:
    score = psnr if metric == "psnr" else ssim
    n = rows["z_in"].shape[0]
    total = 0.0
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        total += score(method.predict(batch, opts), batch["srgb_gt"]) * batch["z_in"].shape[0]
    return total / n


def joined_2x2(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every 4 consecutive rows joined side by side into one row of twice the side (a larger input)."""
    n = rows["z_in"].shape[0] // 4 * 4

    def join(x: torch.Tensor) -> torch.Tensor:
        a, b, c, d = (x[i:n:4] for i in range(4))
        return torch.cat([torch.cat([a, b], dim=-1), torch.cat([c, d], dim=-1)], dim=-2)

    return {k: join(v) for k, v in rows.items()}


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
    if val_rows["z_in"].shape[0] >= 4:
        large = joined_2x2(val_rows)
        report.val_large_tiled = mean_score(method, large, opts(result.noise), metric, batch_size)
        report.val_large_fresh = mean_score(method, large, opts(None), metric, batch_size)
    report.seconds = time.perf_counter() - tick
    noise_file = directory / INITIAL_NOISE_FILE
    if report.saved:
        save_file({"noise": result.noise.contiguous()}, str(noise_file))
    else:  # an earlier search's noise must not outlive this verdict
        noise_file.unlink(missing_ok=True)
    (directory / REPORT_FILE).write_text(json.dumps(
        asdict(report) | {"val_gain": report.val_gain, "saved": report.saved}, indent=2))
    if storage.is_remote(checkpoint):
        if report.saved:
            storage.atomic_write_bytes(storage.join(checkpoint, INITIAL_NOISE_FILE), noise_file.read_bytes(),
                                       endpoint_url)
        else:
            storage.remove(storage.join(checkpoint, INITIAL_NOISE_FILE), endpoint_url)
        storage.atomic_write_bytes(storage.join(checkpoint, REPORT_FILE), (directory / REPORT_FILE).read_bytes(),
                                   endpoint_url)
    return report

