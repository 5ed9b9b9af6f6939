"""Evaluation: score checkpoints of any registered method on a split of a preprocessed Parquet folder
with Ray Data batch inference (an actor pool per model, a GPU per actor when the cluster has any), then
write an HTML and a Markdown report (``lowlight.report``).

Each model's per-row scores are saved as ``<out>/scores/<model>.json`` once complete, keyed by the
checkpoint, the data and the settings, so a re-run evaluates only what is new. Protocol, as the report
states it: each row of the split is one image (a centre crop or a grid tile, as preprocessing wrote it),
values in [0, 1]; raw-domain PSNR/SSIM on the packed Bayer planes (raw methods, as ExposureDiffusion
reports them), optionally after the least-squares brightness correction; sRGB metrics on the rendered
output against the rendered target, no border crop.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy

from lowlight import storage
from lowlight.checkpoint import load_method, run_name
from lowlight.data.images import encode_png
from lowlight.data.parquet import read_split
from lowlight.enhance import local_checkpoint
from lowlight.iqa import DEFAULT_METRICS, build_metrics, use_weights_dir
from lowlight.methods import EnhanceOptions
from lowlight.metrics import least_squares_rescale, psnr, ssim
from lowlight.report import file_stem, write_report

META_COLUMNS = ("id", "record_id", "split", "ratio")


@dataclass
class EvalSettings:
    split: str = "test"
    batch_size: int = 4
    actors: int = 1  # per model
    ls_correction: bool = True  # also report raw PSNR after the least-squares brightness fit (ED's protocol)
    metrics: tuple[str, ...] = DEFAULT_METRICS
    weights_dir: str | None = None
    preview_rows: int = 4  # rows shown in the image grid
    seed: int = 0
    options: dict = field(default_factory=dict)  # EnhanceOptions fields (steps, guidance_scale, ...)
    endpoint_url: str | None = None


def png_bytes(image: torch.Tensor) -> bytes:
    return encode_png(np.ascontiguousarray(image.permute(1, 2, 0).float().clamp(0, 1).cpu().numpy()), bits=8)


class Scorer:
    """One Ray Data actor: the method loaded once, each batch enhanced and scored row by row."""

    def __init__(self, checkpoint: str, settings: dict, preview_ids: list[str]):
        self.settings = EvalSettings(**settings)
        use_weights_dir(self.settings.weights_dir)
        self.cfg, self.method = load_method(local_checkpoint(checkpoint, self.settings.endpoint_url))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method.to(self.device)
        self.metrics, _ = build_metrics(self.settings.metrics, str(self.device))
        self.preview_ids = set(preview_ids)
        self.opts = EnhanceOptions(seed=self.settings.seed, **self.settings.options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(self.device) for k, v in batch.items()
                   if k not in ("id", "record_id", "split")}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        pred = self.method.predict(tensors, self.opts).float()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - tick) / len(pred)
        target = self.method.target(tensors).float()
        pred_srgb = self.method.to_srgb(pred, tensors).float().clamp(0, 1)
        target_srgb = self.method.to_srgb(target, tensors).float().clamp(0, 1)
        out: dict[str, list] = {"id": [], "record_id": [], "seconds": [], "peak_rss_mb": [], "preview": [],
                                "input_preview": [], "target_preview": []}
        raw = self.method.output_domain == "raw"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for i in range(len(pred)):
            row = {"psnr_srgb": psnr(pred_srgb[i:i + 1], target_srgb[i:i + 1]),
                   "ssim_srgb": ssim(pred_srgb[i:i + 1], target_srgb[i:i + 1])}
            if raw:
                row |= {"psnr_raw": psnr(pred[i:i + 1], target[i:i + 1]), "ssim_raw": ssim(pred[i:i + 1], target[i:i + 1])}
                if self.settings.ls_correction:
                    fitted = least_squares_rescale(pred[i:i + 1], target[i:i + 1])
                    row |= {"psnr_raw_ls": psnr(fitted, target[i:i + 1]), "ssim_raw_ls": ssim(fitted, target[i:i + 1])}
            for name, metric in self.metrics.items():
                try:
                    row[name] = float(metric.compute(pred_srgb[i:i + 1], target_srgb[i:i + 1])[0])
                except RuntimeError:  # e.g. VIF's pyramid on an image smaller than its filters: no value
                    row[name] = float("nan")
            for key, value in row.items():
                out.setdefault(key, []).append(value)
            shown = str(batch["id"][i]) in self.preview_ids
            one = {k: v[i:i + 1] for k, v in tensors.items()}
            out["preview"].append(png_bytes(pred_srgb[i]) if shown else b"")
            out["input_preview"].append(png_bytes(self.method.to_srgb(self.method.degraded(one), one)[0])
                                        if shown else b"")
            out["target_preview"].append(png_bytes(target_srgb[i]) if shown else b"")
            out["id"].append(str(batch["id"][i]))
            out["record_id"].append(str(batch["record_id"][i]))
            out["seconds"].append(seconds)
            out["peak_rss_mb"].append(rss)
        return {k: np.asarray(v, dtype=object if k.endswith("preview") or k in ("id", "record_id") else None)
                for k, v in out.items()}


def cache_key(checkpoint: Path, data: str, settings: EvalSettings) -> str:
    weights = sorted((p.name, p.stat().st_mtime_ns) for p in checkpoint.glob("*.safetensors"))
    text = json.dumps([str(checkpoint.resolve()), weights, data, asdict(settings) | {"endpoint_url": None}],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def score_model(checkpoint: str, data: str, settings: EvalSettings, out: Path) -> dict:
    """Per-row scores of one checkpoint (cached as JSON when complete) with its previews as PNG files."""
    local = local_checkpoint(checkpoint, settings.endpoint_url)
    name = run_name(checkpoint)
    key = cache_key(local, data, settings)
    cached = out / "scores" / f"{name}.json"
    if cached.exists() and json.loads(cached.read_text()).get("key") == key:
        return json.loads(cached.read_text())
    cfg, method = load_method(local)
    columns = sorted(set(method.columns_for(cfg.method)) | {"raw_gt" if method.output_domain == "raw" else "srgb_gt"})
    ids = read_split(data, settings.split, ["id"], settings.endpoint_url)["id"]
    preview_ids = sorted(str(i) for i in ids)[: settings.preview_rows]
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    split = settings.split
    dataset = (ray.data.read_parquet(storage.listdir(data, "part-*.parquet", settings.endpoint_url),
                                     columns=sorted(set(META_COLUMNS) | set(columns)))
               .filter(lambda row: row["split"] == split)
               .map_batches(Scorer, fn_constructor_args=(checkpoint, asdict(settings), preview_ids),
                            batch_size=settings.batch_size, batch_format="numpy", num_gpus=gpus,
                            compute=ActorPoolStrategy(size=settings.actors)))
    rows = sorted(dataset.take_all(), key=lambda r: r["id"])
    if not rows:
        raise ValueError(f"no rows of split '{split}' under '{data}'")
    previews = out / "images" / name
    previews.mkdir(parents=True, exist_ok=True)
    shown = {}
    for row in rows:
        if row["preview"]:
            path = previews / f"{file_stem(row['id'])}.png"
            shown[row["id"]] = {"output": str(path.relative_to(out)), "input": row["input_preview"],
                                "target": row["target_preview"]}
            path.write_bytes(row["preview"])
    metric_names = [k for k in rows[0] if k not in ("id", "record_id", "seconds", "peak_rss_mb", "preview",
                                                     "input_preview", "target_preview")]
    per_metric = {m: np.array([row[m] for row in rows], dtype=float) for m in metric_names}
    result = {"key": key, "model": name, "method": method.name, "domain": cfg.method.domain,
              "checkpoint": str(local), "backbone": cfg.method.backbone,
              "rows": [{k: row[k] for k in ("id", "record_id", *metric_names)} for row in rows],
              "mean": {m: float(np.nanmean(values)) for m, values in per_metric.items() if np.isfinite(values).any()},
              "failed": sorted(m for m, values in per_metric.items() if not np.isfinite(values).any()),
              "seconds_per_image": float(np.mean([row["seconds"] for row in rows])),
              "peak_rss_mb": float(max(row["peak_rss_mb"] for row in rows)),
              "previews": {str(i): v["output"] for i, v in shown.items()}}
    write_reference_previews(out, shown)
    storage.atomic_write_bytes(str(cached), json.dumps(result, indent=1).encode())
    return result


def write_reference_previews(out: Path, shown: dict) -> None:
    """The grid's input and ground-truth columns, written once (any model's copy of them will do)."""
    folder = out / "images" / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    for row_id, images in shown.items():
        for kind in ("input", "target"):
            path = folder / f"{file_stem(row_id)}-{kind}.png"
            if not path.exists() and images[kind]:
                path.write_bytes(images[kind])


def evaluate(checkpoints: list[str], data: str, out: str | Path, settings: EvalSettings | None = None,
             progress=print) -> dict:
    """Score every checkpoint and write ``report.html`` / ``report.md`` under ``out``; returns the summary."""
    settings = settings or EvalSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    use_weights_dir(settings.weights_dir)
    _, unavailable = build_metrics(settings.metrics)
    results = []
    for checkpoint in checkpoints:
        tick = time.perf_counter()
        results.append(score_model(checkpoint, data, settings, out))
        progress(f"evaluated {results[-1]['model']} ({len(results[-1]['rows'])} images) in "
                 f"{time.perf_counter() - tick:.1f} s")
    summary = {"data": data, "split": settings.split, "settings": asdict(settings) | {"endpoint_url": None},
               "models": results, "unavailable": unavailable}
    html, markdown = write_report(summary, out)
    summary["report_html"], summary["report_md"] = str(html), str(markdown)
    return summary


def evaluate_data(checkpoints: list[str], data: str, out: str | Path, settings: EvalSettings,
                  overrides: list[str], progress=print) -> dict:
    """``data`` is a Parquet folder, or a dataset root that is first preprocessed (with the first
    checkpoint's preprocessing config, ``overrides`` applied) into ``out/parquet``."""
    from lowlight.config import RayConfig, load_config
    from lowlight.data.preprocess import preprocess
    from lowlight.raycluster import ensure_ray

    if not checkpoints:
        raise ValueError("evaluate: give at least one --checkpoint")
    if storage.listdir(data, "part-*.parquet", settings.endpoint_url):
        ensure_ray(RayConfig())
    else:
        first = local_checkpoint(checkpoints[0], settings.endpoint_url)
        cfg = load_config(str(first / "config.yaml"),
                          [f"dataset.root={data}", f"preprocess.output={Path(out) / 'parquet'}", *overrides])
        ensure_ray(cfg.ray)
        summary = preprocess(cfg)
        progress(summary.line())
        data = summary.output
    return evaluate(checkpoints, data, out, settings, progress)
