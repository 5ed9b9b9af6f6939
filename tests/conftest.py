"""Shared fixtures: offline switches, a local Ray, a real S3 API (moto_server on 127.0.0.1),
the sample dataset and a fitted tiny VAE (built once per session)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

_SESSION_CACHE = tempfile.mkdtemp(prefix="lowlight-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["LOWLIGHT_CACHE"] = _SESSION_CACHE
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Dummy credentials for moto_server, set before any Ray worker starts so workers inherit them.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from lowlight.config import RayConfig
    from lowlight.raycluster import ensure_ray

    # 3 logical CPUs on 2 cores: 2 Ray Train workers hold 1 CPU each and Ray Data needs one to stream batches.
    ensure_ray(RayConfig(num_cpus=3))
    yield ray
    ray.shutdown()
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback; credentials are dummies moto accepts."""
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The embedded sample set from 4 skimage photos at reduced size (same code as `lowlight samples`)."""
    from lowlight.data.samples import build_samples, default_photos

    root = tmp_path_factory.mktemp("samples")
    build_samples(root, photos=default_photos()[:4], seed=0, max_side=256)
    return root


@pytest.fixture(scope="session")
def fitted_vae(sample_root, tmp_path_factory) -> Path:
    from lowlight.config import load_config
    from lowlight.fit_vae import fit_vae

    out = tmp_path_factory.mktemp("vae") / "vae"
    cfg = load_config(None, [f"fit_vae.out={out}", "fit_vae.steps=400", "fit_vae.log_every=1000"])
    fit_vae(cfg, str(sample_root / "lol"))
    return out


@pytest.fixture(scope="session")
def raw_data(ray_local, sample_root, fitted_vae, tmp_path_factory) -> Path:
    """Small raw Parquet (64 px crops) for the training tests."""
    from lowlight.config import load_config
    from lowlight.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("train-data") / "raw"
    preprocess(load_config("sample_raw", [f"dataset.root={sample_root / 'raw'}", f"model.vae={fitted_vae}",
                                          f"preprocess.output={out}", "preprocess.crop_size=64",
                                          "preprocess.crops_per_image=2", "preprocess.columns=[raw_in, raw_gt, z_gt]"]))
    return out


@pytest.fixture(scope="session")
def srgb_data(ray_local, sample_root, fitted_vae, tmp_path_factory) -> Path:
    """LOL-shaped sample set -> 64 px crops with latents made by the fitted tiny VAE."""
    from lowlight.config import load_config
    from lowlight.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("sd-data") / "srgb"
    preprocess(load_config("sample_srgb", [f"dataset.root={sample_root / 'lol'}", f"model.vae={fitted_vae}",
                                           f"preprocess.output={out}", "preprocess.crop_size=64",
                                           "preprocess.crops_per_image=2"]))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: intra-op threads only add contention (10-100x slower on a busy box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def served_checkpoints(fitted_vae, tmp_path_factory) -> dict[str, Path]:
    """Untrained checkpoints in the real format (what serving needs is loading, not quality): a raw
    regression and an sRGB latent ControlNet on the tiny bundle with the fitted VAE."""
    import torch

    from lowlight import checkpoint
    from lowlight.config import load_config
    from lowlight.methods import build_method

    root = tmp_path_factory.mktemp("served")
    specs = {"raw": ("sample_raw", ["method.name=regression", "method.backbone=nafnet-l4-w8"], 4),
             "srgb": ("sample_srgb", ["method.name=lacontrolnet", "method.options.steps=2",
                                      "method.options.cond_dropout=0.1"], 3)}
    out = {}
    for domain, (preset, overrides, channels) in specs.items():
        cfg = load_config(preset, [f"model.vae={fitted_vae}", *overrides])
        method = build_method(cfg.method, channels, cfg.model)
        if domain == "srgb":  # a zero-initialised ControlNet ignores its condition (and so would guidance ω)
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for parameter in method.controlnet.parameters():
                    parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        out[domain] = root / domain / "checkpoint_0000000"
        checkpoint.save(out[domain], cfg, method, channels, {"step": 0, "val_psnr": 20.0})
    return out


@pytest.fixture(scope="session")
def serve_app(ray_local, served_checkpoints, sample_root):
    """One Serve application (API + Gradio) on 127.0.0.1 for the session; test limits are small so the
    limit checks need no large files."""
    from ray import serve

    from lowlight.serving.app import start
    from lowlight.serving.settings import ServeArgs

    settings = ServeArgs.model_validate({
        "models": [{"name": "raw-regression", "checkpoint": str(served_checkpoints["raw"])},
                   {"name": "srgb-lacontrolnet", "checkpoint": str(served_checkpoints["srgb"])}],
        "limits": {"max_bytes": 2_000_000, "max_pixels": 400_000, "max_steps": 20},
        # Replicas take no CPU from the accounting, so the session's Train tests still find theirs.
        "model_deployment": {"num_cpus": 0, "max_queued_requests": 64, "health_check_period_s": 1},
        "ui": {"examples": [str(sample_root / "raw" / "*" / "short" / "*.dng")]}})
    url = start(settings, port=free_port())
    yield url, settings
    serve.shutdown()


@pytest.fixture(scope="session")
def raw_checkpoints(served_checkpoints, fitted_vae, tmp_path_factory):
    """The served raw regression and an untrained ExposureDiffusion, saved the real way."""
    from lowlight import checkpoint
    from lowlight.config import load_config
    from lowlight.methods import build_method

    cfg = load_config("sample_raw", [f"model.vae={fitted_vae}", "method.backbone=nafnet-l4-w8"])
    ed = tmp_path_factory.mktemp("eval-runs") / "sample-exposure_diffusion" / "checkpoint_0000000"
    checkpoint.save(ed, cfg, build_method(cfg.method, 4, cfg.model), 4, {"step": 0})
    return [str(served_checkpoints["raw"]), str(ed)]


@pytest.fixture(scope="session")
def evaluated(ray_local, raw_data, raw_checkpoints, tmp_path_factory):
    """Both raw checkpoints scored on the raw test split, with a report (one metric needs absent weights)."""
    from lowlight.evaluate import EvalSettings, evaluate

    out = tmp_path_factory.mktemp("eval")
    settings = EvalSettings(metrics=("fsim", "piqe", "lpips"), preview_rows=2, batch_size=2)
    return out, settings, evaluate(raw_checkpoints, str(raw_data), out, settings, progress=lambda _: None)
