"""Ray Tune sweeps: a two-trial ASHA training sweep, killed mid-way and relaunched, resumes its trials
from their checkpoints and writes the table, plots and best config; an ω sweep evaluates one checkpoint
once per value without training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lowlight.tune import load_sweep, run_sweep


def _lowlight() -> str:
    return str(Path(sys.executable).with_name("lowlight"))


def _reports(experiment: Path, trial: str) -> list[dict]:
    """One trial's reports (step, timestamp), from Tune's own result log."""
    (results,) = experiment.glob(f"{trial}_*/result.json")
    return [json.loads(line) for line in results.read_text().splitlines() if line]


def test_asha_sweep_killed_and_relaunched_resumes_and_writes_its_outputs(raw_data, tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "lr", "base": "sample_raw", "storage_path": str(tmp_path / "tune"),
        "set": [f"train.data={raw_data}", "method.name=regression", "method.backbone=nafnet-l4-w8", "ray.num_cpus=3",
                "train.steps=8", "train.batch_size=2", "train.val_every=2", "train.checkpoint_every=2",
                "train.val_batches=1", "train.val_images=0"],
        "space": {"train.lr": {"grid": [1e-3, 3e-3]}},
        "scheduler": {"name": "asha", "grace_period": 4, "reduction_factor": 2},
        "metric": "val_psnr", "mode": "max"}))
    runs = tmp_path / "tune" / "lr" / "runs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's would be
    first = subprocess.Popen([_lowlight(), "tune", "--config", str(sweep_file)], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not list(runs.glob("*/checkpoint_0000004")):
        time.sleep(1)
    assert list(runs.glob("*/checkpoint_0000004")), "the first trial never reached step 4"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    killed_at = time.time()
    interrupted = [d.name for d in runs.iterdir() if list(d.glob("checkpoint_*"))]

    second = subprocess.run([_lowlight(), "tune", "--config", str(sweep_file)], env=env, capture_output=True,
                            text=True, timeout=900, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming the sweep" in second.stdout
    first_report = 2  # train.val_every: a run started afresh reports step 2 first
    for trial in interrupted:
        resumed = [r["step"] for r in _reports(tmp_path / "tune" / "lr", trial) if r["timestamp"] > killed_at]
        # Resumed from a checkpoint (the last one Ray Train had registered), not restarted: after the relaunch
        # it reports only later steps, up to the last.
        assert resumed and min(resumed) > first_report and max(resumed) == 8, (trial, interrupted, resumed)

    out = tmp_path / "tune" / "lr"
    trials = pd.read_csv(out / "trials.csv")
    assert sorted(trials["config/train.lr"]) == [1e-3, 3e-3] and trials["val_psnr"].notna().all()
    assert "| trial |" in (out / "trials.md").read_text()
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["lr"] == trials.loc[trials["val_psnr"].idxmax(), "config/train.lr"]
    assert (out / "plots" / "val_psnr_vs_train_lr.png").stat().st_size > 1000
    assert (out / "plots" / "learning_curves.png").stat().st_size > 1000


def test_guidance_sweep_evaluates_one_checkpoint_per_value_without_training(srgb_data, served_checkpoints, tmp_path):
    sweep_file = tmp_path / "omega.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "omega", "storage_path": str(tmp_path / "tune"), "checkpoints": [str(served_checkpoints["srgb"])],
        "inference": {"space": {"guidance_scale": [1.0, 2.0]}, "data": str(srgb_data), "split": "test",
                      "metrics": ["fsim"]}}))
    outputs = run_sweep(load_sweep(str(sweep_file)), progress=lambda _: None)
    rows = pd.read_csv(outputs["inference"].replace(".md", ".csv"))
    assert list(rows["option/guidance_scale"]) == [1.0, 2.0]
    assert rows["psnr_srgb"].notna().all() and rows["fsim"].notna().all()
    assert rows["psnr_srgb"].iloc[0] != rows["psnr_srgb"].iloc[1]  # ω reached the sampler
    assert not (tmp_path / "tune" / "omega" / "runs").exists()


def test_sweep_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "base": "sample_raw", "space": {"train.lr": {"normal": [0, 1]}}}))
    with pytest.raises(Exception, match="train.lr"):
        load_sweep(str(bad))


@pytest.mark.parametrize("sweep_file", sorted((Path(__file__).parents[1] / "lowlight/configs/sweeps").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_sweep_gives_valid_trial_configs(sweep_file):
    """Each preset's trials (every grid value, the first of other samplers' bounds) build a config whose method
    options validate: a misspelt key fails here, not hours into a sweep."""
    from lowlight.methods import parse_options
    from lowlight.tune import trial_config

    sweep = load_sweep(str(sweep_file))
    if not sweep.space:
        return
    for key, spec in sweep.space.items():
        for value in next(iter(spec.values())):
            parse_options(trial_config(sweep, {key: value}, "check").method)
