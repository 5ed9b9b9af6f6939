"""Tiled VAE encode/decode whose result does not depend on the tile size.

diffusers' tiling runs the encoder or decoder on each tile alone, so every GroupNorm normalises a tile
by that tile's own mean and variance: a dark tile and a bright one are pulled to the same level and the
result changes with the tiling. DiffBIR and StableSR fix this by giving every tile the statistics of the
whole image. Here that is done in two passes: an untiled pass over the whole input (area-downscaled when
its long side exceeds ``stats_size``) records each GroupNorm's per-group mean and variance, then the
tiles are run through diffusers' own tiling (overlap and blending unchanged) with every GroupNorm using
the recorded statistics. For an input that fits the statistics pass they are the untiled run's exactly,
and the only differences left are the tiles' borders and the mid-block attention's reach.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn


class PooledGroupNorm(nn.GroupNorm):
    """A GroupNorm that can record its input's statistics or normalise with given ones (same parameters
    and state-dict keys as the ``nn.GroupNorm`` it replaces)."""

    recording: bool = False
    stats: tuple[Tensor, Tensor] | None = None  # per-(sample, group) mean and variance

    @classmethod
    def replacing(cls, norm: nn.GroupNorm) -> PooledGroupNorm:
        pooled = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
        if norm.affine:
            pooled.weight, pooled.bias = norm.weight, norm.bias
        return pooled

    def forward(self, x: Tensor) -> Tensor:
        if not self.recording and self.stats is None:
            return super().forward(x)
        n = x.shape[0]
        grouped = x.float().reshape(n, self.num_groups, -1)
        if self.recording:
            var, mean = torch.var_mean(grouped, dim=-1, unbiased=False)
            self.stats = (mean, var)
        mean, var = self.stats
        if mean.shape[0] != n:
            raise ValueError(f"GroupNorm statistics were recorded for a batch of {mean.shape[0]}, not {n}")
        normed = ((grouped - mean[..., None]) * torch.rsqrt(var[..., None] + self.eps)).reshape(x.shape).to(x.dtype)
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            normed = normed * self.weight.view(shape) + self.bias.view(shape)
        return normed


def pool_group_norms(module: nn.Module) -> None:
    """Replace every ``nn.GroupNorm`` under ``module`` with a ``PooledGroupNorm`` sharing its parameters."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.GroupNorm) and not isinstance(child, PooledGroupNorm):
            setattr(module, name, PooledGroupNorm.replacing(child))
        else:
            pool_group_norms(child)


def _norms(module: nn.Module) -> list[PooledGroupNorm]:
    return [m for m in module.modules() if isinstance(m, PooledGroupNorm)]


def _downscaled(x: Tensor, max_side: int | None) -> Tensor:
    side = max(x.shape[-2:])
    if max_side is None or side <= max_side:
        return x
    size = [max(1, round(s * max_side / side)) for s in x.shape[-2:]]
    return F.interpolate(x, size=size, mode="area")


@contextmanager
def whole_image_statistics(part: nn.Module, record: callable, x: Tensor, max_side: int | None) -> Iterator[None]:
    """Within the block, ``part``'s GroupNorms use the statistics ``record(x')`` left in them (x' = ``x``
    downscaled to ``max_side``)."""
    norms = _norms(part)
    try:
        for norm in norms:
            norm.recording = True
        with torch.no_grad():
            record(_downscaled(x, max_side))
        for norm in norms:
            norm.recording = False
        yield
    finally:
        for norm in norms:
            norm.recording, norm.stats = False, None


def tiles_needed(vae: AutoencoderKL, x: Tensor, latent: bool) -> bool:
    """Whether diffusers will tile this encode (image ``x``) or decode (latent ``x``)."""
    limit = vae.tile_latent_min_size if latent else vae.tile_sample_min_size
    return vae.use_tiling and max(x.shape[-2:]) > limit


def _per_sample_when_slicing(fn):
    """diffusers' slicing feeds the network one sample at a time; the statistics must be recorded so too."""
    def wrapped(vae: AutoencoderKL, x: Tensor, stats_size: int | None) -> Tensor:
        if vae.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(vae, one, stats_size) for one in x.split(1)])
        return fn(vae, x, stats_size)
    return wrapped


@_per_sample_when_slicing
def encode_moments(vae: AutoencoderKL, x: Tensor, stats_size: int | None) -> Tensor:
    """``vae.encode(x)``'s posterior mean; tiled with whole-image GroupNorm statistics when diffusers tiles."""
    if not tiles_needed(vae, x, latent=False) or not _norms(vae.encoder):
        return vae.encode(x).latent_dist.mean
    with whole_image_statistics(vae.encoder, vae.encoder, x, stats_size):
        return vae.encode(x).latent_dist.mean


@_per_sample_when_slicing
def decode_sample(vae: AutoencoderKL, z: Tensor, stats_size: int | None) -> Tensor:
    """``vae.decode(z)``'s image; tiled with whole-image GroupNorm statistics when diffusers tiles."""
    if not tiles_needed(vae, z, latent=True) or not _norms(vae.decoder):
        return vae.decode(z).sample

    def untiled(latent: Tensor) -> Tensor:
        return vae.decoder(vae.post_quant_conv(latent) if vae.post_quant_conv is not None else latent)

    latent_side = None if stats_size is None else max(1, stats_size // (2 ** (len(vae.config.block_out_channels) - 1)))
    with whole_image_statistics(vae.decoder, untiled, z, latent_side):
        return vae.decode(z).sample
