"""A tiny training run submitted with `ray job submit` to a `ray start --head` cluster on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _stop_cluster(temp_dir: str) -> None:
    """Stop only this test's cluster: `ray stop` would also kill the suite's own local Ray."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            proc.kill()


@pytest.fixture
def head_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    # ray.init elsewhere in the suite writes ~/.ray/auth_token, which turns on token auth for `ray start`.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    subprocess.run([RAY, "start", "--head", f"--port={free_port()}", "--num-cpus=2",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_cluster(temp_dir)


def submit_when_ready(address: str, env: dict, entry: list[str]) -> subprocess.CompletedProcess:
    """`ray start` returns before the head's job agent is up; it answers 'No available agent' until then."""
    deadline = time.time() + 120
    while True:
        submitted = subprocess.run([RAY, "job", "submit", f"--address={address}", "--submission-id=lowlight-e2e",
                                    "--", *entry], env=env, capture_output=True, text=True, timeout=600, check=False)
        if "No available agent" not in submitted.stderr + submitted.stdout or time.time() > deadline:
            return submitted
        time.sleep(2)


def test_submitted_training_job_finishes(head_cluster, raw_data, tmp_path):
    address, env = head_cluster
    entry = [sys.executable, str(REPO / "workflows" / "train.py"), "--config", "sample_raw",
             "--set", f"train.data={raw_data}", "--set", f"train.storage_path={tmp_path}", "--set", "train.name=job",
             "--set", "method.backbone=nafnet-1", "--set", "train.steps=2", "--set", "train.num_workers=1",
             "--set", "train.batch_size=2", "--set", "train.val_batches=1"]
    submitted = submit_when_ready(address, env, entry)
    logs = subprocess.run([RAY, "job", "logs", f"--address={address}", "lowlight-e2e"], env=env,
                          capture_output=True, text=True, timeout=60, check=False).stdout
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "checkpoint:" in logs and "checkpoint_0000002" in logs
    status = subprocess.run([RAY, "job", "status", f"--address={address}", "lowlight-e2e"], env=env,
                            capture_output=True, text=True, timeout=60, check=False).stdout
    assert "SUCCEEDED" in status
