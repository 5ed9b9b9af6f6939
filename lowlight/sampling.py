"""Diffusion sampling as pure functions: the noise schedule, DDIM / spaced-DDPM loops with classifier-free
guidance and partial diffusion, boundary-condition (initial noise) search, and tiled denoising.

Nothing here holds a model or does I/O. A method wraps its network as a ``Denoiser``
``(x_t, t, conditional) -> raw output`` and passes it to ``sample``; the schedule comes from the
method's diffusers scheduler through ``NoiseSchedule.from_scheduler``.

Timesteps are exactly diffusers' ``DDIMScheduler.set_timesteps``. Each step goes from its timestep to the
*next chosen* one (the one after the last is ``final_alpha_cumprod``). diffusers' DDIM steps to
``t - T // steps`` instead; the two agree whenever the chosen timesteps are evenly spaced by
``T // steps`` (every "leading" schedule, and "trailing" when ``steps`` divides ``T``), and the next
chosen timestep is what diffusers' DDPMScheduler and respaced DDPM (Nichol & Dhariwal 2021) use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

Denoiser = Callable[[Tensor, Tensor, bool], Tensor]
Region = tuple[int, int, int, int]  # (top, left, height, width) in latent pixels

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==; schedules compare by identity
class NoiseSchedule:
    """The forward process q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) and how to read a model's output.

    Clipping/thresholding of x̂0 in a diffusers config is deliberately ignored: latents are not
    bounded to [-1, 1]. A zero-terminal-SNR schedule (ᾱ = 0 at the end) requires v-prediction,
    because an ε-prediction then carries no information about x_0 (x̂0 = (x_t - ε̂) / 0).
    """

    alphas_cumprod: Tensor  # [num_train_timesteps], float64
    prediction_type: str
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    final_alpha_cumprod: float = 1.0  # ᾱ after the last step; sample() returns x̂0 instead of stepping there

    def __post_init__(self) -> None:
        alphas = torch.as_tensor(self.alphas_cumprod).detach().to("cpu", torch.float64)
        if alphas.ndim != 1 or len(alphas) == 0:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(alphas.shape)}")
        if not ((alphas >= 0) & (alphas <= 1)).all():
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        object.__setattr__(self, "alphas_cumprod", alphas)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
        if self.prediction_type == "epsilon" and alphas.min() == 0:
            raise ValueError("a zero-terminal-SNR schedule (some ᾱ = 0) needs prediction_type='v_prediction'")

    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseSchedule:
        """From any diffusers scheduler with ``alphas_cumprod`` (DDPM, DDIM, PNDM, ...)."""
        config = scheduler.config
        alphas = scheduler.alphas_cumprod  # already rescaled when rescale_betas_zero_snr is set
        final = 1.0 if config.get("set_alpha_to_one", False) else float(alphas[0])
        return cls(
            alphas_cumprod=alphas,
            prediction_type=config.get("prediction_type", "epsilon"),
            timestep_spacing=config.get("timestep_spacing", "leading"),
            steps_offset=int(config.get("steps_offset", 0)),
            final_alpha_cumprod=final,
        )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _signal_noise(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) shaped [B, 1, ...] to broadcast against ``like``."""
        t = torch.as_tensor(t, device=like.device).reshape(-1)
        alpha = self.alphas_cumprod.to(like.device)[t]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha.sqrt().to(like.dtype).view(shape), (1 - alpha).sqrt().to(like.dtype).view(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        signal, sigma = self._signal_noise(t, x0)
        return signal * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model learns to output at x_t = add_noise(x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise
        signal, sigma = self._signal_noise(t, x0)
        return signal * noise - sigma * x0

    def x0_eps(self, x_t: Tensor, t: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂0, ε̂) implied by a model output at (x_t, t)."""
        signal, sigma = self._signal_noise(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * output) / signal, output
        return signal * x_t - sigma * output, signal * output + sigma * x_t

    def timesteps(self, steps: int, strength: float = 1.0) -> Tensor:
        """Descending int64 timesteps: diffusers' DDIMScheduler.set_timesteps(steps) for this spacing/offset.

        ``strength < 1`` keeps the last ``int(steps * strength)`` of them, the rule of diffusers'
        img2img pipelines (``get_timesteps``): partial diffusion starts at the first kept one.
        """
        total = self.num_train_timesteps
        if not 1 <= steps <= total:
            raise ValueError(f"steps must be in [1, {total}] (num_train_timesteps), got {steps}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        # numpy, exactly as diffusers computes them, so rounding agrees for every steps/spacing.
        if self.timestep_spacing == "linspace":
            chosen = np.linspace(0, total - 1, steps).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            chosen = (np.arange(0, steps) * (total // steps)).round()[::-1].astype(np.int64)
            # SD's steps_offset=1 would push the first of T steps to t = T (diffusers indexes out of range
            # there): the offset is applied only as far as it keeps the schedule inside [0, T - 1].
            chosen += min(self.steps_offset, total - 1 - int(chosen[0]))
        else:
            chosen = np.round(np.arange(total, 0, -total / steps)).astype(np.int64) - 1
        kept = min(int(steps * strength), steps)
        if kept == 0:
            raise ValueError(f"strength {strength} keeps no step out of {steps}; raise strength or steps")
        return torch.from_numpy(chosen[steps - kept:].copy())


@dataclass
class SamplerOptions:
    sampler: str = "ddim"  # "ddim" | "ddpm" (respaced ancestral DDPM; ignores eta)
    steps: int = 50
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 = DDPM's posterior variance
    guidance_scale: float = 1.0  # classifier-free guidance ω; 1 calls the denoiser once, conditional only
    strength: float = 1.0  # 1: start from pure noise; < 1: partial diffusion from the noised `init`

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {SAMPLERS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")


@dataclass
class StepState:
    index: int  # 0-based step number
    t: Tensor  # current timestep [B]
    x_t: Tensor
    x0: Tensor  # x̂0 predicted at this step (after guidance)


Callback = Callable[[StepState], Tensor | None]
"""Called once per step after the prediction and before the update.

Return None to keep the prediction, or a tensor shaped like ``state.x0`` to replace x̂0 for this step's
update (latent refinement); the update keeps the model's ε̂ (DDIM: sqrt(ᾱ_prev)·x̂0 + sqrt(1-ᾱ_prev-σ²)·ε̂
+ σz, as DDNM/DDS refine x̂0), and a replacement on the last step is what ``sample`` returns. The
callback may also update the caller's own condition state: the next denoiser call sees it.
"""


def default_noise(shape, seed: int, device=None, dtype=torch.float32) -> Tensor:
    """N(0, I) drawn on the CPU from ``seed``, then moved: the same values on every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def _guided_output(denoiser: Denoiser, x_t: Tensor, t: Tensor, guidance_scale: float) -> Tensor:
    conditional = denoiser(x_t, t, True)
    if guidance_scale == 1:
        return conditional
    unconditional = denoiser(x_t, t, False)
    return unconditional + guidance_scale * (conditional - unconditional)


def predict_x0(denoiser: Denoiser, schedule: NoiseSchedule, x_t: Tensor, t: Tensor,
               guidance_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """One denoiser evaluation (with guidance) read as (x̂0, ε̂): the first half of every sampler step."""
    output = _guided_output(denoiser, x_t, t, guidance_scale).to(x_t.dtype)
    return schedule.x0_eps(x_t, t, output)


def _gaussian_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's device (CPU generators give device-independent draws, as diffusers does).
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ddim_update(x0: Tensor, eps: Tensor, alpha: float, alpha_prev: float, eta: float,
                generator: torch.Generator | None = None) -> Tensor:
    """The second half of a sampler step, x_prev from (x̂0, ε̂): DDIM eq. 12 (Song et al. 2021). At η = 1, σ² is the DDPM posterior variance
    β̃ = (1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev) between these two timesteps, and the step is exactly the
    ancestral DDPM step x_prev ~ q(x_prev | x_t, x̂0) of the respaced chain."""
    sigma = eta * math.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
    x_prev = math.sqrt(alpha_prev) * x0 + math.sqrt(max(1 - alpha_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * _gaussian_like(x0, generator)
    return x_prev


def sample(denoiser: Denoiser, schedule: NoiseSchedule, opts: SamplerOptions, noise: Tensor, *,
           init: Tensor | None = None, generator: torch.Generator | None = None,
           callback: Callback | None = None, progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Run the sampler and return the x̂0 latent predicted at the last step.

    ``noise`` is x_T when ``opts.strength == 1`` (``init`` is then unused), else the ε that noises ``init``
    to the first kept timestep. ``generator`` drives the stochastic steps (DDPM, DDIM with η > 0); the
    global RNG is used when it is None. ``progress`` hears (steps done, steps in all) after each step.
    """
    if opts.strength < 1:
        if init is None:
            raise ValueError("sample: strength < 1 (partial diffusion) needs `init`, the latent to start from")
        if init.shape != noise.shape:
            raise ValueError(f"init shape {tuple(init.shape)} differs from noise shape {tuple(noise.shape)}")
    eta = 1.0 if opts.sampler == "ddpm" else opts.eta
    timesteps = schedule.timesteps(opts.steps, opts.strength).tolist()
    batch = noise.shape[0]

    def batch_t(step: int) -> Tensor:
        return torch.full((batch,), timesteps[step], dtype=torch.long, device=noise.device)

    x_t = noise if opts.strength == 1 else schedule.add_noise(init, noise, batch_t(0))
    for index, timestep in enumerate(timesteps):
        t = batch_t(index)
        x0, eps = predict_x0(denoiser, schedule, x_t, t, opts.guidance_scale)
        if callback is not None:
            replacement = callback(StepState(index=index, t=t, x_t=x_t, x0=x0))
            if replacement is not None:
                if replacement.shape != x0.shape:
                    raise ValueError(f"callback returned x0 of shape {tuple(replacement.shape)}, "
                                     f"expected {tuple(x0.shape)}")
                x0 = replacement
        if progress is not None:
            progress(index + 1, len(timesteps))
        if index + 1 < len(timesteps):
            alpha = float(schedule.alphas_cumprod[timestep])
            alpha_prev = float(schedule.alphas_cumprod[timesteps[index + 1]])
            x_t = ddim_update(x0, eps, alpha, alpha_prev, eta, generator)
    return x0


def fit_noise(noise: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Reuse a searched initial noise [C, h, w] (or [1, C, h, w]) for a latent of ``shape`` ([B,] C, H, W).

    The rule: tile it periodically to cover (H, W), crop the top-left (H, W), repeat over the batch.
    Every value stays one of the original N(0, 1) samples (a crop when H <= h and W <= w; a periodic
    repetition beyond that). Returns equal values when the shapes already match.
    """
    if noise.ndim == 4:
        if noise.shape[0] != 1:
            raise ValueError(f"fit_noise takes one noise map, got batch {noise.shape[0]}")
        noise = noise[0]
    if noise.ndim != 3 or len(shape) not in (3, 4):
        raise ValueError(f"fit_noise needs noise [C,h,w] and shape ([B,]C,H,W); got {tuple(noise.shape)}, {shape}")
    channels, height, width = shape[-3:]
    if channels != noise.shape[0]:
        raise ValueError(f"noise has {noise.shape[0]} channels, the latent {channels}")
    h, w = noise.shape[-2:]
    tiled = noise.repeat(1, -(-height // h), -(-width // w))[:, :height, :width]
    return tiled.unsqueeze(0).repeat(shape[0], 1, 1, 1) if len(shape) == 4 else tiled.clone()


@dataclass
class NoiseSearchResult:
    noise: Tensor  # [C, h, w] best candidate
    scores: list[float]  # per candidate, higher is better
    best: int
    default_score: float  # candidate 0 is always default_noise(shape, default_seed)


def candidate_seeds(candidates: int, seed: int = 0, default_seed: int = 0) -> list[int]:
    """Seeds of ``search_initial_noise``'s candidates: ``default_seed``, then 63-bit seeds mixed from
    (seed, i) by numpy's SeedSequence, so they never run in step with small hand-picked seeds."""
    mixed = [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]) >> 1
             for i in range(1, candidates)]
    return [default_seed, *mixed]


def search_initial_noise(score: Callable[[Tensor], float], shape: tuple[int, int, int], candidates: int, *,
                         seed: int = 0, default_seed: int = 0, progress: bool = True) -> NoiseSearchResult:
    """Boundary-condition search (Ma et al., ICLR 2024, "Solving diffusion ODEs with optimal boundary
    conditions"): with a deterministic sampler the output is a function of x_T, so score candidate noises
    on a reference set and keep the best. ``score(noise [C,h,w])`` runs the sampler on the caller's
    references and returns the mean quality (higher is better). Candidate 0 is the default noise, so
    the result never scores below it. The winner's seed is ``candidate_seeds(...)[best]``.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    seeds = candidate_seeds(candidates, seed, default_seed)
    scores: list[float] = []
    bar = tqdm(seeds, desc="initial noise search", disable=not progress)
    for candidate_seed in bar:
        scores.append(float(score(default_noise(shape, candidate_seed))))
        bar.set_postfix(best=max(scores))
    best = max(range(candidates), key=scores.__getitem__)
    return NoiseSearchResult(noise=default_noise(shape, seeds[best]), scores=scores, best=best,
                             default_score=scores[0])


def _axis_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)  # last tile flush with the edge
    return starts


def tile_regions(h: int, w: int, tile: int, overlap: int) -> list[Region]:
    """Overlapping tiles of at most ``tile`` x ``tile`` with stride ``tile - overlap``, the last one flush
    with the edge; an axis no longer than ``tile`` gets one tile of its full length."""
    if h < 1 or w < 1:
        raise ValueError(f"latent size must be positive, got {h}x{w}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    stride = tile - overlap
    return [(top, left, min(tile, h), min(tile, w))
            for top in _axis_starts(h, tile, stride) for left in _axis_starts(w, tile, stride)]


def _gaussian_window(height: int, width: int, like: Tensor) -> Tensor:
    """Separable Gaussian centred on the tile, σ = side / 4: the edges weigh exp(-2) ≈ 0.14 of the
    centre, so overlaps cross-fade smoothly and every pixel keeps a positive weight."""
    def profile(n: int) -> Tensor:
        position = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (position / (n / 4)) ** 2)
    return torch.outer(profile(height), profile(width)).to(device=like.device, dtype=like.dtype)


def tiled_denoiser(denoiser_for: Callable[[Region], Denoiser], shape_hw: tuple[int, int], tile: int,
                   overlap: int) -> Denoiser:
    """A denoiser for latents of ``shape_hw`` that runs ``denoiser_for(region)`` on overlapping tiles
    (see ``tile_regions``) and blends the outputs with Gaussian weights (``_gaussian_window``)
    normalised by their sum. ``denoiser_for`` lets the method crop its condition to each region.
    A latent that fits in one tile is passed whole to ``denoiser_for((0, 0, h, w))`` unchanged.
    """
    height, width = shape_hw
    regions = tile_regions(height, width, tile, overlap)

    def check(x_t: Tensor) -> None:
        if tuple(x_t.shape[-2:]) != (height, width):
            raise ValueError(f"tiled denoiser built for {height}x{width} latents got {tuple(x_t.shape[-2:])}")

    if len(regions) == 1:
        def whole(x_t: Tensor, t: Tensor, conditional: bool) -> Tensor:
            check(x_t)
            return denoiser_for(regions[0])(x_t, t, conditional)
        return whole

    def tiled(x_t: Tensor, t: Tensor, conditional: bool) -> Tensor:
        check(x_t)
        blended = weights = None
        for region in regions:
            top, left, tile_h, tile_w = region
            window = (..., slice(top, top + tile_h), slice(left, left + tile_w))
            output = denoiser_for(region)(x_t[window], t, conditional)
            weight = _gaussian_window(tile_h, tile_w, output)
            if blended is None:  # allocated from the first output: the model may change channels/dtype
                blended = output.new_zeros(*output.shape[:-2], height, width)
                weights = output.new_zeros(height, width)
            blended[window] += output * weight
            weights[window] += weight
        return blended / weights

    return tiled
