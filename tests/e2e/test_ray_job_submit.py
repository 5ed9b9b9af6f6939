"""A tiny training run submitted with `ray job submit` to a `ray start --head` cluster on loopback,
shipped the documented way (`--working-dir` + clusters/runtime_env.yaml)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port, wait_for_port

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
JOB_ID = "lowlight-e2e"
JOB_TIMEOUT = 600  # seconds for the whole job; each CLI call has its own, shorter limit
# How `ray job status` reports the terminal states (other states: "Status for job '<id>': RUNNING").
TERMINAL = {"SUCCEEDED": f"Job '{JOB_ID}' succeeded", "FAILED": f"Job '{JOB_ID}' failed",
            "STOPPED": f"Job '{JOB_ID}' was stopped"}


def _cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """This cluster's processes: those whose command line names its temp dir (gcs, raylet,
    dashboard, ...) and everything they started (workers rename themselves `ray::...`)."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        parts = proc.info["cmdline"] or []
        if proc.pid not in mine and any(p.endswith(temp_dir) or f"{temp_dir}/" in p for p in parts):
            try:
                for p in [proc, *proc.children(recursive=True)]:
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                continue
    return list(found.values())


def _stop_cluster(temp_dir: str) -> None:
    """Kill only this cluster: `ray stop` would also stop the suite's (and anyone else's) Ray."""
    procs = _cluster_processes(temp_dir)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _head_env() -> dict[str, str]:
    """The session's environment minus its Ray settings and PYTHONPATH: the job must find
    lowlight through the shipped working dir, as on a real cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    # ray.init elsewhere in the suite writes ~/.ray/auth_token, which turns on token auth for `ray start`.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return env


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


@pytest.fixture
def head_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard, agent = free_port(), free_port()
    env = _head_env()
    # Every port gets a free one. The dashboard agent's HTTP port defaults to 52365: when another
    # Ray node on this machine holds it (the suite's own ray.init does), the agent gives up binding
    # after ~3 s, stays up without HTTP, and every submission fails "No available agent to submit job".
    args = [RAY, "start", "--head", f"--port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    logs = Path(temp_dir) / "session_latest" / "logs"
    try:
        started = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, check=False)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}"
        try:
            wait_for_port(agent, timeout=60)
        except TimeoutError as e:
            raise AssertionError(f"{e}: the head's dashboard agent never served HTTP; its log:\n"
                                 f"{_tail(logs / 'dashboard_agent.log')}") from None
        yield f"http://127.0.0.1:{dashboard}", env, logs
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(address: str, env: dict, command: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job COMMAND --address=... ARGS` (the address before ARGS: a `submit` ends with `-- entrypoint`)."""
    return subprocess.run([RAY, "job", command, f"--address={address}", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def job_status(address: str, env: dict) -> str:
    """What `ray job status` says: a terminal state, or its own words while the job is not done."""
    done = ray_job(address, env, "status", JOB_ID)
    said = done.stdout + done.stderr
    for status, line in TERMINAL.items():
        if line in said:
            return status
    return said.strip()[-300:]


def wait_for_job(address: str, env: dict) -> str:
    deadline = time.time() + JOB_TIMEOUT
    while (status := job_status(address, env)) not in TERMINAL:
        if time.time() > deadline:
            ray_job(address, env, "stop", JOB_ID)
            return f"not done after {JOB_TIMEOUT}s (stopped); last status: {status}"
        time.sleep(3)
    return status


def test_submitted_training_job_finishes(head_cluster, raw_data, tmp_path):
    address, env, head_logs = head_cluster
    overrides = [f"train.data={raw_data}", f"train.storage_path={tmp_path}", "train.name=job",
                 "method.backbone=nafnet-l4-w8", "train.steps=2", "train.checkpoint_every=2", "train.num_workers=1",
                 "train.batch_size=2", "train.val_batches=1", "train.val_images=0"]
    entry = [sys.executable, "workflows/train.py", "--config", "sample_raw",
             *(a for o in overrides for a in ("--set", o))]
    submitted = ray_job(address, env, "submit", f"--submission-id={JOB_ID}", "--no-wait", f"--working-dir={REPO}",
                        f"--runtime-env={REPO / 'clusters' / 'runtime_env.yaml'}", "--", *entry)
    assert submitted.returncode == 0, (f"{submitted.stdout[-2000:]}\n{submitted.stderr[-2000:]}\n"
                                       f"dashboard_agent.log:\n{_tail(head_logs / 'dashboard_agent.log')}")

    status = wait_for_job(address, env)
    logs = ray_job(address, env, "logs", JOB_ID).stdout
    assert status == "SUCCEEDED", f"job {status}; its logs:\n{logs[-4000:]}"
    # Not anchored at a line start: Ray Data's progress bars end in '\r', so the line can begin mid-line.
    printed = re.search(r"\bcheckpoint: (\S+)$", logs, re.MULTILINE)
    assert printed, f"no 'checkpoint:' line in the job's logs:\n{logs[-4000:]}"
    ckpt = Path(printed.group(1))
    assert ckpt == tmp_path / "job" / "checkpoint_0000002"
    assert (ckpt / "model.safetensors").is_file()
    assert '"step": 2' in logs[printed.end():], "the job printed no metrics after its checkpoint"
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["val_psnr"] > 0
