"""Condition refinement: the pyramid target against bilinear resampling computed by hand, shapes through the
whole plug-in for latents that are not multiples of 16, the fresh plug-in reproducing its baseline's sampler
output exactly, and every ablation row building and taking a training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowlight.ablations import load_ablations
from lowlight.config import MethodConfig, ModelConfig, load_config
from lowlight.methods import EnhanceOptions, build_method
from lowlight.models.condition_refinement import pyramid

TINY = ModelConfig(pretrained="tiny")


def _resize_1d(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Bilinear resampling along one axis with half-pixel centres (source = (j + 0.5) * n / size - 0.5,
    clamped at the edges), written out from the definition."""
    n = x.shape[axis]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, n - 1)
    frac = src - low
    shape = [1] * x.ndim
    shape[axis] = size
    return np.take(x, low, axis) * (1 - frac).reshape(shape) + np.take(x, high, axis) * frac.reshape(shape)


def test_pyramid_matches_bilinear_resampling_by_hand():
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1, 4, 32, 48))
    expected = [latent]
    for f in (2, 4, 8, 16):
        down = _resize_1d(_resize_1d(latent, 32 // f, 2), 48 // f, 3)
        expected.append(_resize_1d(_resize_1d(down, 32, 2), 48, 3))
    got = pyramid(torch.from_numpy(latent).float()).numpy()
    assert got.shape == (1, 20, 32, 48)
    np.testing.assert_allclose(got, np.concatenate(expected, axis=1), atol=1e-5)


def _batch(latent: tuple[int, int], n: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, w = latent
    image = lambda: torch.rand(n, 3, 8 * h, 8 * w, generator=g)
    return {"srgb_in": image() * 0.2, "srgb_pre": image(), "srgb_gt": image(),
            **{k: torch.randn(n, 4, h, w, generator=g) for k in ("z_in", "z_pre", "z_gt")}}


@pytest.mark.parametrize("latent", [(9, 9), (5, 11)])
def test_shapes_through_the_plug_in_for_sizes_not_multiple_of_16(latent):
    method = build_method(MethodConfig(name="condrefine", domain="srgb", options={"steps": 2}), 3, TINY)
    batch = _batch(latent)
    refined = method.refine(batch, torch.Generator().manual_seed(0), target=batch["z_gt"])
    assert refined["refined"].shape == batch["z_pre"].shape
    assert refined["prior"].shape == refined["target"].shape == (2, 20, *latent)
    loss, logs = method.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and {"loss_diffusion", "loss_refined", "loss_prior", "loss_pixel"} <= set(logs)
    assert all(p.grad is not None for p in method.trainable_parameters())
    with torch.no_grad():
        assert method.predict(batch, EnhanceOptions(steps=2)).shape == batch["srgb_in"].shape


@pytest.mark.parametrize("baseline", ["lacontrolnet", "sd_concat"])
def test_fresh_plug_in_reproduces_its_baseline_exactly(baseline):
    """Zero-initialised predictor biases and interaction heads: l_hat = l_c and no residuals, so the sampler
    returns what the baseline returns, bit for bit; a non-zero interaction changes it."""
    torch.manual_seed(0)
    plain = build_method(MethodConfig(name=baseline, domain="srgb", options={"steps": 3}), 3, TINY)
    condition = "pre" if baseline == "lacontrolnet" else "input"  # what each baseline conditions on
    refined = build_method(MethodConfig(name="condrefine", domain="srgb", options={
        "baseline": baseline, "steps": 3, "condition": condition}), 3, TINY)
    trained = "controlnet" if baseline == "lacontrolnet" else "unet"
    with torch.no_grad():
        for p in getattr(plain, trained).parameters():
            p.add_(0.02 * torch.randn_like(p))
    getattr(refined, trained).load_state_dict(getattr(plain, trained).state_dict())
    batch = _batch((8, 8))
    opts = EnhanceOptions(steps=3)
    with torch.no_grad():
        expected = plain.predict(batch, opts)
        assert torch.equal(refined.predict(batch, opts), expected)
        for p in refined.interaction.heads[0][-1].parameters():
            p.add_(0.05)
        assert not torch.equal(refined.predict(batch, opts), expected)


@pytest.mark.parametrize("name", list(load_ablations("condrefine")))
def test_each_ablation_row_builds_and_takes_a_training_step(name):
    row = load_ablations("condrefine")[name]
    cfg = load_config("sample_srgb", ["method.name=condrefine", "method.options.steps=2", *row.diffusion])
    load_config("sample_srgb", ["method.name=regression", *row.restorer])  # the stage-1 override is valid
    method = build_method(cfg.method, 3, TINY)
    batch = _batch((4, 4))
    optimizer = torch.optim.AdamW(method.optimizer_groups(1e-4))
    loss, _ = method(batch, torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert method.extra_parameters() > 0
