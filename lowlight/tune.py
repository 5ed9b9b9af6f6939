"""Sweeps with Ray Tune: training sweeps over any config key, and inference sweeps (guidance ω, sampler
steps, ...) that evaluate existing checkpoints without retraining.

A training trial is a Tune function that builds this project's ``TorchTrainer`` with ``TuneReportCallback``
(the Ray 2.60 shape), so the scheduler (ASHA by default) sees every report; its Train run is named after
the trial, so a restored sweep resumes each trial from its last checkpoint. A sweep that was killed resumes
when launched again with the same file (``Tuner.restore``).

Outputs under ``<storage_path>/<name>/``: ``trials.csv`` and ``trials.md`` (every trial's config and
metrics), ``best.yaml`` (the base config with the best trial's values: ``lowlight train --config
best.yaml``), ``plots/<metric>_vs_<key>.png`` and ``plots/learning_curves.png``; an inference sweep adds
``inference.csv`` / ``inference.md``.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the headless backend
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from lowlight.config import ConfigError, dump_config, load_config
from lowlight.evaluate import EvalSettings, evaluate
from lowlight.raycluster import ensure_ray
from lowlight.train import build_trainer, with_absolute_model_paths

SAMPLERS = ("grid", "choice", "uniform", "loguniform")
STEP = "step"  # the trial's own step counter (training_iteration restarts on restore)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Scheduler(Strict):
    name: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="steps (in train.steps units) before a trial may be stopped")
    reduction_factor: float = Field(2, gt=1)


class InferenceSweep(Strict):
    """Evaluation over every combination of inference options (``EnhanceOptions`` names)."""

    space: dict[str, list[Any]] = Field(min_length=1, description="e.g. {guidance_scale: [1, 2, 4], steps: [10, 20]}")
    data: str | None = Field(None, description="Parquet folder (default: the training config's train.data)")
    split: str = "val"
    metrics: list[str] = ["fsim", "piqe"]
    batch_size: int = 4


class SweepConfig(Strict):
    name: str
    base: str | None = Field(None, description="training config (preset or file) of a training sweep")
    set: list[str] = Field(default_factory=list, description="overrides of the base, applied to every trial")
    space: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                             description="config key -> {grid|choice: [...]} or {uniform|loguniform: [lo, hi]}")
    num_samples: int = Field(1, ge=1, description="samples of the random parts (grids are crossed with them)")
    scheduler: Scheduler = Scheduler()
    metric: str = "val_psnr"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = Field(1, ge=1)
    storage_path: str = "out/tune"
    checkpoints: list[str] = Field(default_factory=list, description="an inference-only sweep's checkpoints")
    inference: InferenceSweep | None = None

    @model_validator(mode="after")
    def _something_to_do(self) -> SweepConfig:
        if self.space and not self.base:
            raise ValueError("a training sweep ('space') needs 'base', the training config")
        if not self.space and not (self.inference and self.checkpoints):
            raise ValueError("give 'base' + 'space' (a training sweep), or 'checkpoints' + 'inference'")
        for key, spec in self.space.items():
            if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise ValueError(f"space key '{key}': give exactly one of {SAMPLERS}, got {sorted(spec)}")
        return self


def load_sweep(source: str) -> SweepConfig:
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"sweep file '{source}' not found")
    try:
        return SweepConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValueError as e:
        raise ConfigError(f"sweep file '{source}': {e}") from None


def search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, spec in space.items():
        (kind, values), = spec.items()
        if kind == "grid":
            out[key] = tune.grid_search(list(values))
        elif kind == "choice":
            out[key] = tune.choice(list(values))
        else:
            low, high = values
            out[key] = tune.uniform(low, high) if kind == "uniform" else tune.loguniform(low, high)
    return out


def trial_config(sweep: SweepConfig, values: dict[str, Any], trial_name: str):
    """The training config of one trial: base, shared overrides, the trial's values; its run is named after
    the trial and stored beside the sweep."""
    overrides = [*sweep.set, *(f"{key}={json.dumps(value)}" for key, value in values.items())]
    cfg = load_config(sweep.base, overrides)
    cfg.train.name = trial_name
    cfg.train.storage_path = str(Path(sweep.storage_path) / sweep.name / "runs")
    return cfg


def run_trial(values: dict[str, Any], sweep: dict, origin: str) -> None:
    """One Tune trial: a Ray Train run whose reports reach Tune through ``TuneReportCallback``. The trial runs
    in its own directory; the config's relative model paths are the sweep driver's (``origin``)."""
    sweep_cfg = SweepConfig.model_validate(sweep)
    trial_name = tune.get_context().get_trial_name()
    cfg = with_absolute_model_paths(trial_config(sweep_cfg, values, trial_name), origin)
    result = build_trainer(cfg, [TuneReportCallback()]).fit()
    if result.error:
        raise result.error


def scheduler_for(sweep: SweepConfig):
    if sweep.scheduler.name == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=STEP, max_t=load_config(sweep.base, sweep.set).train.steps,
                         grace_period=sweep.scheduler.grace_period, reduction_factor=sweep.scheduler.reduction_factor)


def run_training_sweep(sweep: SweepConfig, progress=print) -> tuple[pd.DataFrame, tune.ResultGrid]:
    """Every trial's config and metrics (resuming a killed sweep of the same name), and Tune's results."""
    base = load_config(sweep.base, sweep.set)
    ray_cfg = base.ray
    if not (ray_cfg.address or os.environ.get("RAY_ADDRESS")):
        # A trial's driver holds 0.01 CPU; on a local cluster sized for one Train run that leaves Ray Data's
        # read tasks 0.99 of the CPU they need, and the run hangs. And a finished trial's Train workers can
        # hold their CPUs a while after it ends (the next trial's worker group then times out waiting):
        # declare room for one more Train run per concurrent trial. Logical CPUs only; the work is the same.
        per_trial = base.train.num_workers * base.train.cpus_per_worker + 1
        extra = int(sweep.max_concurrent_trials * (per_trial + 1))
        ray_cfg = ray_cfg.model_copy(update={"num_cpus": (ray_cfg.num_cpus or os.cpu_count()) + extra})
    ensure_ray(ray_cfg)
    # Tune checks that the first report carries the metric; ours come at val_every steps only.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    experiment = Path(sweep.storage_path).resolve() / sweep.name
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep.model_dump(), origin=os.getcwd()), {"CPU": 0.01})
    if tune.Tuner.can_restore(str(experiment)):
        progress(f"resuming the sweep at {experiment}")
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=search_space(sweep.space),
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler_for(sweep),
                                        num_samples=sweep.num_samples,
                                        max_concurrent_trials=sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(experiment.parent)))
    results = tuner.fit()
    rows = []
    for result in results:
        history = result.metrics_dataframe
        row = {"trial": Path(result.path).name, **{f"config/{k}": v for k, v in result.config.items()}}
        if history is not None and sweep.metric in history:
            scored = history.dropna(subset=[sweep.metric])
            row[sweep.metric] = scored[sweep.metric].iloc[-1] if len(scored) else None
            row["steps"] = int(history[STEP].max()) if STEP in history else None
        row["error"] = str(result.error)[:200] if result.error else ""
        rows.append(row)
    return pd.DataFrame(rows), results


def write_tables(frame: pd.DataFrame, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / f"{stem}.csv", index=False)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def plot_against_parameters(frame: pd.DataFrame, metric: str, out: Path) -> list[Path]:
    paths = []
    for column in [c for c in frame.columns if c.startswith("config/")]:
        fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values):
            ax.scatter(values, frame[metric])
        else:
            labels = sorted(values.astype(str).unique())
            ax.scatter([labels.index(v) for v in values.astype(str)], frame[metric])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(column.removeprefix("config/"))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{metric}_vs_{column.removeprefix('config/').replace('.', '_')}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_learning_curves(results, metric: str, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for result in results:
        history = result.metrics_dataframe
        if history is None or STEP not in history:
            continue
        label = Path(result.path).name
        if "loss" in history:
            axes[0].plot(history[STEP], history["loss"], label=label)
        if metric in history:
            scored = history.dropna(subset=[metric])
            axes[1].plot(scored[STEP], scored[metric], marker="o", label=label)
    for ax, title in zip(axes, ("training loss", metric), strict=True):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def run_inference_sweep(sweep: SweepConfig, checkpoints: list[str], data: str, progress=print) -> pd.DataFrame:
    """One evaluation per combination of the inference options: one row per (checkpoint, combination)."""
    inference = sweep.inference
    keys = list(inference.space)
    rows = []
    out = Path(sweep.storage_path) / sweep.name / "inference"
    for combination in itertools.product(*(inference.space[k] for k in keys)):
        options = dict(zip(keys, combination, strict=True))
        label = "-".join(f"{k}{v}" for k, v in options.items())
        settings = EvalSettings(split=inference.split, metrics=tuple(inference.metrics), options=options,
                                batch_size=inference.batch_size, preview_rows=2)
        summary = evaluate(checkpoints, data, out / label, settings, progress)
        rows += [{**{f"option/{k}": v for k, v in options.items()}, "model": m["model"], **m["mean"],
                  "seconds_per_image": m["seconds_per_image"]} for m in summary["models"]]
    return pd.DataFrame(rows)


def run_sweep(sweep: SweepConfig, progress=print) -> dict[str, Any]:
    """The training sweep (when it has a space) and then the inference sweep (when asked) over its best
    trial's checkpoint, or over ``checkpoints``; returns the output paths."""
    out = Path(sweep.storage_path) / sweep.name
    outputs: dict[str, Any] = {}
    checkpoints = list(sweep.checkpoints)
    data = sweep.inference.data if sweep.inference else None
    if sweep.space:
        frame, results = run_training_sweep(sweep, progress)
        write_tables(frame, out, "trials")
        plots = out / "plots"
        plots.mkdir(exist_ok=True)
        scored = frame.dropna(subset=[sweep.metric]) if sweep.metric in frame else frame.iloc[0:0]
        outputs |= {"trials": str(out / "trials.md"), "plots": [str(p) for p in plot_against_parameters(
            scored, sweep.metric, plots)] + [str(plot_learning_curves(results, sweep.metric, plots))]}
        if len(scored):
            best = scored.loc[scored[sweep.metric].idxmax() if sweep.mode == "max" else scored[sweep.metric].idxmin()]
            # numpy scalars from the table become plain values, as in the sweep file
            values = {k.removeprefix("config/"): v.item() if hasattr(v, "item") else v
                      for k, v in best.items() if k.startswith("config/")}
            best_cfg = trial_config(sweep, values, best["trial"])
            (out / "best.yaml").write_text(f"# best of sweep '{sweep.name}': {sweep.metric} = "
                                           f"{best[sweep.metric]:.4f} (trial {best['trial']})\n" + dump_config(best_cfg))
            outputs["best"] = str(out / "best.yaml")
            if not checkpoints:  # the best trial's Train run (its latest checkpoint)
                checkpoints = [str(Path(best_cfg.train.storage_path) / best_cfg.train.name)]
            data = data or best_cfg.train.data
    if sweep.inference:
        if not checkpoints:
            raise ConfigError(f"sweep '{sweep.name}': the inference sweep has no checkpoint to evaluate")
        data = data or load_config(sweep.base, sweep.set).train.data
        frame = run_inference_sweep(sweep, checkpoints, data, progress)
        write_tables(frame, out, "inference")
        outputs["inference"] = str(out / "inference.md")
    return outputs
