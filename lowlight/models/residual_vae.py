"""DarkDiff's residual VAE (Zheng et al., Sec. 4.3, Fig. 7, Table A1), on diffusers' ``AutoencoderKL``.

Each encoder block's features E_b reach the decoder block working at the same resolution through a 3x3
convolution: D_{b+1} = D_b + Conv_b(E_b). E_b is the output of ``encoder.down_blocks[b]``'s last resnet
(before its downsampler), at 1/2^b of the image; it is added to the input of ``decoder.up_blocks[n-1-b]``.
For SD's VAE that gives Table A1's convolutions, 128->256, 256->512, 512->512, 512->512.

The convolutions are attached with hooks, so the VAE's own forward code runs unchanged, and start at zero
(the residual VAE is then exactly the pretrained one). Encoding is untiled, since the decoder needs the
whole feature maps; decoding tiles the latent as diffusers does but crops every feature map to the tile,
with every GroupNorm using the whole image's statistics (``vae_tiling``) and the residual convolutions
applied to the whole maps before cropping, so tiles agree with the untiled decode up to the decoder's own
tile borders, as a plain tiled decode does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from lowlight.models.vae_tiling import pool_group_norms, tiles_needed, whole_image_statistics


class ResidualVAE(nn.Module):
    """The residual convolutions of a VAE (the VAE itself stays the owner's module: it is referenced, not
    registered, so its weights are saved once, with it)."""

    def __init__(self, vae: AutoencoderKL, stats_size: int | None = 1024):
        super().__init__()
        self._vae = (vae,)
        n = len(vae.encoder.down_blocks)
        encoder = [block.resnets[-1].out_channels for block in vae.encoder.down_blocks]
        decoder = [vae.decoder.up_blocks[n - 1 - b].resnets[0].in_channels for b in range(n)]
        self.convs = nn.ModuleList(nn.Conv2d(e, d, 3, padding=1) for e, d in zip(encoder, decoder, strict=True))
        for conv in self.convs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.stats_size = stats_size
        self._recorded: list[Tensor | None] | None = None
        self._injected: list[Tensor] | None = None
        pool_group_norms(vae.decoder)  # whole-image statistics for tiled decoding
        for b, block in enumerate(vae.encoder.down_blocks):
            block.resnets[-1].register_forward_hook(self._record_hook(b))
        for b in range(n):
            vae.decoder.up_blocks[n - 1 - b].register_forward_pre_hook(self._inject_hook(b))

    @property
    def vae(self) -> AutoencoderKL:
        return self._vae[0]

    @property
    def factors(self) -> list[int]:
        """Feature pixels per latent pixel, per block: E_b is at 1/2^b of the image, the latent at 1/2^(n-1)."""
        n = len(self.convs)
        return [2 ** (n - 1 - b) for b in range(n)]

    def _record_hook(self, b: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._recorded is not None:
                self._recorded[b] = output
        return hook

    def _inject_hook(self, b: int):
        def hook(module: nn.Module, args: tuple):
            if self._injected is None:
                return None
            hidden, residual = args[0], self._injected[b]
            if residual.shape != hidden.shape:
                raise ValueError(f"residual VAE: residual {tuple(residual.shape)} does not match decoder block "
                                 f"{len(self.convs) - 1 - b}'s input {tuple(hidden.shape)}")
            return (hidden + residual.to(hidden.dtype), *args[1:])
        return hook

    def encode(self, x: Tensor) -> tuple[DiagonalGaussianDistribution, list[Tensor]]:
        """x in [-1, 1] -> the posterior and the encoder features E_b (untiled)."""
        vae = self.vae
        self._recorded = [None] * len(self.convs)
        try:
            h = vae.encoder(x.to(vae.dtype))
            moments = vae.quant_conv(h) if vae.quant_conv is not None else h
            features = list(self._recorded)
        finally:
            self._recorded = None
        return DiagonalGaussianDistribution(moments), features

    @contextmanager
    def injecting(self, residuals: list[Tensor]) -> Iterator[None]:
        self._injected = residuals
        try:
            yield
        finally:
            self._injected = None

    def residuals(self, features: list[Tensor]) -> list[Tensor]:
        """Conv_b(E_b), on whole feature maps: tiles crop these, so no convolution sees a tile's border."""
        return [conv(f.to(conv.weight.dtype)) for conv, f in zip(self.convs, features, strict=True)]

    def _decode_untiled(self, z: Tensor, residuals: list[Tensor]) -> Tensor:
        vae = self.vae
        z = z.to(vae.dtype)
        with self.injecting(residuals):
            return vae.decoder(vae.post_quant_conv(z) if vae.post_quant_conv is not None else z)

    def decode(self, z: Tensor, features: list[Tensor] | None) -> Tensor:
        """Unscaled latent -> image in [-1, 1]; the encoder features of the input reach the decoder (None:
        the plain VAE's decode). Tiled when the VAE tiles a latent this large."""
        if features is None:
            return self.vae.decode(z.to(self.vae.dtype)).sample
        residuals = self.residuals(features)
        if not tiles_needed(self.vae, z, latent=True):
            return self._decode_untiled(z, residuals)
        return self._decode_tiled(z, residuals)

    def _features_like(self, features: list[Tensor], z: Tensor) -> list[Tensor]:
        """Feature (or residual) maps area-resized to match a (downscaled) latent ``z``."""
        size = z.shape[-2:]
        return [f if f.shape[-2:] == (size[0] * s, size[1] * s)
                else F.interpolate(f.float(), size=(size[0] * s, size[1] * s), mode="area").to(f.dtype)
                for f, s in zip(features, self.factors, strict=True)]

    def _decode_tiled(self, z: Tensor, residuals: list[Tensor]) -> Tensor:
        vae = self.vae
        tile = vae.tile_latent_min_size
        overlap = int(tile * vae.tile_overlap_factor)
        stride = max(1, tile - overlap)
        height, width = z.shape[-2:]
        factor = self.factors[0]

        def starts(side: int) -> list[int]:
            last = max(side - tile, 0)
            return sorted(set(range(0, last + 1, stride)) | {last})

        def record(small: Tensor) -> Tensor:
            return self._decode_untiled(small, self._features_like(residuals, small))

        latent_side = None if self.stats_size is None else max(1, self.stats_size // factor)
        out = weight = None
        with whole_image_statistics(vae.decoder, record, z, latent_side):
            for top in starts(height):
                for left in starts(width):
                    h, w = min(tile, height - top), min(tile, width - left)
                    crops = [r[..., top * s:(top + h) * s, left * s:(left + w) * s]
                             for r, s in zip(residuals, self.factors, strict=True)]
                    image = self._decode_untiled(z[..., top:top + h, left:left + w], crops).float()
                    if out is None:
                        out = image.new_zeros(*image.shape[:2], height * factor, width * factor)
                        weight = image.new_zeros(1, 1, height * factor, width * factor)
                    ramp = _ramp(h * factor, overlap * factor, image)[:, None] * _ramp(w * factor, overlap * factor,
                                                                                        image)[None, :]
                    rows, cols = slice(top * factor, (top + h) * factor), slice(left * factor, (left + w) * factor)
                    out[..., rows, cols] += image * ramp
                    weight[..., rows, cols] += ramp
        return (out / weight).to(z.dtype)


def _ramp(length: int, overlap: int, like: Tensor) -> Tensor:
    """Blending weights along one side of a tile: rising over ``overlap`` pixels at each end, never zero."""
    i = torch.arange(length, device=like.device, dtype=torch.float32)
    edge = torch.minimum(i + 1, length - i)
    return (edge / max(overlap, 1)).clamp(max=1.0)
