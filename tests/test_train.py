"""The Ray Train loop on 2 CPU workers: both methods train, checkpoints round-trip, a killed
worker resumes to the same weights (streamed input included), and bad inputs fail before any worker starts."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lowlight import checkpoint
from lowlight.config import ConfigError, load_config
from lowlight.methods import build_method
from lowlight.methods.base import Method, MethodOptions, register
from lowlight.train import build_trainer, preflight, train

BASE = ["method.backbone=nafnet-l4-w8", "train.num_workers=2", "train.batch_size=4", "train.val_batches=1",
        "train.val_images=2", "train.lr=1e-3"]


def cfg_for(data: Path, runs: Path, name: str, *extra: str):
    return load_config("sample_raw", [f"train.data={data}", f"train.storage_path={runs}", f"train.name={name}",
                                      *BASE, *extra])


@pytest.mark.parametrize("method", ["regression", "exposure_diffusion"])
def test_method_trains_and_checkpoints(raw_data, tmp_path, method):
    result = train(cfg_for(raw_data, tmp_path, method, f"method.name={method}", "train.steps=4",
                           "train.checkpoint_every=2", "train.val_every=2"))
    ckpt = Path(result.checkpoint)
    assert ckpt.name == "checkpoint_0000004"
    assert {"config.yaml", "method.json", "model.safetensors", "optimizer.pt", "metrics.json", "samples.png"} <= {
        p.name for p in ckpt.iterdir()}
    for key in ("val_psnr", "val_ssim", "val_psnr_srgb", "val_input_psnr"):
        assert torch.isfinite(torch.tensor(result.metrics[key])), key
    cfg, loaded = checkpoint.load_method(ckpt)
    assert cfg.method.name == method
    saved = load_file(str(ckpt / "model.safetensors"))
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_grad_accum_steps_optimizer_and_schedule_once_per_step(raw_data, tmp_path):
    """2 workers x 2 micro-batches under bf16 autocast: 4 optimizer steps move the weights, and the
    LR schedule advances once per optimizer step (not per micro-batch or per worker)."""
    result = train(cfg_for(raw_data, tmp_path, "accum", "method.name=regression", "train.steps=4",
                           "train.grad_accum=2", "train.precision=bf16", "train.warmup_steps=10",
                           "train.checkpoint_every=4", "train.val_every=4", "train.val_images=0"))
    ckpt = Path(result.checkpoint)
    state = checkpoint.load_training_state(ckpt)
    assert state["step"] == result.metrics["step"] == 4
    assert state["scheduler"]["last_epoch"] == 4
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4}
    assert result.metrics["lr"] == pytest.approx(1e-3 * 5 / 10)  # warmup factor (k + 1) / 10 after k = 4 steps
    cfg, trained = checkpoint.load_method(ckpt)
    torch.manual_seed(cfg.train.seed)
    initial = build_method(cfg.method, trained.channels, cfg.model)
    assert any(not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), trained.state_dict().values()))


def test_training_state_refuses_pickled_objects(raw_data, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"step": 1, "evil": Payload()}, tmp_path / checkpoint.TRAINING_STATE)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        checkpoint.load_training_state(tmp_path)


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list[int], deadline: float) -> None:
    while time.time() < deadline:
        if any(run_dir.glob("checkpoint_*")):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
                    return
        time.sleep(0.2)


@pytest.mark.e2e
def test_killed_worker_resumes_to_identical_weights(raw_data, tmp_path):
    steps = ["method.name=exposure_diffusion", "train.steps=24", "train.checkpoint_every=4", "train.val_every=1000",
             "train.val_images=0"]
    reference = train(cfg_for(raw_data, tmp_path, "uninterrupted", *steps))
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                               args=(tmp_path / "interrupted", killed, time.time() + 300))
    watcher.start()
    resumed = train(cfg_for(raw_data, tmp_path, "interrupted", *steps, "train.max_failures=2"))
    watcher.join()
    assert killed, "no worker was killed: the run finished before its first checkpoint"
    expected = load_file(str(Path(reference.checkpoint) / "model.safetensors"))
    got = load_file(str(Path(resumed.checkpoint) / "model.safetensors"))
    assert reference.metrics["epoch"] >= 2, "the run should cross epochs: the resume then lands in a later one"
    # Bit-identical: the resumed workers re-read their part of the split from the checkpoint's data position,
    # the noise comes from per-step generators, and two-way gloo sums commute.
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


class LatentOptions(MethodOptions):
    pass


@register
class LatentProbe(Method):
    """A minimal latent-space method, registered only by this test, to exercise the vae_id check."""

    name = "test_latent_probe"
    Options = LatentOptions

    @classmethod
    def columns_for(cls, cfg):
        return ("z_gt", "raw_gt")


def test_preflight_errors_name_the_problem(raw_data, fitted_vae, tmp_path):
    with pytest.raises(ConfigError, match=r"lacks column\(s\) \['srgb_in', 'srgb_gt'\]"):
        preflight(cfg_for(raw_data, tmp_path, "x", "method.name=regression", "method.domain=srgb"))
    with pytest.raises(ConfigError, match="latents in .* were made by VAE"):
        preflight(cfg_for(raw_data, tmp_path, "x", "method.name=test_latent_probe", "model.vae=null"))
    assert preflight(cfg_for(raw_data, tmp_path, "x", "method.name=test_latent_probe",
                             f"model.vae={fitted_vae}"))["channels"] == 4
    with pytest.raises(ConfigError, match="method.options.stepz"):
        build_trainer(cfg_for(raw_data, tmp_path, "x", "method.options.stepz=3"))
    with pytest.raises(ConfigError, match="'train.stepz'"):
        cfg_for(raw_data, tmp_path, "x", "train.stepz=3")
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        preflight(cfg_for(raw_data, tmp_path, "x", "method.name=nope"))
    with pytest.raises(ConfigError, match="works on \\['raw'\\]"):
        preflight(cfg_for(raw_data, tmp_path, "x", "method.domain=srgb"))
