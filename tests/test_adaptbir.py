"""AdaptBIR: the IQA rule against the paper's classes and the released code's k = MUSIQ / 100, the quantile
calibration, the w = 0 / k = 0 model against a plain lacontrolnet, what each stage trains (in process and
through Ray Train from Parquet), the PIQE fallback without MUSIQ weights, and the degradation chains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowlight import adaptive_quality as aq
from lowlight.config import load_config
from lowlight.data.degrade import LEVELS, degrade
from lowlight.methods import EnhanceOptions, build_method
from lowlight.metrics import psnr
from tests.cli_helpers import assert_enhances_a_sample_png

MUSIQ = aq.QualityOptions(severe=40, mild=70)


def _build(*overrides: str):
    cfg = load_config("sample_srgb", ["model.vae=null", "method.options.steps=3", *overrides])
    return build_method(cfg.method, 3, cfg.model)


def _batch(seed: int = 0, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"srgb_in": torch.rand(2, 3, size, size, generator=g) * 0.3,
            "srgb_gt": torch.rand(2, 3, size, size, generator=g)}


def test_k_and_w_follow_the_paper_classes_and_the_released_medium_rule():
    """MUSIQ: severe [0, 40) -> (0, 0); medium [40, 70) -> k = MUSIQ / 100, w = k / 0.7; mild -> (0.7, 1)."""
    scores = torch.tensor([0.0, 39.9, 40.0, 55.0, 69.9, 70.0, 95.0])
    k, w = aq.coefficients(scores, MUSIQ, "musiq")
    expected_k = [0, 0, 0.40, 0.55, 0.699, 0.7, 0.7]
    np.testing.assert_allclose(k.numpy(), expected_k, atol=1e-6)
    np.testing.assert_allclose(w.numpy(), [0, 0, 0.4 / 0.7, 0.55 / 0.7, 0.699 / 0.7, 1, 1], atol=1e-6)
    assert aq.classes(w) == ["severe", "severe", "medium", "medium", "medium", "mild", "mild"]
    # A lower-is-better metric: worse than 60 severe, 30 or better mild, halfway k = 0.55.
    k, w = aq.coefficients(torch.tensor([70.0, 45.0, 30.0, 10.0]), aq.QualityOptions(severe=60, mild=30), "piqe")
    np.testing.assert_allclose(k.numpy(), [0, 0.55, 0.7, 0.7], atol=1e-6)
    np.testing.assert_allclose(w.numpy(), [0, 0.55 / 0.7, 1, 1], atol=1e-6)
    k, w = aq.coefficients(scores, MUSIQ.model_copy(update={"adaptive": False}), "musiq")
    assert not k.any() and not w.any()


def test_calibration_splits_the_training_scores_by_the_stated_fractions():
    scores = np.random.default_rng(0).uniform(10, 90, 300)
    severe, mild = aq.calibrate(scores, "piqe", aq.QualityOptions())
    assert mild < severe  # PIQE: lower is better
    _, w = aq.coefficients(torch.from_numpy(scores).float(), aq.QualityOptions(severe=severe, mild=mild), "piqe")
    shares = {c: aq.classes(w).count(c) / len(scores) for c in ("severe", "medium", "mild")}
    assert all(abs(share - 1 / 3) < 0.02 for share in shares.values()), shares
    assert aq.thresholds("musiq", aq.QualityOptions(), None) == (40.0, 70.0)


def test_musiq_missing_falls_back_to_piqe_and_says_so(tmp_path):
    """TORCH_HOME at an empty folder: no MUSIQ weights; nothing is downloaded."""
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from lowlight.adaptive_quality import resolve_metric; print('metric=' + resolve_metric('auto'))")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          env={"TORCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "metric=piqe" in done.stdout
    assert "MUSIQ unavailable" in done.stderr and str(tmp_path) in done.stderr


def test_with_k_0_and_w_0_it_is_the_plain_lacontrolnet():
    torch.manual_seed(0)
    adapt = _build("method.name=adaptbir", "method.options.quality.metric=piqe",
                   "method.options.quality.adaptive=false").eval()
    plain = _build("method.name=lacontrolnet").eval()
    plain.controlnet.load_state_dict(adapt.controlnet.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # CSFT and the restoration VAE off their initialisation: w must be what disables them
        for p in [*adapt.csft.parameters(), *adapt.restoration_vae.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = _batch()
    opts = EnhanceOptions(steps=3, sampler="ddim")
    with torch.no_grad():
        z_restore = adapt.restoration_latent(batch["srgb_in"])
        expected = plain.sample_latent({**batch, "z_pre": z_restore}, opts)
        assert not torch.allclose(z_restore, adapt.bundle.encode(batch["srgb_in"]), atol=1e-3)
        assert torch.equal(adapt.sample_latent(batch, opts), expected)
        adapt.options.quality = aq.QualityOptions(severe=1000, mild=999)  # PIQE: all mild
        assert not torch.allclose(adapt.sample_latent(batch, opts), expected, atol=1e-4)


@pytest.mark.parametrize(("stage", "prefix", "probe"), [
    ("vae", "restoration_vae.", "restoration_vae.encoder.conv_in.weight"),
    ("controlnet", "controlnet.", "controlnet.controlnet_down_blocks.0.weight"),  # zero convs: grads start there
    ("csft", "csft.", "csft.mid.alpha.weight")])
def test_each_stage_trains_only_its_modules(stage, prefix, probe):
    method = _build("method.name=adaptbir", f"method.options.stage={stage}", "method.options.quality.metric=piqe",
                    "method.options.quality.severe=1000", "method.options.quality.mild=999")  # PIQE: all mild
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(prefix) for n in trainable)
    batch = _batch()
    batch.update(z_in=method.bundle.encode(batch["srgb_in"]), z_gt=method.bundle.encode(batch["srgb_gt"]))
    loss, _ = method(batch, torch.Generator().manual_seed(0))
    loss.backward()
    grad = dict(method.named_parameters())[probe].grad
    assert grad is not None and grad.abs().sum() > 0


def test_skip_position_modulates_the_skips_only():
    method = _build("method.name=adaptbir", "method.options.csft_position=skip", "method.options.quality.adaptive=false")
    with torch.no_grad():
        for p in method.csft.parameters():
            p.add_(0.05)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    hint = torch.cat([torch.randn(1, 4, 8, 8), torch.zeros(1, 1, 8, 8)], dim=1)
    with torch.no_grad():
        off = method.denoise(x, t, hint)
        on = method.denoise(x, t, torch.cat([hint[:, :4], torch.ones(1, 1, 8, 8)], dim=1))
    assert not torch.allclose(off, on)
    assert len(method.csft.layers) == len(method.controlnet.controlnet_down_blocks) - 1


def test_degradation_levels_are_ordered_and_seeded():
    from skimage import data

    clean = torch.from_numpy(data.astronaut()[::4, ::4].astype(np.float32) / 255).permute(2, 0, 1)[None]
    scores = {}
    for level in LEVELS:
        a = degrade(clean, level, torch.Generator().manual_seed(3))
        assert torch.equal(a, degrade(clean, level, torch.Generator().manual_seed(3)))
        assert a.shape == clean.shape and 0 <= a.min() and a.max() <= 1
        scores[level] = psnr(a, clean)
    assert scores["mild"] > scores["medium"] + 1 > scores["severe"] + 2, scores


def test_the_three_stages_train_through_ray_from_parquet_and_enhance(srgb_data, fitted_vae, sample_root, tmp_path):
    """Stage I -> II -> III, each initialised from the one before; III saves only CSFT weights, which moved
    off zero, and its checkpoint names the IQA metric and thresholds it calibrated."""
    from lowlight.checkpoint import load_method
    from lowlight.train import train

    common = ["method.name=adaptbir", f"model.vae={fitted_vae}", f"train.data={srgb_data}",
              f"train.storage_path={tmp_path / 'runs'}", "train.steps=2", "train.batch_size=2", "train.num_workers=1",
              "train.checkpoint_every=2", "train.val_every=2", "train.val_batches=1", "train.val_images=1",
              "method.options.steps=2", "method.options.quality.calibration_images=16"]
    previous: list[str] = []
    checkpoints = {}
    for stage in ("vae", "controlnet", "csft"):
        cfg = load_config("sample_srgb", [*common, *previous, f"method.options.stage={stage}",
                                          f"train.name=adaptbir-{stage}"])
        checkpoints[stage] = Path(train(cfg).checkpoint)
        previous = [f"model.init_from={checkpoints[stage]}"]
    final = checkpoints["csft"]
    assert {p.name for p in final.glob("*.safetensors") if ".ema." not in p.name} == {"csft.safetensors"}
    alphas = [v for k, v in load_file(str(final / "csft.safetensors")).items() if k.endswith("alpha.weight")]
    assert alphas and any(a.abs().sum() > 0 for a in alphas)
    cfg, method = load_method(str(final))
    q = cfg.method.options["quality"]
    assert q["metric"] in ("musiq", "piqe") and q["severe"] is not None and q["mild"] is not None
    stage1 = load_file(str(checkpoints["vae"] / "restoration_vae.safetensors"))
    loaded = method.restoration_vae.state_dict()
    assert all(torch.equal(loaded[k].float(), v.float()) for k, v in stage1.items())
    assert_enhances_a_sample_png(final, sample_root, tmp_path / "adapt.png")


def test_csft_gradients_are_the_same_with_gradient_checkpointing():
    """Checkpointing re-runs the UNet's blocks in backward, after the denoiser call returned: they must be
    modulated again, or the CSFT gradients are wrong (or the recomputation fails)."""
    method = _build("method.name=adaptbir", "method.options.quality.metric=piqe",
                    "method.options.quality.severe=1000", "method.options.quality.mild=999")
    with torch.no_grad():
        for p in method.csft.parameters():
            p.add_(0.02)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    hint = torch.cat([torch.randn(1, 4, 8, 8), torch.ones(1, 1, 8, 8)], dim=1)
    grads = []
    for checkpointing in (False, True):
        method.unet.train()
        if checkpointing:
            method.unet.enable_gradient_checkpointing()
        method.zero_grad()
        method.denoise(x, t, hint).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in method.csft.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0
