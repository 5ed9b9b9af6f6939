"""Physics-based sensor noise on packed Bayer raw (torch, batched, CPU or CUDA).

Two models, both in ADU above black for a batch ``(B, 4, h, w)`` in R, G1, B, G2 order:

* ``"pg"``  Poisson-Gaussian: shot noise ``K * Poisson(x / K)`` plus Gaussian read noise.
* ``"eld"`` ELD (Wei et al., CVPR 2020): shot noise, Tukey-lambda read noise, row noise
  (one Gaussian per sensor row and image), uniform quantisation noise of +-0.5 ADU and the
  per-channel colour bias (dark-frame mean) that ELD and LED ship with their calibrations.

K is the system gain in ADU per electron. With a known ISO it is ``gain_for_iso`` (K
proportional to ISO, also beyond the calibrated range); otherwise ``log K ~ U(log K_min,
log K_max)``. Every noise scale follows the calibrated log-linear law ``log sigma = slope *
log K + bias + N(0, sigma_fit^2)``; the Tukey shape is one of the calibrated values, drawn
uniformly; the colour bias is the calibrated row of K's bin.
All randomness comes from an explicit ``torch.Generator``, which must live on the
data's device (``torch.Generator(device="cuda")`` for CUDA tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from lowlight.data.calibrations import load_calibration

NoiseModel = Literal["pg", "eld"]

# Packed channels R, G1, B, G2: R and G1 come from one sensor row, B and G2 from the next.
_ROW_OF_CHANNEL = (0, 0, 1, 1)
# Keeps Tukey-lambda quantiles finite: float32 uniforms strictly inside (0, 1).
_U_EPS = 2.0**-24
_LAMBDA_EPS = 1e-4


@dataclass(frozen=True)
class LogLinear:
    """``log sigma = slope * log K + bias``, residual standard deviation ``sigma``."""

    slope: float
    bias: float
    sigma: float

    def sample(self, log_k: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(log_k.shape, generator=generator, device=log_k.device)
        return torch.exp(self.slope * log_k + self.bias + self.sigma * noise)


@dataclass(frozen=True)
class NoiseCalibration:
    """One camera's ELD-style noise calibration (see the YAML files in ``calibrations/``)."""

    camera: str
    k_min: float
    k_max: float
    iso_at_k_min: float
    iso_at_k_max: float
    gaussian: LogLinear
    tukey: LogLinear
    row: LogLinear
    tukey_lambda: tuple[float, ...]  # the calibrated shape parameters, one per calibration frame
    color_bias: tuple[tuple[float, ...], ...]  # (R, G1, B, G2) ADU per frame, row 0 at k_min

    @classmethod
    def load(cls, camera: str = "sony_a7s2") -> NoiseCalibration:
        doc = load_calibration(camera)
        where = f"calibration {camera!r} (calibrations/{camera}.yaml)"
        try:
            n = doc["noise"]
            calib = cls(
                camera=doc["camera"],
                k_min=float(n["k_min"]),
                k_max=float(n["k_max"]),
                iso_at_k_min=float(n["iso_at_k_min"]),
                iso_at_k_max=float(n["iso_at_k_max"]),
                gaussian=LogLinear(**n["gaussian"]),
                tukey=LogLinear(**n["tukey"]),
                row=LogLinear(**n["row"]),
                tukey_lambda=tuple(float(v) for v in n["tukey_lambda"]),
                color_bias=tuple(tuple(float(v) for v in row) for row in n["color_bias"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: missing or malformed key under 'noise': {e}") from e
        calib._check(where)
        return calib

    def _check(self, where: str) -> None:
        if not 0 < self.k_min < self.k_max or not 0 < self.iso_at_k_min < self.iso_at_k_max:
            raise ValueError(f"{where}: need 0 < k_min < k_max and 0 < iso_at_k_min < iso_at_k_max")
        if not math.isclose(self.k_max / self.k_min, self.iso_at_k_max / self.iso_at_k_min, rel_tol=1e-3):
            raise ValueError(f"{where}: K is proportional to ISO, so k_max / k_min must equal "
                             "iso_at_k_max / iso_at_k_min")
        if not self.tukey_lambda or min(self.tukey_lambda) <= -0.5:
            raise ValueError(f"{where}: 'tukey_lambda' needs at least one value, all > -0.5 (finite variance)")
        if not self.color_bias or any(len(row) != len(_ROW_OF_CHANNEL) for row in self.color_bias):
            raise ValueError(f"{where}: 'color_bias' needs rows of {len(_ROW_OF_CHANNEL)} values (R, G1, B, G2)")

    def k_for_iso(self, iso: float) -> float:
        """Same as ``gain_for_iso(self, iso)``."""
        return gain_for_iso(self, iso)


def gain_for_iso(calib: NoiseCalibration, iso: float | Tensor) -> float | Tensor:
    """System gain K (ADU per electron) at ``iso``: ``K = k_min * iso / iso_at_k_min``.

    K is proportional to ISO (the analogue gain) inside the calibrated range and the same line is
    used beyond it, e.g. SID's ISO 25600 on the Sony A7S2 gives 256 * k_min. Synthesis with a known
    ISO and ExposureDiffusion's Poisson steps both take K from here, so they agree.
    """
    if not (bool((iso > 0).all()) if isinstance(iso, Tensor) else iso > 0):
        raise ValueError(f"ISO must be positive to give a system gain; got {iso}")
    return calib.k_min * iso / calib.iso_at_k_min


def color_bias_for_gain(calib: NoiseCalibration, k: Tensor) -> Tensor:
    """(B, 4) colour bias in ADU: the calibrated row of K's bin (LED's rule).

    ``[k_min, k_max]`` is cut into as many equal-width bins as there are rows, row 0 at k_min;
    K outside the calibrated range takes the nearest end row.
    """
    table = torch.tensor(calib.color_bias, dtype=torch.float32, device=k.device)
    width = (calib.k_max - calib.k_min) / len(calib.color_bias)
    index = torch.floor((k - calib.k_min) / width).long().clamp(0, len(calib.color_bias) - 1)
    return table[index]


@dataclass
class NoiseParams:
    """Per-image noise parameters: tensors of shape (B,), the colour bias (B, 4)."""

    k: Tensor
    sigma_gaussian: Tensor
    sigma_tukey: Tensor
    tukey_lambda: Tensor
    sigma_row: Tensor
    color_bias: Tensor  # (B, 4): ADU added to R, G1, B, G2

    def to(self, device: torch.device | str) -> NoiseParams:
        return NoiseParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def sample_noise_params(
    calib: NoiseCalibration,
    batch: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    k: float | Tensor | None = None,
) -> NoiseParams:
    """Draw ``batch`` parameter sets; pass ``k`` to fix the gain (``gain_for_iso`` for a known ISO)."""
    if k is None:
        log_k = _uniform((batch,), math.log(calib.k_min), math.log(calib.k_max), generator)
    else:
        k_tensor = torch.as_tensor(k, dtype=torch.float32, device=generator.device)
        log_k = torch.log(k_tensor.expand(batch).clone())
    lambdas = torch.tensor(calib.tukey_lambda, dtype=torch.float32, device=generator.device)
    pick = torch.randint(len(calib.tukey_lambda), (batch,), generator=generator, device=generator.device)
    k_values = torch.exp(log_k)
    params = NoiseParams(
        k=k_values,
        sigma_gaussian=calib.gaussian.sample(log_k, generator),
        sigma_tukey=calib.tukey.sample(log_k, generator),
        tukey_lambda=lambdas[pick],
        sigma_row=calib.row.sample(log_k, generator),
        color_bias=color_bias_for_gain(calib, k_values),
    )
    return params.to(device) if device is not None else params


def tukey_lambda_quantile(u: Tensor, lam: Tensor) -> Tensor:
    """Q(u) = (u^lam - (1-u)^lam) / lam, the logistic log(u / (1-u)) as lam -> 0.

    Written with ``expm1`` so it stays accurate for the small |lam| of real sensors.
    """
    log_u, log_v = torch.log(u), torch.log1p(-u)
    small = lam.abs() < _LAMBDA_EPS
    safe = torch.where(small, torch.ones_like(lam), lam)
    general = (torch.expm1(safe * log_u) - torch.expm1(safe * log_v)) / safe
    return torch.where(small, log_u - log_v, general)


def tukey_lambda_variance(lam: float) -> float:
    """Variance of the standard Tukey-lambda distribution (finite for lam > -1/2)."""
    if lam <= -0.5:
        return math.inf
    if abs(lam) < _LAMBDA_EPS:
        return math.pi**2 / 3
    return 2 / lam**2 * (1 / (1 + 2 * lam) - math.exp(2 * math.lgamma(lam + 1) - math.lgamma(2 * lam + 2)))


def _per_image(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def shot_noise(clean_adu: Tensor, k: Tensor, generator: torch.Generator) -> Tensor:
    """Noisy signal ``K * Poisson(x / K)``: mean x, variance K x (x clamped at 0)."""
    k = _per_image(k, clean_adu)
    electrons = torch.poisson(clean_adu.clamp(min=0) / k, generator=generator)
    return electrons * k


def gaussian_noise(like: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
    noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return noise * _per_image(sigma, like)


def tukey_noise(like: Tensor, sigma: Tensor, lam: Tensor, generator: torch.Generator) -> Tensor:
    u = torch.rand(like.shape, generator=generator, device=like.device).clamp(_U_EPS, 1 - _U_EPS)
    return tukey_lambda_quantile(u, _per_image(lam, u)).to(like.dtype) * _per_image(sigma, like)


def row_noise(like: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
    """One Gaussian per sensor row: shared by R/G1 (one row) and by B/G2 (the next)."""
    b, c, h, _ = like.shape
    if c != len(_ROW_OF_CHANNEL):
        raise ValueError(f"row noise needs packed R, G1, B, G2 input, got {c} channels")
    rows = torch.randn((b, 2, h, 1), generator=generator, device=like.device, dtype=like.dtype)
    return rows[:, list(_ROW_OF_CHANNEL)] * _per_image(sigma, like)


def quantization_noise(like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype) - 0.5


def color_bias(like: Tensor, bias: Tensor) -> Tensor:
    """The per-image, per-channel (B, 4) bias broadcast over (B, 4, h, w)."""
    if like.shape[1] != bias.shape[1]:
        raise ValueError(f"colour bias has {bias.shape[1]} channels, the image {like.shape[1]}")
    return bias.to(like.device, like.dtype)[:, :, None, None].expand_as(like)


def add_noise(
    clean_adu: Tensor, params: NoiseParams, model: NoiseModel, generator: torch.Generator
) -> Tensor:
    """Noisy (B, 4, h, w) ADU above black from a clean signal in ADU above black."""
    noisy = shot_noise(clean_adu, params.k, generator)
    if model == "pg":
        return noisy + gaussian_noise(noisy, params.sigma_gaussian, generator)
    if model == "eld":
        return (
            noisy
            + tukey_noise(noisy, params.sigma_tukey, params.tukey_lambda, generator)
            + row_noise(noisy, params.sigma_row, generator)
            + quantization_noise(noisy, generator)
            + color_bias(noisy, params.color_bias)
        )
    raise ValueError(f"unknown noise model {model!r}; expected 'pg' or 'eld'")


def synthesize_low_light(
    clean_packed_norm: Tensor,
    ratio: float | Tensor,
    calib: NoiseCalibration,
    white_minus_black: float,
    model: NoiseModel = "eld",
    generator: torch.Generator | None = None,
    params: NoiseParams | None = None,
    iso: float | Tensor | None = None,
) -> Tensor:
    """A noisy short exposure from a clean long one, both packed and normalised to [0, 1].

    The clean signal is divided by ``ratio`` (per image when a (B,) tensor) in ADU,
    noise is added there, and the result is normalised by ``white_minus_black`` again.
    It is NOT re-amplified: multiply by ``ratio`` to get the network input SID uses.
    Values may fall below 0 (read noise around black), as in real raw files.
    With ``iso`` (per image when a (B,) tensor) K is ``gain_for_iso``; without it K is drawn.
    """
    if generator is None:
        # A fresh Generator always starts from the same seed; draw one from torch's global RNG.
        generator = torch.Generator(device=clean_packed_norm.device)
        generator.manual_seed(int(torch.randint(2**62, (1,))))
    if params is not None and iso is not None:
        raise ValueError("synthesize_low_light: pass iso or params (whose k fixes the gain), not both")
    if params is None:
        k = None if iso is None else gain_for_iso(calib, torch.as_tensor(iso, dtype=torch.float32))
        params = sample_noise_params(calib, clean_packed_norm.shape[0], generator, k=k)
    ratio_t = torch.as_tensor(ratio, dtype=clean_packed_norm.dtype, device=clean_packed_norm.device)
    ratio_t = ratio_t.expand(clean_packed_norm.shape[0])
    clean_adu = clean_packed_norm * white_minus_black / _per_image(ratio_t, clean_packed_norm)
    noisy = add_noise(clean_adu, params.to(clean_packed_norm.device), model, generator)
    return noisy / white_minus_black


def photons_from_norm(
    packed_norm: Tensor, k: Tensor, white_minus_black: float, ratio: float | Tensor = 1.0
) -> Tensor:
    """Expected photo-electrons at 1/``ratio`` of the exposure of a normalised raw image."""
    k = _per_image(torch.as_tensor(k), packed_norm)
    ratio_t = _per_image(torch.as_tensor(ratio).expand(packed_norm.shape[0]), packed_norm)
    return packed_norm * white_minus_black / (k * ratio_t)


def norm_from_photons(
    photons: Tensor, k: Tensor, white_minus_black: float, ratio: float | Tensor = 1.0
) -> Tensor:
    """Inverse of ``photons_from_norm``: electrons at 1/``ratio`` exposure -> normalised raw."""
    k = _per_image(torch.as_tensor(k), photons)
    ratio_t = _per_image(torch.as_tensor(ratio).expand(photons.shape[0]), photons)
    return photons * k * ratio_t / white_minus_black
