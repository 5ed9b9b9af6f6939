"""Noise models: each component's moments against its formula, parameter sampling, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lowlight.data.noise import (
    NoiseCalibration,
    NoiseParams,
    add_noise,
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


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(k, sigma_gaussian=0.0, sigma_tukey=0.0, tukey_lambda=0.0, sigma_row=0.0) -> NoiseParams:
    def vec(v):
        return torch.as_tensor(v, dtype=torch.float32).expand(len(k)).clone()

    return NoiseParams(vec(k), vec(sigma_gaussian), vec(sigma_tukey), vec(tukey_lambda), vec(sigma_row))


def _per_image_var(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).var(dim=1)


def test_calibration_is_the_eld_sony_a7s2():
    assert (CALIB.k_min, CALIB.k_max) == (0.09391607, 6.01062854)
    assert (CALIB.gaussian.slope, CALIB.tukey.bias, CALIB.row.sigma) == (0.54075, 0.56571, 0.29429)
    assert CALIB.tukey_lambda == (-0.143, 0.114)
    assert CALIB.k_for_iso(6400) == pytest.approx(CALIB.k_max, rel=1e-3)


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


def test_parameters_follow_the_calibrated_log_linear_laws():
    params = sample_noise_params(CALIB, 20000, _gen())
    log_k = params.k.log().double().numpy()
    lo, hi = math.log(CALIB.k_min), math.log(CALIB.k_max)
    assert lo <= log_k.min() < lo + 0.01 and hi - 0.01 < log_k.max() <= hi
    assert np.histogram(log_k, bins=4, range=(lo, hi))[0].min() > 4500  # uniform in log K
    for law, sigma in [(CALIB.gaussian, params.sigma_gaussian), (CALIB.tukey, params.sigma_tukey),
                       (CALIB.row, params.sigma_row)]:
        fit = stats.linregress(log_k, sigma.log().double().numpy())
        assert fit.slope == pytest.approx(law.slope, abs=0.02)
        assert fit.intercept == pytest.approx(law.bias, abs=0.02)
        residual = sigma.log().double().numpy() - (fit.slope * log_k + fit.intercept)
        assert residual.std() == pytest.approx(law.sigma, rel=0.03)
    lam = params.tukey_lambda
    assert CALIB.tukey_lambda[0] <= lam.min() and lam.max() <= CALIB.tukey_lambda[1]


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
