"""Sampling: diffusers parity (timesteps, DDIM and DDPM steps on the tiny UNet), prediction types,
guidance, partial diffusion, callbacks, initial-noise fitting and search, tiling."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from lowlight.models.sd import TINY_CROSS_ATTENTION_DIM, sd_scheduler, tiny_dir
from lowlight.sampling import (
    NoiseSchedule,
    SamplerOptions,
    StepState,
    candidate_seeds,
    default_noise,
    fit_noise,
    sample,
    search_initial_noise,
    tile_regions,
    tiled_denoiser,
)

SD_LIKE = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}
TRAILING = {"timestep_spacing": "trailing", "steps_offset": 0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    """(tiny UNet as a Denoiser, the bundle's scheduler config)."""
    unet = UNet2DConditionModel.from_pretrained(tiny_dir(), subfolder="unet").eval()
    config = DDPMScheduler.from_pretrained(tiny_dir(), subfolder="scheduler").config

    @torch.no_grad()
    def denoiser(x_t, t, conditional):
        context = torch.zeros(x_t.shape[0], 77, TINY_CROSS_ATTENTION_DIM)
        return unet(x_t, t, encoder_hidden_states=context).sample

    return denoiser, config


def schedule_of(prediction_type="epsilon", **config) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler(DDIMScheduler.from_config(
        sd_scheduler().config, prediction_type=prediction_type, **{**SD_LIKE, **config}))


def record_steps(states: list[StepState]):
    def callback(state: StepState):
        states.append(state)
    return callback


def exact_denoiser(schedule: NoiseSchedule, x0: torch.Tensor):
    """A perfect model for a single known x0: returns the ε (or v) that x_t implies."""
    def denoiser(x_t, t, conditional):
        alpha = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (x_t - alpha.sqrt() * x0) / (1 - alpha).sqrt()
        return schedule.target(x0, eps, t)
    return denoiser


def toy_denoiser(calls: list[bool] | None = None):
    """Deterministic, condition-dependent, depends on x_t and t."""
    def denoiser(x_t, t, conditional):
        if calls is not None:
            calls.append(conditional)
        shift = 0.3 if conditional else -0.2
        return 0.5 * x_t + shift + t.view(-1, 1, 1, 1) / 2000
    return denoiser


# --- schedule -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [SD_LIKE, TRAILING, {"timestep_spacing": "linspace"},
                                    {"timestep_spacing": "leading", "steps_offset": 0}])
def test_timesteps_equal_diffusers_ddim(config):
    scheduler = DDIMScheduler.from_config(sd_scheduler().config, **config)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    for steps in (1, 3, 7, 10, 20, 50, 333, 999, 1000):
        scheduler.set_timesteps(steps)
        expected = scheduler.timesteps
        if expected.max() >= len(scheduler.alphas_cumprod):
            continue  # diffusers leaves [0, T - 1] here (SD's offset at T steps): its step would fail
        got = schedule.timesteps(steps)
        assert got.dtype == torch.int64
        assert torch.equal(got, expected), (config, steps)


def test_as_many_steps_as_training_timesteps_with_sd_offset():
    schedule = schedule_of()  # leading spacing, steps_offset 1, as SD 1.x/2.x ship
    assert torch.equal(schedule.timesteps(1000), torch.arange(999, -1, -1))
    assert torch.equal(schedule.timesteps(500), torch.arange(999, 0, -2))  # offset kept where it fits
    x0 = torch.full((1, 4, 2, 2), 0.7)
    out = sample(exact_denoiser(schedule, x0), schedule, SamplerOptions(steps=1000), torch.randn(1, 4, 2, 2))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-3)


def test_from_scheduler_reads_config():
    ddim = NoiseSchedule.from_scheduler(DDIMScheduler.from_config(sd_scheduler().config, **SD_LIKE))
    assert (ddim.timestep_spacing, ddim.steps_offset, ddim.prediction_type) == ("leading", 1, "epsilon")
    assert ddim.final_alpha_cumprod == pytest.approx(float(sd_scheduler().alphas_cumprod[0]))
    assert ddim.alphas_cumprod.dtype == torch.float64 and ddim.num_train_timesteps == 1000
    # DDPMScheduler has no set_alpha_to_one: treated as False.
    assert NoiseSchedule.from_scheduler(sd_scheduler()).final_alpha_cumprod < 1
    one = NoiseSchedule.from_scheduler(DDIMScheduler.from_config(sd_scheduler().config, set_alpha_to_one=True))
    assert one.final_alpha_cumprod == 1.0


def test_bad_schedules_are_errors():
    alphas = sd_scheduler().alphas_cumprod
    with pytest.raises(ValueError, match="sample"):
        NoiseSchedule(alphas, prediction_type="sample")
    with pytest.raises(ValueError, match="timestep_spacing"):
        NoiseSchedule(alphas, prediction_type="epsilon", timestep_spacing="karras")
    zero_snr = DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="v_prediction"):  # x̂0 = (x_t - ε̂)/0 at the last timestep
        NoiseSchedule.from_scheduler(zero_snr)
    schedule = NoiseSchedule(alphas, prediction_type="epsilon")
    with pytest.raises(ValueError, match="steps"):
        schedule.timesteps(1001)
    with pytest.raises(ValueError, match="keeps no step"):
        schedule.timesteps(10, strength=0.05)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_eps_inverts_add_noise_and_target(prediction_type):
    schedule = schedule_of(prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 5, 5, generator=generator), torch.randn(4, 4, 5, 5, generator=generator)
    t = torch.tensor([0, 1, 500, 999])
    x_t = schedule.add_noise(x0, eps, t)
    x0_hat, eps_hat = schedule.x0_eps(x_t, t, schedule.target(x0, eps, t))
    torch.testing.assert_close(x0_hat, x0, atol=2e-5, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=2e-5, rtol=0)
    # Same formulas as diffusers.
    reference = DDPMScheduler.from_config(sd_scheduler().config, prediction_type=prediction_type)
    torch.testing.assert_close(x_t, reference.add_noise(x0, eps, t))
    if prediction_type == "v_prediction":
        torch.testing.assert_close(schedule.target(x0, eps, t), reference.get_velocity(x0, eps, t))


def test_zero_terminal_snr_v_prediction_recovers_x0_at_the_last_timestep():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                              prediction_type="v_prediction")
    schedule = NoiseSchedule.from_scheduler(scheduler)
    last = schedule.num_train_timesteps - 1
    assert schedule.alphas_cumprod[last] == 0  # pure noise: x_t carries nothing of x0 ...
    assert schedule.timesteps(10)[0] == last
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 4, 4, generator=generator), torch.randn(3, 4, 4, 4, generator=generator)
    t = torch.tensor([last, last, 500])
    x_t = schedule.add_noise(x0, eps, t)
    x0_hat, eps_hat = schedule.x0_eps(x_t, t, schedule.target(x0, eps, t))
    # ... so x̂0 comes from v alone (v = -x0 there), and ε̂ = x_t. With ε-prediction x̂0 would be
    # (x_t - ε̂)/0, ill-posed: such schedules are refused (test_bad_schedules_are_errors).
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=0)


# --- parity with diffusers on the tiny UNet ----------------------------------------------------------

@pytest.mark.parametrize("config", [{**SD_LIKE, "prediction_type": "epsilon"},
                                    {**TRAILING, "prediction_type": "v_prediction"}], ids=["sd", "trailing-v"])
def test_ddim_matches_diffusers_step_by_step(tiny, config):
    denoiser, base_config = tiny
    steps = 10
    noise = default_noise((2, 4, 8, 8), seed=3)
    scheduler = DDIMScheduler.from_config(base_config, **config)
    scheduler.set_timesteps(steps)
    expected_x_t = []
    x_t = noise
    for t in scheduler.timesteps:
        expected_x_t.append(x_t)
        step = scheduler.step(denoiser(x_t, t.expand(2), True), t, x_t, eta=0.0)
        x_t = step.prev_sample

    schedule = NoiseSchedule.from_scheduler(scheduler)
    opts = SamplerOptions(sampler="ddim", steps=steps, eta=0.0)
    states: list[StepState] = []
    x0 = sample(denoiser, schedule, opts, noise, callback=record_steps(states))
    assert [int(s.t[0]) for s in states] == scheduler.timesteps.tolist()
    assert all(s.index == i and s.t.shape == (2,) for i, s in enumerate(states))
    for state, expected in zip(states, expected_x_t, strict=True):
        torch.testing.assert_close(state.x_t, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0, step.pred_original_sample, atol=1e-5, rtol=1e-5)
    assert torch.equal(sample(denoiser, schedule, opts, noise), x0)  # deterministic


def test_ddpm_matches_diffusers_step_by_step(tiny):
    denoiser, base_config = tiny
    steps = 8
    noise = default_noise((1, 4, 8, 8), seed=4)
    scheduler = DDPMScheduler.from_config(base_config, **{**SD_LIKE, "variance_type": "fixed_small"})
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(11)
    expected_x_t = []
    x_t = noise
    for t in scheduler.timesteps:
        expected_x_t.append(x_t)
        step = scheduler.step(denoiser(x_t, t.expand(1), True), t, x_t, generator=generator)
        x_t = step.prev_sample

    states: list[StepState] = []
    x0 = sample(denoiser, NoiseSchedule.from_scheduler(scheduler), SamplerOptions(sampler="ddpm", steps=steps),
                noise, generator=torch.Generator().manual_seed(11), callback=record_steps(states))
    for state, expected in zip(states, expected_x_t, strict=True):
        torch.testing.assert_close(state.x_t, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0, step.pred_original_sample, atol=1e-5, rtol=1e-5)


# --- sampler behaviour on toy denoisers --------------------------------------------------------------

def test_guidance_scale_one_is_conditional_only():
    schedule, noise = schedule_of(), default_noise((2, 4, 6, 6), seed=0)
    calls: list[bool] = []
    guided = sample(toy_denoiser(calls), schedule, SamplerOptions(steps=5, guidance_scale=1.0), noise)
    assert calls == [True] * 5
    conditional = toy_denoiser()
    assert torch.equal(guided, sample(lambda x, t, c: conditional(x, t, True), schedule,
                                      SamplerOptions(steps=5), noise))


def test_guidance_follows_the_cfg_formula():
    schedule, noise = schedule_of(), default_noise((2, 4, 6, 6), seed=0)
    scale = 4.0
    calls: list[bool] = []
    guided = sample(toy_denoiser(calls), schedule, SamplerOptions(steps=5, guidance_scale=scale), noise)
    assert sorted(calls) == [False] * 5 + [True] * 5
    toy = toy_denoiser()

    def by_formula(x_t, t, conditional):
        unconditional = toy(x_t, t, False)
        return unconditional + scale * (toy(x_t, t, True) - unconditional)

    torch.testing.assert_close(guided, sample(by_formula, schedule, SamplerOptions(steps=5), noise))
    assert not torch.allclose(guided, sample(toy, schedule, SamplerOptions(steps=5), noise))


def test_partial_diffusion_starts_at_the_kept_timestep():
    schedule = schedule_of()
    init, noise = default_noise((1, 4, 6, 6), seed=1), default_noise((1, 4, 6, 6), seed=2)
    full = schedule.timesteps(10)  # 901, 801, ..., 1 (SD leading spacing, offset 1)
    for strength, kept in ((0.5, 5), (0.35, 3), (1.0, 10)):  # diffusers' img2img rule: int(steps * strength)
        states: list[StepState] = []
        sample(toy_denoiser(), schedule, SamplerOptions(steps=10, strength=strength), noise, init=init,
               callback=record_steps(states))
        assert [int(s.t[0]) for s in states] == full[10 - kept:].tolist()
        if strength < 1:
            torch.testing.assert_close(states[0].x_t, schedule.add_noise(init, noise, states[0].t))
        else:
            assert torch.equal(states[0].x_t, noise)  # pure noise start: init unused
    with pytest.raises(ValueError, match="init"):
        sample(toy_denoiser(), schedule, SamplerOptions(steps=10, strength=0.5), noise)


def test_ddpm_is_deterministic_under_a_generator():
    schedule, noise = schedule_of(), default_noise((1, 4, 6, 6), seed=0)
    opts = SamplerOptions(sampler="ddpm", steps=6)

    def run(seed: int) -> torch.Tensor:
        return sample(toy_denoiser(), schedule, opts, noise, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))
    ddim = SamplerOptions(sampler="ddim", steps=6, eta=0.5)  # stochastic DDIM uses the generator too
    first, second = (sample(toy_denoiser(), schedule, ddim, noise, generator=torch.Generator().manual_seed(5))
                     for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_a_perfect_model_stays_on_the_forward_marginal(prediction_type):
    schedule = schedule_of(prediction_type)
    x0, noise = default_noise((1, 4, 6, 6), seed=7), default_noise((1, 4, 6, 6), seed=8)
    states: list[StepState] = []
    result = sample(exact_denoiser(schedule, x0), schedule, SamplerOptions(steps=10), noise,
                    callback=record_steps(states))
    torch.testing.assert_close(result, x0, atol=1e-4, rtol=0)
    # η = 0 keeps the implied ε of the first step: every x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε_first.
    _, eps_first = schedule.x0_eps(noise, states[0].t, exact_denoiser(schedule, x0)(noise, states[0].t, True))
    for state in states:
        torch.testing.assert_close(state.x_t, schedule.add_noise(x0, eps_first, state.t), atol=1e-4, rtol=0)


def test_ddpm_with_a_perfect_model_recovers_x0_with_posterior_variance():
    schedule = schedule_of()
    x0, noise = default_noise((1, 1, 64, 64), seed=7), default_noise((1, 1, 64, 64), seed=8)
    states: list[StepState] = []
    result = sample(exact_denoiser(schedule, x0), schedule, SamplerOptions(sampler="ddpm", steps=10), noise,
                    generator=torch.Generator().manual_seed(0), callback=record_steps(states))
    torch.testing.assert_close(result, x0, atol=1e-4, rtol=0)
    # Ancestral steps with the right variance keep x_t ~ q(x_t | x0): its implied ε stays N(0, 1).
    for state in states[1:]:
        alpha = float(schedule.alphas_cumprod[int(state.t[0])])
        implied = (state.x_t - math.sqrt(alpha) * x0) / math.sqrt(1 - alpha)
        assert abs(implied.std().item() - 1) < 0.05
        assert not torch.allclose(implied, noise, atol=0.1)  # fresh noise was drawn


def test_callback_replacement_changes_the_result_and_none_does_not():
    schedule, noise = schedule_of(), default_noise((1, 4, 6, 6), seed=0)
    opts = SamplerOptions(steps=6)
    plain = sample(toy_denoiser(), schedule, opts, noise)
    assert torch.equal(sample(toy_denoiser(), schedule, opts, noise, callback=lambda state: None), plain)

    def replace_first(state: StepState):
        return torch.zeros_like(state.x0) if state.index == 0 else None

    assert not torch.allclose(sample(toy_denoiser(), schedule, opts, noise, callback=replace_first), plain)
    # A replacement at the last step is what sample returns.
    last = sample(toy_denoiser(), schedule, opts, noise,
                  callback=lambda state: torch.full_like(state.x0, 7.0) if state.index == 5 else None)
    assert torch.equal(last, torch.full_like(plain, 7.0))


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="sampler"):
        SamplerOptions(sampler="euler")
    with pytest.raises(ValueError, match="strength"):
        SamplerOptions(strength=0)


# --- initial noise ----------------------------------------------------------------------------------

def test_default_noise_is_seeded_and_typed():
    assert torch.equal(default_noise((2, 3), 5), default_noise((2, 3), 5))
    assert not torch.equal(default_noise((2, 3), 5), default_noise((2, 3), 6))
    assert default_noise((2, 3), 5, dtype=torch.float64).dtype == torch.float64


def test_fit_noise_tiles_periodically_and_crops():
    noise = default_noise((4, 3, 5), seed=0)
    fitted = fit_noise(noise, (2, 4, 7, 12))
    assert fitted.shape == (2, 4, 7, 12)
    rows, cols = torch.arange(7) % 3, torch.arange(12) % 5
    for b in range(2):
        assert torch.equal(fitted[b], noise[:, rows][:, :, cols])
    assert torch.equal(fit_noise(noise, (4, 3, 5)), noise)
    assert torch.equal(fit_noise(noise[None], (1, 4, 3, 5)), noise[None])
    assert torch.equal(fit_noise(noise, (4, 2, 2)), noise[:, :2, :2])
    with pytest.raises(ValueError, match="channels"):
        fit_noise(noise, (1, 3, 3, 5))


def test_noise_search_keeps_the_best_candidate_from_seeded_draws():
    shape = (4, 4, 4)
    seen: list[torch.Tensor] = []

    def score(noise: torch.Tensor) -> float:
        seen.append(noise)
        return -noise.mean().abs().item()  # stand-in for "mean quality on the reference set"

    result = search_initial_noise(score, shape, candidates=6, seed=3, default_seed=9, progress=False)
    assert torch.equal(seen[0], default_noise(shape, 9))
    assert result.default_score == result.scores[0] == score(default_noise(shape, 9))
    assert len(result.scores) == 6 and result.scores[result.best] == max(result.scores)
    assert result.best != 0  # with this score a better candidate exists: the search did something
    assert torch.equal(result.noise, seen[result.best])
    assert torch.equal(result.noise, default_noise(shape, candidate_seeds(6, 3, 9)[result.best]))

    again = search_initial_noise(score, shape, candidates=6, seed=3, default_seed=9, progress=False)
    assert again.scores == result.scores and again.best == result.best
    other = search_initial_noise(score, shape, candidates=6, seed=4, default_seed=9, progress=False)
    assert other.scores[0] == result.scores[0] and other.scores[1:] != result.scores[1:]


# --- tiling ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [(20, 27, 8, 3), (8, 8, 8, 4), (5, 30, 8, 2), (16, 16, 8, 0)])
def test_tile_regions_cover_the_latent_within_bounds(h, w, tile, overlap):
    regions = tile_regions(h, w, tile, overlap)
    covered = torch.zeros(h, w, dtype=torch.int64)
    for top, left, height, width in regions:
        assert (height, width) == (min(tile, h), min(tile, w))
        assert top + height <= h and left + width <= w
        covered[top:top + height, left:left + width] += 1
    assert covered.min() >= 1
    assert max(top + height for top, _, height, _ in regions) == h  # last tiles flush with the edges
    assert max(left + width for _, left, _, width in regions) == w


def test_tile_arguments_are_validated():
    with pytest.raises(ValueError, match="overlap"):
        tile_regions(16, 16, 8, 8)
    with pytest.raises(ValueError, match="overlap"):
        tile_regions(16, 16, 8, -1)
    with pytest.raises(ValueError, match="tile"):
        tile_regions(16, 16, 0, 0)
    with pytest.raises(ValueError, match="built for"):
        tiled_denoiser(lambda region: toy_denoiser(), (16, 16), 8, 2)(torch.zeros(1, 4, 16, 17), torch.zeros(1), True)


def test_one_tile_is_the_untiled_call():
    calls: list[tuple] = []
    x_t, t = default_noise((1, 4, 8, 6), seed=0), torch.tensor([10])
    output = torch.randn(1, 4, 8, 6)

    def denoiser_for(region):
        calls.append(region)
        return lambda x, t, c: output

    assert tiled_denoiser(denoiser_for, (8, 6), tile=8, overlap=2)(x_t, t, True) is output
    assert calls == [(0, 0, 8, 6)]


def test_tiled_equals_untiled_for_a_translation_equivariant_denoiser():
    conv = torch.nn.Conv2d(4, 4, kernel_size=1)  # pointwise: each output pixel sees only its input pixel
    torch.nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def pointwise(x_t, t, conditional):
        return conv(x_t) * (1 + t.view(-1, 1, 1, 1) / 1000) + (0.1 if conditional else 0.0)

    x_t, t = default_noise((2, 4, 20, 27), seed=1), torch.tensor([100, 200])
    seen: list[tuple] = []

    def denoiser_for(region):
        top, left, height, width = region

        def denoiser(tile, t, conditional):
            assert torch.equal(tile, x_t[..., top:top + height, left:left + width])  # the tile is its region
            seen.append(region)
            return pointwise(tile, t, conditional)
        return denoiser

    tiled = tiled_denoiser(denoiser_for, (20, 27), tile=8, overlap=3)
    torch.testing.assert_close(tiled(x_t, t, True), pointwise(x_t, t, True), atol=1e-5, rtol=0)
    assert seen == tile_regions(20, 27, 8, 3) and len(seen) > 1


def test_tiles_blend_between_their_outputs():
    regions = tile_regions(6, 13, 8, 3)  # two tiles side by side: columns 0-7 and 5-12
    assert regions == [(0, 0, 6, 8), (0, 5, 6, 8)]
    constant = {regions[0]: 0.0, regions[1]: 1.0}
    tiled = tiled_denoiser(lambda region: lambda x, t, c: torch.full_like(x, constant[region]), (6, 13), 8, 3)
    out = tiled(torch.zeros(1, 1, 6, 13), torch.zeros(1), True)[0, 0]
    assert torch.all(out[:, :5] == 0) and torch.all(out[:, 8:] == 1)  # covered by one tile only
    overlap = out[0, 5:8]
    assert torch.all((overlap > 0) & (overlap < 1)) and torch.all(overlap.diff() > 0)  # a cross-fade
