"""Load on the Serve application from a second process on 127.0.0.1: latency and throughput with
``@serve.batch`` and without, and a model replica killed in the middle of a run.

The served model is an untrained ``lacontrolnet`` on the tiny bundle (weights do not change the speed)
saved as a real checkpoint; every request uploads the same dark 128 x 128 PNG (a real photo). The client
is a separate process (``serve.py client``) with ``--inflight`` threads, each request bounded by
``--request-timeout``, the whole run by ``--run-timeout``. A request ends as ``ok`` (200), ``rejected_503``
(``max_queued_requests`` reached: Serve's back-pressure), ``error`` (any other status) or ``lost`` (no
answer within its timeout, or the connection dropped).

Runs: ``unbatched`` (max_batch_size 1) and ``batched`` (``--batch-size``), one replica each; then
``replica_kill``: the batched setting, and after ``--kill-after`` answers the model's replica is killed
with ``ray.kill``; after the run, ``--after-kill`` more requests must all succeed on the replacement.

    .venv/bin/python benchmarks/serve.py [--requests 64] [--inflight 8] [--batch-size 8] [--steps 4]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
MODEL = "bench"


# ---------------------------------------------------------------- client (the second process)

def one_request(url: str, png: bytes, timeout: float) -> tuple[str, float]:
    import requests

    tick = time.perf_counter()
    try:
        response = requests.post(url + "enhance", files={"file": ("dark.png", png)}, data={"model": MODEL},
                                 timeout=timeout)
    except requests.RequestException:
        return "lost", time.perf_counter() - tick
    status = {200: "ok", 503: "rejected_503"}.get(response.status_code, "error")
    return status, time.perf_counter() - tick


def client(args) -> None:
    """Send ``--requests`` with ``--inflight`` at once; print one line per answer, then the summary JSON."""
    png = Path(args.png).read_bytes()
    deadline = time.monotonic() + args.run_timeout
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def task(_: int) -> None:
        if time.monotonic() > deadline:  # the run's bound: not sent, counted as lost
            outcome = ("lost", 0.0)
        else:
            outcome = one_request(args.url, png, min(args.request_timeout, max(1.0, deadline - time.monotonic())))
        with lock:
            outcomes.append(outcome)
            print(f"answer {len(outcomes)} {outcome[0]} {outcome[1]:.3f}", flush=True)

    tick = time.perf_counter()
    with ThreadPoolExecutor(args.inflight) as pool:
        list(pool.map(task, range(args.requests)))
    wall = time.perf_counter() - tick
    ok = sorted(t for s, t in outcomes if s == "ok")
    summary = {"requests": args.requests, "inflight": args.inflight,
               **{k: sum(s == k for s, _ in outcomes) for k in ("ok", "rejected_503", "error", "lost")},
               "p50_s": float(np.percentile(ok, 50)) if ok else None,
               "p95_s": float(np.percentile(ok, 95)) if ok else None,
               "wall_s": wall, "throughput_rps": len(ok) / wall}
    print("summary " + json.dumps(summary), flush=True)


# ---------------------------------------------------------------- driver

def dark_png(path: Path, size: int) -> None:
    import cv2
    from skimage import data as skdata

    photo = cv2.resize(skdata.astronaut(), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    dark = np.clip((photo**2.2 / 20) ** (1 / 2.2) * 255 + 0.5, 0, 255).astype(np.uint8)
    _, encoded = cv2.imencode(".png", cv2.cvtColor(dark, cv2.COLOR_RGB2BGR))
    path.write_bytes(encoded.tobytes())


def save_checkpoint(directory: Path, steps: int) -> Path:
    from lowlight import checkpoint
    from lowlight.config import load_config
    from lowlight.methods import build_method

    cfg = load_config("sample_srgb", ["method.name=lacontrolnet", "model.vae=null", f"method.options.steps={steps}"])
    method = build_method(cfg.method, 3, cfg.model)
    out = directory / "checkpoint_0000000"
    checkpoint.save(out, cfg, method, 3, {"step": 0})
    return out


def replica_actor_names() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"model-{MODEL}" in a["name"]]


def kill_replica() -> str:
    import ray

    (name,) = replica_actor_names()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def run_load(url: str, png: Path, args, requests: int, on_answer=None) -> dict:
    """The client in a second process; ``on_answer(n)`` runs in this one as answers arrive."""
    command = [sys.executable, str(HERE), "client", "--url", url, "--png", str(png), "--requests", str(requests),
               "--inflight", str(args.inflight), "--request-timeout", str(args.request_timeout),
               "--run-timeout", str(args.run_timeout)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    summary = None
    for line in proc.stdout:
        if line.startswith("answer ") and on_answer:
            on_answer(int(line.split()[1]))
        elif line.startswith("summary "):
            summary = json.loads(line.removeprefix("summary "))
    proc.wait(timeout=60)
    if summary is None:
        raise RuntimeError(f"the load client exited {proc.returncode} without a summary")
    return summary


def serve_settings(checkpoint: Path, batch_size: int, args) -> dict:
    return {"models": [{"name": MODEL, "checkpoint": str(checkpoint)}],
            "batching": {"max_batch_size": batch_size, "batch_wait_timeout_s": args.batch_wait},
            "model_deployment": {"num_replicas": 1, "max_ongoing_requests": max(args.batch_size, 8),
                                 "max_queued_requests": args.max_queued, "health_check_period_s": 1,
                                 "num_cpus": 1},
            "ui": {"enabled": False}}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="driver", choices=["driver", "client"])
    p.add_argument("--url")
    p.add_argument("--png")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--inflight", type=int, default=8)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--run-timeout", type=float, default=600.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-wait", type=float, default=0.05)
    p.add_argument("--max-queued", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="sampler steps per request")
    p.add_argument("--size", type=int, default=128, help="side of the uploaded PNG")
    p.add_argument("--kill-after", type=int, default=16)
    p.add_argument("--after-kill", type=int, default=8)
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.mode == "client":
        return client(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from common import CpuShare, load_at_start, print_table, write_result
    from ray import serve

    from lowlight.config import RayConfig
    from lowlight.raycluster import ensure_ray
    from lowlight.serving.app import start
    from lowlight.serving.settings import ServeArgs

    load = load_at_start()
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    png = work / "dark.png"
    dark_png(png, args.size)
    ckpt = save_checkpoint(work / "run", args.steps)
    ensure_ray(RayConfig(num_cpus=os.cpu_count()))
    url = f"http://127.0.0.1:{args.port}/"
    results, stats, cpu = {}, {}, {}
    for name, batch in (("unbatched", 1), ("batched", args.batch_size)):
        start(ServeArgs.model_validate(serve_settings(ckpt, batch, args)), port=args.port)
        run_load(url, png, args, args.inflight)  # warm-up: the replica has loaded and run once
        with CpuShare() as share:
            results[name] = run_load(url, png, args, args.requests)
        cpu[name] = share.record()
        handle = serve.get_deployment_handle(f"model-{MODEL}", app_name="lowlight")
        stats[name] = handle.stats.remote().result()
        print(f"{name}: {results[name]}; batch sizes {stats[name]['batch_sizes']}")

    killed = {}

    def kill_at(n: int) -> None:
        if n == args.kill_after and not killed:
            killed["name"], killed["at_answer"] = kill_replica(), n
            print(f"killed {killed['name']} after {n} answers")

    results["replica_kill"] = run_load(url, png, args, args.requests, on_answer=kill_at)
    results["replica_kill"]["killed"] = killed
    results["replica_kill"]["after_kill"] = run_load(url, png, args, args.after_kill)
    results["replica_kill"]["replacement"] = replica_actor_names()
    serve.shutdown()

    rows = [(n, r["requests"], r["ok"], r["rejected_503"], r["error"], r["lost"], r["p50_s"], r["p95_s"],
             r["throughput_rps"]) for n, r in results.items()]
    after = results["replica_kill"]["after_kill"]
    rows.append(("after the kill", after["requests"], after["ok"], after["rejected_503"], after["error"],
                 after["lost"], after["p50_s"], after["p95_s"], after["throughput_rps"]))
    print_table(["run", "requests", "ok", "503", "error", "lost", "p50 s", "p95 s", "req/s"], rows,
                f"lacontrolnet (tiny), {args.size}px PNG, {args.steps} steps, {args.inflight} in flight")
    ratio = results["batched"]["throughput_rps"] / results["unbatched"]["throughput_rps"]
    print(f"batched / unbatched throughput: {ratio:.2f}x")
    write_result("serve", {**results, "batched_over_unbatched_throughput": ratio, "replica_batch_sizes": stats,
                           "cpu": cpu, "load_at_start": load,
                           "settings": {k: getattr(args, k) for k in ("requests", "inflight", "batch_size",
                                                                       "batch_wait", "max_queued", "steps", "size",
                                                                       "kill_after", "after_kill")}}, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
