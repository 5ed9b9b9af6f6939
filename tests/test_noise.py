"""Noise models: the calibration against the released ELD/LED/PMN numbers, each component's moments
against its formula, parameter sampling, the ISO -> K rule, seeding."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from lowlight.data import noise
from lowlight.data.noise import (
    NoiseCalibration,
    NoiseParams,
    add_noise,
    color_bias_for_gain,
    gain_for_iso,
    norm_from_photons,
    photons_from_norm,
    quantization_noise,
    row_noise,
    sample_noise_params,
    shot_noise,
    synthesize_low_light,
    tukey_lambda_quantile,
    tukey_lambda_variance,
    tukey_noise,
)

CALIB = NoiseCalibration.load()
SHAPE = (3, 4, 128, 128)  # 65k samples per image: sample variances within ~1% (1 s.e.)

# Independent references, copied from the releases (not from this project's YAML):
# github.com/Vandermode/ELD camera_params/release/SonyA7S2_params.npy (read with a restricted unpickler):
# Kmin, Kmax, Profile-1 {g_scale, G_scale, R_scale} = {Gaussian, Tukey, row} laws, G_shape, color_bias.
# github.com/Srameo/LED options/base/noise_g/noise_g_SonyA7S2.yaml ships the same numbers (its lambda
# list drops ELD's two zeros).
ELD_KMIN, ELD_KMAX = 0.09391607086816033, 6.010628535562261
ELD_GAUSSIAN = (0.5407496082896145, 1.218237123334061, 0.26751211630129734)  # slope, bias, sigma
ELD_TUKEY = (0.46210495986526035, 0.5657147358616816, 0.2633712220097871)
ELD_ROW = (0.5275360468633209, -0.5917002648887661, 0.29428813016491145)
ELD_G_SHAPE = (
    0.11428571428571421, 0.12857142857142856, 0.05714285714285716, 0.042857142857142816, 0.0, 0.0,
    -0.04285714285714287, -0.05714285714285716, -0.08571428571428574, -0.08571428571428574,
    -0.08571428571428574, -0.08571428571428574, -0.11428571428571432, -0.11428571428571432,
    -0.14285714285714285, -0.12857142857142856, -0.14285714285714285, -0.14285714285714285,
)
ELD_COLOR_BIAS = (
    (1.4821642637252808, 1.468152403831482, 1.4833444356918335, 1.4700759649276733),
    (1.4975190162658691, 1.4802225828170776, 1.4969686269760132, 1.4816200733184814),
    (-1.0175819396972656, -1.0376642942428589, -1.021530032157898, -1.0378408432006836),
    (-1.0171579122543335, -1.039219617843628, -1.0185296535491943, -1.0371415615081787),
    (-0.2604089677333832, -0.2951682209968567, -0.26699188351631165, -0.29447489976882935),
    (-0.25755608081817627, -0.28967761993408203, -0.261883407831192, -0.2919001877307892),
    (0.6112956404685974, 0.5769089460372925, 0.6100785732269287, 0.5755235552787781),
    (0.6052578687667847, 0.5677651762962341, 0.6009282469749451, 0.5605872869491577),
    (2.0718860626220703, 2.0092039108276367, 2.3060765266418457, 2.2433784008026123),
    (2.0913448333740234, 2.02018141746521, 2.328244209289551, 2.259930372238159),
    (-1.3465632200241089, -1.3705782890319824, -1.3488726615905762, -1.365721344947815),
    (-1.3218611478805542, -1.3641046285629272, -1.3314049243927002, -1.3595291376113892),
    (-1.5595009326934814, -1.5976678133010864, -1.3204408884048462, -1.3571521043777466),
    (-1.5529998540878296, -1.6019489765167236, -1.3224984407424927, -1.358526587486267),
    (1.1709545850753784, 1.0815441608428955, 1.1473132371902466, 1.0724842548370361),
    (1.1831634044647217, 1.0717991590499878, 1.1786149740219116, 1.0671342611312866),
    (4.0731520652771, 3.857113838195801, 4.295815467834473, 4.096042633056641),
    (4.054170608520508, 3.8497254848480225, 4.292275905609131, 4.0853047370910645),
)
# github.com/megvii-research/PMN data_process/process.py, get_camera_noisy_params_max: its own per-ISO
# calibration of the same camera ('SonyA7S2_<ISO>': Kmax), up to SID's ISO 25600.
PMN_K_AT_ISO = {100: 0.09563, 400: 0.38252, 1600: 1.53008, 6400: 6.12032, 12800: 12.24064, 25600: 24.48128}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(k, sigma_gaussian=0.0, sigma_tukey=0.0, tukey_lambda=0.0, sigma_row=0.0, color_bias=None) -> NoiseParams:
    def vec(v):
        return torch.as_tensor(v, dtype=torch.float32).expand(len(k)).clone()

    bias = torch.zeros(len(k), 4) if color_bias is None else torch.as_tensor(color_bias, dtype=torch.float32)
    return NoiseParams(vec(k), vec(sigma_gaussian), vec(sigma_tukey), vec(tukey_lambda), vec(sigma_row), bias)


def _per_image_var(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).var(dim=1)


def test_calibration_is_elds_released_sony_a7s2():
    assert (CALIB.k_min, CALIB.k_max) == (ELD_KMIN, ELD_KMAX)
    for law, released in [(CALIB.gaussian, ELD_GAUSSIAN), (CALIB.tukey, ELD_TUKEY), (CALIB.row, ELD_ROW)]:
        assert (law.slope, law.bias, law.sigma) == released
    assert CALIB.tukey_lambda == ELD_G_SHAPE
    assert CALIB.color_bias == ELD_COLOR_BIAS


def test_gain_is_proportional_to_iso_beyond_the_calibrated_range():
    # The rule: K = Kmin * ISO / 100, the same line past ELD's ISO 6400 (ELD's Kmax / Kmin is 64).
    assert gain_for_iso(CALIB, 100) == pytest.approx(ELD_KMIN, rel=1e-12)
    assert gain_for_iso(CALIB, 6400) == pytest.approx(ELD_KMAX, rel=1e-12)
    assert gain_for_iso(CALIB, 25600) == pytest.approx(256 * ELD_KMIN, rel=1e-12)
    assert CALIB.k_for_iso(25600) == gain_for_iso(CALIB, 25600)
    # PMN calibrated the same camera at every ISO independently: within 2% up to SID's ISO 25600.
    for iso, k in PMN_K_AT_ISO.items():
        assert gain_for_iso(CALIB, iso) == pytest.approx(k, rel=0.02), iso
    per_image = gain_for_iso(CALIB, torch.tensor([100.0, 25600.0]))
    torch.testing.assert_close(per_image, torch.tensor([ELD_KMIN, 256 * ELD_KMIN]))
    for bad in (0, -100, math.nan, torch.tensor([800.0, 0.0])):
        with pytest.raises(ValueError, match="ISO must be positive"):
            gain_for_iso(CALIB, bad)


def test_a_bad_calibration_names_its_file_and_key(monkeypatch):
    shipped = noise.load_calibration("sony_a7s2")["noise"]
    doc = {"camera": "X", "noise": {"k_min": 0.1, "k_max": 6.4}}
    monkeypatch.setattr(noise, "load_calibration", lambda name: doc)
    with pytest.raises(ValueError, match=r"calibrations/x\.yaml.*iso_at_k_min"):
        NoiseCalibration.load("x")
    doc["noise"] = {**shipped, "iso_at_k_max": 3200}  # the K range is no longer proportional to ISO
    with pytest.raises(ValueError, match="proportional to ISO"):
        NoiseCalibration.load("x")


def test_tukey_lambda_is_drawn_uniformly_from_the_released_values():
    draws = sample_noise_params(CALIB, 36000, _gen()).tukey_lambda.double().numpy()
    released = Counter(ELD_G_SHAPE)
    counts = Counter(float(np.float32(v)) for v in draws)
    assert set(counts) == {float(np.float32(v)) for v in released}  # nothing outside the calibrated values
    expected = [len(draws) * released[v] / len(ELD_G_SHAPE) for v in released]
    observed = [counts[float(np.float32(v))] for v in released]
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert draws.mean() == pytest.approx(np.mean(ELD_G_SHAPE), abs=0.002)


def test_colour_bias_is_the_released_row_of_leds_k_bin():
    # LED's sample_color_bias: index = (K - Kmin) // ((Kmax - Kmin) / rows), row 0 at Kmin.
    width = (ELD_KMAX - ELD_KMIN) / len(ELD_COLOR_BIAS)
    centres = torch.tensor([ELD_KMIN + (i + 0.5) * width for i in range(len(ELD_COLOR_BIAS))])
    torch.testing.assert_close(color_bias_for_gain(CALIB, centres), torch.tensor(ELD_COLOR_BIAS))
    # Outside the calibrated range (SID's ISO 25600, or below Kmin): the nearest end row.
    outside = color_bias_for_gain(CALIB, torch.tensor([gain_for_iso(CALIB, 25600), ELD_KMIN / 2]))
    torch.testing.assert_close(outside, torch.tensor([ELD_COLOR_BIAS[-1], ELD_COLOR_BIAS[0]]))
    fixed = sample_noise_params(CALIB, 2, _gen(), k=float(centres[8]))
    torch.testing.assert_close(fixed.color_bias, torch.tensor([ELD_COLOR_BIAS[8]] * 2))


def test_eld_adds_the_colour_bias_per_channel():
    bias = torch.tensor([ELD_COLOR_BIAS[0], ELD_COLOR_BIAS[-1]])
    params = _params(k=[0.5, 0.5], color_bias=bias)
    noisy = add_noise(torch.full((2, 4, 256, 256), 20.0), params, "eld", _gen())
    # Shot, Tukey (symmetric), row and quantisation noise are zero-mean: the channel means move by the bias.
    torch.testing.assert_close(noisy.mean(dim=(2, 3)), 20.0 + bias, rtol=0, atol=0.05)
    pg = add_noise(torch.full((2, 4, 256, 256), 20.0), params, "pg", _gen())
    torch.testing.assert_close(pg.mean(dim=(2, 3)), torch.full((2, 4), 20.0), rtol=0, atol=0.05)


def test_synthesis_with_an_iso_uses_gain_for_iso():
    # A bright, shot-noise-dominated signal: the variance over the signal measures K.
    clean = torch.full((2, 4, 128, 128), 0.6)
    iso = torch.tensor([800.0, 25600.0])
    noisy = synthesize_low_light(clean, 1.0, CALIB, 15871.0, "pg", _gen(), iso=iso) * 15871.0
    measured_k = _per_image_var(noisy) / (0.6 * 15871.0)
    torch.testing.assert_close(measured_k, gain_for_iso(CALIB, iso), rtol=0.03, atol=0)


def test_shot_noise_is_scaled_poisson():
    k = torch.tensor([0.1, 1.0, 5.0])
    clean = torch.full(SHAPE, 50.0)
    noisy = shot_noise(clean, k, _gen())
    torch.testing.assert_close(noisy.flatten(1).mean(1), torch.full((3,), 50.0), rtol=0.01, atol=0)
    torch.testing.assert_close(_per_image_var(noisy), k * 50, rtol=0.04, atol=0)
    # Counts are whole electrons, i.e. multiples of K.
    electrons = noisy[1] / k[1]
    assert torch.equal(electrons, electrons.round())


def test_poisson_gaussian_variance_is_kx_plus_sigma_squared():
    params = _params(k=[0.5, 2.0, 4.0], sigma_gaussian=[1.0, 3.0, 6.0])
    noisy = add_noise(torch.full(SHAPE, 20.0), params, "pg", _gen())
    torch.testing.assert_close(_per_image_var(noisy), params.k * 20 + params.sigma_gaussian**2, rtol=0.04, atol=0)


@pytest.mark.parametrize("lam", [-0.143, -0.05, 0.0, 0.114])
def test_tukey_lambda_matches_its_closed_form_and_scipy(lam):
    assert tukey_lambda_variance(lam) == pytest.approx(stats.tukeylambda.var(lam), rel=1e-6)
    u = torch.tensor([0.001, 0.1, 0.5, 0.9, 0.999])
    q = tukey_lambda_quantile(u, torch.tensor(lam))
    np.testing.assert_allclose(q.numpy(), stats.tukeylambda.ppf(u.numpy(), lam), rtol=1e-4, atol=1e-5)

    sigma = torch.tensor([2.0, 2.0, 2.0])
    noise = tukey_noise(torch.zeros(SHAPE), sigma, torch.full((3,), lam), _gen())
    torch.testing.assert_close(_per_image_var(noise), sigma**2 * tukey_lambda_variance(lam), rtol=0.05, atol=0)
    assert noise.mean().abs() < 0.02


def test_row_noise_is_one_gaussian_per_sensor_row():
    sigma = torch.tensor([0.5, 2.0])
    noise = row_noise(torch.zeros(2, 4, 2048, 8), sigma, _gen())
    assert torch.equal(noise, noise[..., :1].expand_as(noise))  # constant along each row
    assert torch.equal(noise[:, 0], noise[:, 1])  # R and G1 share a sensor row
    assert torch.equal(noise[:, 2], noise[:, 3])  # so do B and G2
    assert not torch.equal(noise[:, 0], noise[:, 2])
    rows = noise[:, [0, 2], :, 0].flatten(1)  # 4096 independent rows per image
    torch.testing.assert_close(rows.var(dim=1), sigma**2, rtol=0.08, atol=0)


def test_quantisation_noise_is_uniform_half_adu():
    noise = quantization_noise(torch.zeros(SHAPE), _gen())
    assert noise.min() >= -0.5 and noise.max() < 0.5
    assert noise.var().item() == pytest.approx(1 / 12, rel=0.02)


def test_eld_variance_is_the_sum_of_its_components():
    lam = torch.tensor([-0.1, 0.0, 0.1])
    params = _params(k=[0.2, 1.0, 3.0], sigma_tukey=[1.0, 2.0, 3.0], tukey_lambda=lam, sigma_row=[0.3, 0.5, 1.0])
    noisy = add_noise(torch.full((3, 4, 256, 256), 10.0), params, "eld", _gen())
    tukey_var = torch.tensor([tukey_lambda_variance(float(v)) for v in lam])
    expected = params.k * 10 + params.sigma_tukey**2 * tukey_var + params.sigma_row**2 + 1 / 12
    torch.testing.assert_close(_per_image_var(noisy), expected, rtol=0.05, atol=0)


def test_parameters_follow_the_released_log_linear_laws():
    params = sample_noise_params(CALIB, 20000, _gen())
    log_k = params.k.log().double().numpy()
    lo, hi = math.log(ELD_KMIN), math.log(ELD_KMAX)
    assert lo <= log_k.min() < lo + 0.01 and hi - 0.01 < log_k.max() <= hi
    assert np.histogram(log_k, bins=4, range=(lo, hi))[0].min() > 4500  # uniform in log K
    for (slope, bias, sigma), drawn in [(ELD_GAUSSIAN, params.sigma_gaussian), (ELD_TUKEY, params.sigma_tukey),
                                        (ELD_ROW, params.sigma_row)]:
        fit = stats.linregress(log_k, drawn.log().double().numpy())
        assert fit.slope == pytest.approx(slope, abs=0.02)
        assert fit.intercept == pytest.approx(bias, abs=0.02)
        residual = drawn.log().double().numpy() - (fit.slope * log_k + fit.intercept)
        assert residual.std() == pytest.approx(sigma, rel=0.03)


def test_fixed_gain_and_seeding():
    fixed = sample_noise_params(CALIB, 4, _gen(), k=1.5)
    torch.testing.assert_close(fixed.k, torch.full((4,), 1.5))
    clean = torch.full((2, 4, 32, 32), 30.0)
    a = add_noise(clean, sample_noise_params(CALIB, 2, _gen(7)), "eld", _gen(7))
    b = add_noise(clean, sample_noise_params(CALIB, 2, _gen(7)), "eld", _gen(7))
    c = add_noise(clean, sample_noise_params(CALIB, 2, _gen(8)), "eld", _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_synthesize_low_light_divides_by_ratio_without_reamplifying():
    clean = torch.full((2, 4, 128, 128), 0.6)
    ratio = torch.tensor([100.0, 300.0])
    noisy = synthesize_low_light(clean, ratio, CALIB, 15871.0, "pg", _gen())
    torch.testing.assert_close(noisy.flatten(1).mean(1), 0.6 / ratio, rtol=0.05, atol=0)
    assert noisy.min() < 0  # read noise around black is kept, as in real raw files


def test_photon_helpers_are_inverse_and_scale_with_gain_and_ratio():
    x = torch.rand(2, 4, 8, 8)
    k = torch.tensor([0.5, 2.0])
    photons = photons_from_norm(x, k, 15871.0, ratio=100.0)
    torch.testing.assert_close(photons[1], x[1] * 15871.0 / (2.0 * 100.0))
    torch.testing.assert_close(norm_from_photons(photons, k, 15871.0, ratio=100.0), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_with_a_cuda_generator():
    generator = torch.Generator(device="cuda").manual_seed(0)
    params = sample_noise_params(CALIB, 3, generator)
    clean = torch.full(SHAPE, 20.0, device="cuda")
    noisy = add_noise(clean, params, "eld", generator)
    assert noisy.device.type == "cuda"
    tukey_var = torch.tensor([tukey_lambda_variance(float(v)) for v in params.tukey_lambda], device="cuda")
    expected = params.k * 20 + params.sigma_tukey**2 * tukey_var + params.sigma_row**2 + 1 / 12
    torch.testing.assert_close(_per_image_var(noisy), expected, rtol=0.1, atol=0)
