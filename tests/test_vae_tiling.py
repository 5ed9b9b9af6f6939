"""Tiled VAE encode/decode with whole-image GroupNorm statistics stays close to the untiled run on an
image that fits, with 2x2 and 3x3 tiles; diffusers' per-tile statistics are the comparison.

The VAE is the session's fitted one: a trained VAE's output depends on a few pixels around each one.
(A random-weight VAE's does not, and its tiles disagree at their borders whatever the statistics.)
Measured when written: pooled / per-tile RMS error 0.25-0.45 (encode) and 0.34-0.43 (decode)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from lowlight.config import ModelConfig
from lowlight.models.sd import SDBundle
from lowlight.models.vae_tiling import PooledGroupNorm, decode_sample, encode_moments

SIDE = 128  # px: tiny VAE tiles of 96 px cover it 2x2, of 64 px 3x3 (diffusers steps by 3/4 of a tile)


@pytest.fixture(scope="module")
def bundle(fitted_vae) -> SDBundle:
    return SDBundle.load(ModelConfig(vae=str(fitted_vae), vae_stats_size=None))


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A real photograph with dark and bright regions, as the VAE sees it ([-1, 1])."""
    image = cv2.resize(data.astronaut(), (SIDE, SIDE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    return torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1


def tiled(vae, tile: int) -> None:
    vae.use_tiling = True
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8


def grid(tile: int) -> int:
    return len(range(0, SIDE, int(tile * 0.75)))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("tile", [96, 64])
def test_tiled_encode_and_decode_stay_close_to_untiled(bundle, photo, tile):
    vae = bundle.vae
    assert any(isinstance(m, PooledGroupNorm) for m in vae.modules())
    with torch.no_grad():
        vae.use_tiling = False
        z_whole = vae.encode(photo).latent_dist.mean
        x_whole = vae.decode(z_whole).sample
        tiled(vae, tile)
        z_pooled, x_pooled = encode_moments(vae, photo, None), decode_sample(vae, z_whole, None)
        z_per_tile, x_per_tile = vae.encode(photo).latent_dist.mean, vae.decode(z_whole).sample  # diffusers' own
    assert grid(tile) == {96: 2, 64: 3}[tile]
    scale_z, scale_x = float(z_whole.std()), float(x_whole.std())
    assert rms(z_pooled, z_whole) < 0.6 * rms(z_per_tile, z_whole), (rms(z_pooled, z_whole), rms(z_per_tile, z_whole))
    assert rms(x_pooled, x_whole) < 0.6 * rms(x_per_tile, x_whole), (rms(x_pooled, x_whole), rms(x_per_tile, x_whole))
    assert rms(z_pooled, z_whole) < 0.2 * scale_z and rms(x_pooled, x_whole) < 0.2 * scale_x


def test_statistics_from_a_downscaled_pass_and_per_sample_slicing(bundle, photo):
    """A statistics pass at half size still beats per-tile statistics; slicing records per sample."""
    vae = bundle.vae
    pair = torch.cat([photo, photo.flip(-1) * 0.5 - 0.5])
    with torch.no_grad():
        vae.use_tiling, vae.use_slicing = False, False
        whole = vae.encode(pair).latent_dist.mean
        tiled(vae, 64)
        half = encode_moments(vae, pair, SIDE // 2)
        per_tile = vae.encode(pair).latent_dist.mean
        vae.use_slicing = True
        sliced = encode_moments(vae, pair, None)
        vae.use_slicing = False
        batched = encode_moments(vae, pair, None)
    assert rms(half, whole) < rms(per_tile, whole)
    torch.testing.assert_close(sliced, batched, rtol=1e-4, atol=1e-4)
