"""ExposureDiffusion's exposure process (schedules, Poisson steps, gain, loss, inputs, checkpoint) and the
regression baseline's input residual."""

from __future__ import annotations

import math

import pytest
import torch

from lowlight.checkpoint import load_method, save
from lowlight.config import Config, ConfigError, MethodConfig
from lowlight.data.noise import NoiseCalibration, gain_for_iso
from lowlight.methods import EnhanceOptions, build_method, short_exposure
from lowlight.methods.exposure_diffusion import ExposureDiffusion, HeadOutput
from lowlight.metrics import least_squares_rescale

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(backbone="nafnet-1", **options):
    cfg = MethodConfig(name="exposure_diffusion", backbone=backbone, options=options)
    torch.manual_seed(0)
    return build_method(cfg, channels=4)


def batch(n=2, size=16, ratio=100.0, iso=800.0):
    g = torch.Generator().manual_seed(1)
    gt = 0.25 + torch.rand(n, 4, size, size, generator=g) * 0.25
    return {"raw_gt": gt, "raw_in": gt / ratio, "ratio": torch.full((n,), ratio),
            "iso": torch.full((n,), iso),
            "wb": torch.tensor([[2.0, 1.0, 1.5]] * n), "ccm": torch.eye(3).expand(n, 3, 3).clone()}


@pytest.mark.parametrize(("options", "inputs"), [
    ({"noise": "pg"}, 8),  # amplified X_t + photon map (the paper's P+G models)
    ({"noise": "eld"}, 12),  # + the amplified input X_T (--concat_origin)
    ({"noise": "paired"}, 12),
    ({"noise": "pg", "with_photon": False}, 4),
    ({"noise": "eld", "concat_origin": False}, 8),
])
def test_network_input_channels_and_adaptive_head(options, inputs):
    method = make(**options)
    assert method.backbone.intro.in_channels == inputs
    assert method.backbone.ending.out_channels == 9  # mask + direct (4) + residual (4)


def test_photon_map_is_the_state_over_the_gain():
    method = make(noise="pg")
    seen = []
    method.backbone.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = torch.rand(1, 4, 8, 8) * 0.01
    method.network(x, torch.tensor([0.01]), torch.tensor([2.0]), origin=x * 100)
    torch.testing.assert_close(seen[0][:, :4], x / 0.01)
    torch.testing.assert_close(seen[0][:, 4:], x / 2.0)


def test_training_and_inference_exposures_come_from_the_same_law():
    """The T-1 = 2 intermediate training exposures are sorted uniforms on (lambda_T, 1): their order
    statistics have means 1/3 and 2/3 of the way, exactly where 3-step inference puts its states."""
    ratio = torch.full((20000,), 100.0)
    lam_train = make(train_steps=3).training_exposures(ratio, torch.Generator().manual_seed(0))
    lam_infer = ExposureDiffusion.inference_exposures(ratio[:1], 3)[0]
    frac = lambda lam: (lam - 0.01) / (1 - 0.01)  # position between lambda_T and the reference
    torch.testing.assert_close(lam_train[:, 0], 1 / ratio)
    assert (lam_train[:, 1:] > lam_train[:, :-1]).all() and (lam_train < 1).all()
    for j in (1, 2):
        assert abs(float(frac(lam_train[:, j]).mean()) - float(frac(lam_infer[j]))) < 0.01
    # pooled, the intermediate exposures are uniform on (lambda_T, 1): Kolmogorov-Smirnov distance
    pooled = frac(lam_train[:, 1:].flatten()).sort().values
    ks = float((pooled - torch.arange(1, pooled.numel() + 1) / pooled.numel()).abs().max())
    assert ks < 1.63 / math.sqrt(pooled.numel())  # the 1% critical value
    # the log-uniform option puts the states near the input: the same comparison fails
    lam_log = make(train_steps=3, train_exposures="log_uniform").training_exposures(
        ratio, torch.Generator().manual_seed(0))
    assert abs(float(frac(lam_log[:, 1]).mean()) - float(frac(lam_infer[1]))) > 0.1


def test_inference_exposures_are_evenly_spaced():
    lam = ExposureDiffusion.inference_exposures(torch.tensor([100.0]), 4)
    gaps = lam[0, 1:] - lam[0, :-1]
    torch.testing.assert_close(gaps, gaps.mean().expand(3))
    torch.testing.assert_close(lam[0, 0], torch.tensor(0.01))


@pytest.mark.parametrize("form", ["redraw_from_input", "accumulate"])
def test_next_state_adds_whole_poisson_photons(form):
    method = make(next_state=form)
    k = torch.tensor([2.0])
    x_in = torch.zeros(1, 4, 128, 128)
    exposures = torch.tensor([[0.01, 0.02]])
    nxt = method.next_state(x_in, x_in, torch.full_like(x_in, 0.3), exposures, 0, k,
                            torch.Generator().manual_seed(0), straight_through=False)
    electrons = nxt * method.white_minus_black / 2.0
    expected = 0.01 * 0.3 * method.white_minus_black / 2.0
    assert abs(float(electrons.mean()) / expected - 1) < 0.02
    assert abs(float(electrons.var()) / expected - 1) < 0.05
    assert torch.allclose(electrons, electrons.round(), atol=1e-3)


def test_both_next_state_forms_agree_in_law_on_a_constant_image():
    """Poisson additivity: X_T + Poisson(a) + Poisson(b) (Eq. 10, twice) and X_T + Poisson(a + b) (the
    released code) have the same mean and variance when the prediction stays the same constant."""
    k, c = torch.tensor([1.5]), 0.4
    exposures = torch.tensor([[0.01, 0.2, 0.6]])
    x_in = torch.full((1, 4, 256, 256), 0.004)
    prediction = torch.full_like(x_in, c)
    finals = {}
    for form in ("redraw_from_input", "accumulate"):
        method, g = make(next_state=form), torch.Generator().manual_seed(7)
        x = x_in
        for t in range(2):
            x = method.next_state(x_in, x, prediction, exposures, t, k, g, straight_through=False)
        finals[form] = (x - x_in) * method.white_minus_black / k
    expected = (0.6 - 0.01) * c * make().white_minus_black / float(k)  # electrons gained since X_T
    for electrons in finals.values():
        assert abs(float(electrons.mean()) / expected - 1) < 0.01
        assert abs(float(electrons.var()) / expected - 1) < 0.03
    means = [float(e.mean()) for e in finals.values()]
    assert abs(means[0] - means[1]) < 3 * math.sqrt(2 * expected / x_in.numel())


def test_gradient_flows_through_the_poisson_step():
    method = make()
    prediction = torch.full((1, 4, 8, 8), 0.3, requires_grad=True)
    x_in = torch.zeros(1, 4, 8, 8)
    nxt = method.next_state(x_in, x_in, prediction, torch.tensor([[0.01, 0.5]]), 0, torch.tensor([1.0]),
                            torch.Generator().manual_seed(0), straight_through=True)
    nxt.sum().backward()
    torch.testing.assert_close(prediction.grad, torch.full_like(prediction, 0.49))


def gains_used(monkeypatch, method, rows) -> tuple[list, list]:
    """The K each training step's synthesis drew its noise with, and the K of each Poisson step."""
    drawn, stepped = [], []
    real_synthesize, real_step = short_exposure.synthesize_low_light, method.next_state

    def spy_synthesize(*args, params, **kwargs):
        drawn.append(params.k.clone())
        return real_synthesize(*args, params=params, **kwargs)

    def spy_step(x_input, x_t, prediction, exposures, t, k, *args, **kwargs):
        stepped.append(k.clone())
        return real_step(x_input, x_t, prediction, exposures, t, k, *args, **kwargs)

    monkeypatch.setattr(short_exposure, "synthesize_low_light", spy_synthesize)
    monkeypatch.setattr(method, "next_state", spy_step)
    method.loss(rows, torch.Generator().manual_seed(3))
    return drawn, stepped


def test_synthesis_and_poisson_steps_use_the_same_gain(monkeypatch):
    calib = NoiseCalibration.load("sony_a7s2")
    iso_k = gain_for_iso(calib, torch.full((3,), 800.0))
    drawn, stepped = gains_used(monkeypatch, make(noise="pg", train_steps=3), batch(n=3))
    assert len(drawn) == 1 and len(stepped) == 2
    for k in stepped:
        torch.testing.assert_close(k, drawn[0])
    assert not torch.allclose(drawn[0], iso_k)  # drawn per image over the calibration, not the rows' ISO
    assert ((drawn[0] >= calib.k_min) & (drawn[0] <= calib.k_max)).all()

    drawn, stepped = gains_used(monkeypatch, make(noise="eld", gain="iso"), batch(n=3))
    torch.testing.assert_close(drawn[0], iso_k)
    torch.testing.assert_close(stepped[0], iso_k)


def test_synthetic_input_is_a_fresh_clipped_short_exposure_at_a_drawn_ratio():
    method = make(noise="eld", ratio_range=(50.0, 50.0))
    b = batch(n=4)
    short = method.inputs.training(b, torch.Generator().manual_seed(0))
    torch.testing.assert_close(short.ratio, torch.full((4,), 50.0))
    assert short.x.min() >= 0 and short.x.max() <= 1
    assert abs(float(short.x.mean()) / float(b["raw_gt"].mean() / 50) - 1) < 0.05
    again = method.inputs.training(b, torch.Generator().manual_seed(1))
    assert not torch.equal(short.x, again.x)
    wide = make(noise="pg").inputs.training(batch(n=256, size=2), torch.Generator().manual_seed(0))
    assert 20 <= float(wide.ratio.min()) and float(wide.ratio.max()) <= 300 and float(wide.ratio.std()) > 60


def test_flips_move_input_and_target_together():
    method = make(noise="paired")
    b = batch(n=8)
    short = method.inputs.training(b, torch.Generator().manual_seed(0))
    torch.testing.assert_close(short.x * 100, short.target)
    assert not torch.equal(short.target, b["raw_gt"])


def test_learned_step_weights_move_to_the_best_step_and_never_go_negative():
    """Equal weights at the start (as the released --adaptive_loss); d loss / d logit_t = w_t (L_t - mean L),
    so the weight flows to the lowest loss; far from the start they still form a convex combination (the
    released form's last weight, 1 - sum w, goes negative and turns the loss into one to maximise)."""
    method = make(train_steps=3)
    loss, logs = method.loss(batch(), torch.Generator().manual_seed(0))
    steps = torch.tensor([logs[f"loss_step{t}"] for t in range(3)])
    assert abs(logs["loss"] - float(steps.mean())) < 1e-5
    loss.backward()
    torch.testing.assert_close(method.step_weights.grad, (steps - steps.mean()) / 3, atol=1e-5, rtol=1e-4)
    assert all(p.grad is not None for p in method.parameters())

    with torch.no_grad():
        method.step_weights.copy_(torch.tensor([5.0, 4.0, -3.0]))
    _, logs = method.loss(batch(), torch.Generator().manual_seed(0))
    weights = [logs[f"weight_step{t}"] for t in range(3)]
    assert min(weights) >= 0 and abs(sum(weights) - 1) < 1e-6
    assert abs(logs["loss"] - sum(w * logs[f"loss_step{t}"] for t, w in enumerate(weights))) < 1e-5

    equal = make(train_steps=3, step_weights="equal")
    assert equal.step_weights is None
    _, logs = equal.loss(batch(), torch.Generator().manual_seed(0))
    assert abs(logs["loss"] - sum(logs[f"loss_step{t}"] for t in range(3))) < 1e-5


def test_branch_loss_scores_each_branch_where_the_mask_uses_it():
    method, plain = make(), make(branch_loss=False)
    target = torch.full((1, 4, 4, 4), 0.5)
    head = HeadOutput(final=target.clone(), direct=target + 0.2, by_residual=target - 0.1,
                      mask=torch.full((1, 1, 4, 4), 0.25))
    assert float(plain.step_loss(head, target)) == pytest.approx(0.0, abs=1e-7)
    assert float(method.step_loss(head, target)) == pytest.approx(0.2 * 0.25 + 0.1 * 0.75, rel=1e-5)


def test_poisson_kl_follows_eq_11():
    """Eq. 11: F log(F / X_ref) + X_ref - F, i.e. KL(P(F) || P(X_ref)), not the reverse."""
    method = make(loss="poisson_kl", branch_loss=False)
    pred, ref = 0.5, 0.25
    head = HeadOutput(final=torch.full((1, 4, 2, 2), pred), direct=torch.zeros(1, 4, 2, 2),
                      by_residual=torch.zeros(1, 4, 2, 2), mask=torch.ones(1, 1, 2, 2))
    value = float(method.step_loss(head, torch.full((1, 4, 2, 2), ref)))
    assert value == pytest.approx(pred * math.log(pred / ref) + ref - pred, rel=1e-5)
    assert value != pytest.approx(ref * math.log(ref / pred) + pred - ref, rel=1e-2)


def test_one_step_inference_is_the_network_on_the_input():
    method = make().eval()
    b = batch()
    one = method.predict(b, EnhanceOptions(steps=1))
    k = gain_for_iso(method.inputs.calib, b["iso"])
    origin = (b["raw_in"] * 100).clamp(0, 1)
    torch.testing.assert_close(one, method.network(origin / 100, 1 / b["ratio"], k, origin).final.clamp(0, 1))
    three = method.predict(b, EnhanceOptions(steps=3, seed=3))
    assert torch.equal(three, method.predict(b, EnhanceOptions(steps=3, seed=3)))
    srgb = method.enhance(b, EnhanceOptions())
    assert srgb.shape == (2, 3, 16, 16) and srgb.min() >= 0 and srgb.max() <= 1


def test_least_squares_oracle_reads_the_ground_truth():
    target = torch.rand(2, 4, 8, 8) * 0.8
    target[0, 0, 0, 0] = 1.0  # saturated: left out of the fit
    scaled = least_squares_rescale(target / 2, target)
    torch.testing.assert_close(scaled[:, :, 1:], target[:, :, 1:])
    method = make(ls_oracle="inference").eval()
    b = batch()
    assert not torch.equal(method.predict(b, EnhanceOptions(steps=2)),
                           make().eval().predict(b, EnhanceOptions(steps=2)))
    del b["raw_gt"]
    with pytest.raises(ValueError, match="raw_gt"):
        method.predict(b, EnhanceOptions(steps=2))


def test_a_model_trained_with_extra_channels_loads_from_its_checkpoint(tmp_path):
    cfg = Config(method=MethodConfig(name="exposure_diffusion", backbone="nafnet-1",
                                     options={"noise": "eld"}))
    torch.manual_seed(0)
    method = build_method(cfg.method, channels=4)
    opt = torch.optim.Adam(method.parameters(), lr=1e-2)
    for step in range(2):
        loss, _ = method.loss(batch(), torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save(tmp_path, cfg, method, channels=4, metrics={})
    _, loaded = load_method(tmp_path)
    assert loaded.backbone.intro.in_channels == 12 and loaded.concat_origin and loaded.options.with_photon
    b = batch()
    torch.testing.assert_close(loaded.predict(b, EnhanceOptions(steps=3)),
                               method.eval().predict(b, EnhanceOptions(steps=3)))
    torch.testing.assert_close(loaded.step_weights, method.step_weights)


# ---------------------------------------------------------------- regression baseline

def regression(residual=True, domain="raw", **options):
    cfg = MethodConfig(name="regression", backbone="nafnet-1", domain=domain,
                       options={"residual": residual, **options})
    torch.manual_seed(0)
    return build_method(cfg, channels=4 if domain == "raw" else 3)


def test_regression_residual_makes_an_identity_initialised_network_return_its_input():
    b = batch()
    amplified = (b["raw_in"] * 100).clamp(0, 1)
    for residual, expected in ((True, amplified), (False, torch.zeros_like(amplified))):
        method = regression(residual).eval()
        torch.nn.init.zeros_(method.backbone.ending.weight)  # the body's NAF blocks start as the identity
        torch.nn.init.zeros_(method.backbone.ending.bias)
        torch.testing.assert_close(method.predict(b, EnhanceOptions()), expected)


def test_regression_trains_on_the_same_synthetic_inputs():
    method = regression(noise="pg")
    loss, logs = method.loss(batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert logs["loss"] > 0 and all(p.grad is not None for p in method.parameters())
    with pytest.raises(ConfigError, match="method.options.noise"):
        regression(domain="srgb", noise="pg")
