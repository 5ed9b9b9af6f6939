"""`lowlight run` (what `make run` calls), shrunk through --set so it fits the test budget."""

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e

SMALL = ["samples.max_side=192", "fit_vae.steps=40", "preprocess.crop_size=64", "preprocess.crops_per_image=1",
         "ray.num_cpus=3", "method.backbone=nafnet-l4-w8", "train.steps=4", "train.batch_size=2", "train.val_batches=2"]
# What Ray prints when left to itself: Ray Data's execution plans, Ray Train's per-report dumps.
RAY_LOGS = ("Execution plan of Dataset", "TrainingReport(")
SCREEN = 40  # lines


def run_main_job(cwd: Path) -> str:
    lowlight = Path(sys.executable).with_name("lowlight")
    args = [str(lowlight), "run"] + [a for s in SMALL for a in ("--set", s)]
    # Bytes, not text=True: universal newlines would turn each tqdm redraw's "\r" into a line.
    done = subprocess.run(args, cwd=cwd, capture_output=True, timeout=900, check=False)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr[-3000:]
    # One screen: tqdm bars redraw with "\r" and end in one "\n" each, so count "\n" only.
    console = stdout + stderr
    assert console.count("\n") <= SCREEN and not any(t in console for t in RAY_LOGS), console
    return stdout


def test_main_job_prints_parquet_location_and_resumes(tmp_path):
    first = run_main_job(tmp_path)
    assert "fitting the VAE" in first
    log = tmp_path / next(line for line in first.splitlines() if line.startswith("log: ")).removeprefix("log: ")
    assert all(t in log.read_text() for t in RAY_LOGS), log.read_text()[-3000:]
    summary = next(line for line in first.splitlines() if line.startswith("preprocess:"))
    rows = int(summary.split()[1])
    location = next(line for line in first.splitlines() if line.startswith("Parquet:")).split(":", 1)[1].strip()
    parts = sorted((tmp_path / location).glob("part-*.parquet"))
    assert rows > 0 and sum(pq.ParquetFile(p).metadata.num_rows for p in parts) == rows

    table = first[first.index("validation"):].splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["input", "exposure_diffusion", "regression"]
    assert all(float(line.split()[-2]) > 0 for line in table[2:4])  # sRGB PSNR of each trained method

    second = run_main_job(tmp_path)
    assert "already there" in second
    assert "0 shards written" in second and f"preprocess: {rows} rows" in second
