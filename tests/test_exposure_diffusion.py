"""ExposureDiffusion's exposure process: schedules, the Poisson step, gradients, inference."""

from __future__ import annotations

import torch

from lowlight.config import MethodConfig
from lowlight.methods import EnhanceOptions, build_method


def make(**options):
    cfg = MethodConfig(name="exposure_diffusion", backbone="nafnet-1", options=options)
    torch.manual_seed(0)
    return build_method(cfg, channels=4)


def batch(n=2, size=16, ratio=100.0):
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(n, 4, size, size, generator=g) * 0.5
    return {"raw_gt": gt, "raw_in": gt / ratio, "ratio": torch.full((n,), ratio), "iso": torch.full((n,), 800.0),
            "wb": torch.tensor([[2.0, 1.0, 1.5]] * n), "ccm": torch.eye(3).expand(n, 3, 3).clone()}


def test_adaptive_head_has_2c_plus_1_outputs():
    method = make()
    out = method.backbone(torch.zeros(1, 4, 16, 16))
    assert out.shape[1] == 9


def test_training_exposures_increase_from_the_input_exposure():
    method = make(train_steps=4)
    ratio = torch.tensor([100.0, 300.0])
    lam = method.training_exposures(ratio, torch.Generator().manual_seed(0))
    assert lam.shape == (2, 4)
    torch.testing.assert_close(lam[:, 0], 1 / ratio)
    assert (lam[:, 1:] >= lam[:, :-1]).all() and (lam < 1).all()


def test_inference_exposures_are_evenly_spaced():
    lam = make().inference_exposures(torch.tensor([100.0]), 4)
    gaps = lam[0, 1:] - lam[0, :-1]
    torch.testing.assert_close(gaps, gaps.mean().expand(3))
    torch.testing.assert_close(lam[0, 0], torch.tensor(0.01))


def test_longer_exposure_adds_poisson_photons_with_the_right_mean_and_variance():
    method = make()
    k = torch.full((1, 1, 1, 1), 2.0)
    x = torch.zeros(1, 4, 128, 128)
    prediction = torch.full_like(x, 0.3)
    nxt = method.longer_exposure(x, prediction, torch.tensor([0.01]), torch.tensor([0.02]), k,
                                 torch.Generator().manual_seed(0), straight_through=False)
    electrons = nxt * method.white_minus_black / k
    expected = 0.01 * 0.3 * method.white_minus_black / 2.0
    assert abs(float(electrons.mean()) / expected - 1) < 0.02
    assert abs(float(electrons.var()) / expected - 1) < 0.05
    assert torch.allclose(electrons, electrons.round(), atol=1e-3)  # whole photo-electrons


def test_gradient_flows_through_the_poisson_step():
    method = make(train_steps=2)
    prediction = torch.full((1, 4, 8, 8), 0.3, requires_grad=True)
    nxt = method.longer_exposure(torch.zeros(1, 4, 8, 8), prediction, torch.tensor([0.01]), torch.tensor([0.5]),
                                 torch.full((1, 1, 1, 1), 1.0), torch.Generator().manual_seed(0), straight_through=True)
    nxt.sum().backward()
    torch.testing.assert_close(prediction.grad, torch.full_like(prediction, 0.49))


def test_loss_sums_one_term_per_step_and_backpropagates():
    method = make(train_steps=3)
    loss, logs = method.loss(batch(), torch.Generator().manual_seed(0))
    assert {"loss_step0", "loss_step1", "loss_step2"} <= set(logs)
    assert abs(logs["loss"] - sum(logs[f"loss_step{t}"] for t in range(3))) < 1e-5
    loss.backward()
    assert all(p.grad is not None for p in method.parameters())


def test_one_step_inference_is_the_network_on_the_input():
    method = make().eval()
    b = batch()
    one = method.predict(b, EnhanceOptions(steps=1))
    torch.testing.assert_close(one, method.network(b["raw_in"], 1 / b["ratio"]).clamp(0, 1))
    two = method.predict(b, EnhanceOptions(steps=2, seed=3))
    assert torch.equal(two, method.predict(b, EnhanceOptions(steps=2, seed=3)))
    srgb = method.enhance(b, EnhanceOptions())
    assert srgb.shape == (2, 3, 16, 16) and srgb.min() >= 0 and srgb.max() <= 1


def test_synthetic_noise_option_draws_input_from_the_target():
    method = make(noise="eld")
    b = batch(ratio=50.0)
    x = method.input_state(b, torch.Generator().manual_seed(0))
    assert not torch.equal(x, b["raw_in"])
    assert abs(float(x.mean()) / float(b["raw_gt"].mean() / 50) - 1) < 0.1
