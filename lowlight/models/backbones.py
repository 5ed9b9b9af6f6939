"""Image-to-image restoration backbones: the SID U-Net and NAFNet.

Channel counts always come from the caller (4 for packed Bayer, 3 for sRGB; ExposureDiffusion asks
for 2C+1 outputs). Neither backbone adds a global residual: the caller decides. Inputs of any
spatial size are accepted; they are padded to the backbone's multiple and the output is cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowlight.models.blocks import NAFBlock


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad the bottom/right of an NCHW tensor up to a multiple of `multiple`.

    Reflect padding where the image is large enough for it, replicate padding otherwise (reflect
    needs the pad to be smaller than the side). Returns `x` itself when no padding is needed.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _conv_pair(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(cout, cout, kernel_size=3, padding=1),
        nn.LeakyReLU(0.2),
    )


class SIDUNet(nn.Module):
    """The Learning-to-See-in-the-Dark U-Net (Chen et al., CVPR 2018), as used by ELD and ExposureDiffusion.

    Five levels of conv3x3+LeakyReLU(0.2) pairs at widths width·(1, 2, 4, 8, 16), 2x2 max-pool
    downsampling, 2x2 stride-2 transposed-conv upsampling concatenated with the skip, and a final
    1x1 conv to `out_channels`.
    """

    levels = 4

    def __init__(self, in_channels: int, out_channels: int, width: int = 32) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(self.levels + 1)]
        self.encoders = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.encoders.append(_conv_pair(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(kernel_size=2)
        self.middle = _conv_pair(widths[-2], widths[-1])
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1], strict=True):
            self.ups.append(nn.ConvTranspose2d(w_in, w_out, kernel_size=2, stride=2))
            self.decoders.append(_conv_pair(2 * w_out, w_out))
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, inp: Tensor) -> Tensor:
        h, w = inp.shape[-2:]
        x = pad_to_multiple(inp, 2**self.levels)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.middle(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat((up(x), skip), dim=1))
        return self.head(x)[..., :h, :w]


NAFNET_PRESETS: dict[str, dict[str, Any]] = {
    # Table 5 of ExposureDiffusion (Wang et al., ICCV 2023): NAFNet-1 is the released code's `naf`
    # (one block at full resolution, 4.697K parameters), NAFNet-2 its `naf2` (6.871M parameters).
    "nafnet-1": {"width": 16, "enc_blocks": (), "middle_blocks": 1, "dec_blocks": ()},
    "nafnet-2": {"width": 16, "enc_blocks": (2, 2, 4, 4), "middle_blocks": 12, "dec_blocks": (2, 2, 2, 2)},
    # four levels of one block each, width 8 (0.29M) and 16 (1.1M, the released code's `naf3`)
    "nafnet-l4-w8": {"width": 8, "enc_blocks": (1,) * 4, "middle_blocks": 1, "dec_blocks": (1,) * 4},
    "nafnet-l4-w16": {"width": 16, "enc_blocks": (1,) * 4, "middle_blocks": 1, "dec_blocks": (1,) * 4},
    # the SIDD denoising setting of the NAFNet paper (29M)
    "nafnet-sidd": {"width": 32, "enc_blocks": (2, 2, 4, 8), "middle_blocks": 12, "dec_blocks": (2, 2, 2, 2)},
}


class NAFNet(nn.Module):
    """NAFNet U-shape (Chen et al., ECCV 2022) without its global input residual.

    intro 3x3 conv → per level: NAF blocks, then a 2x2 stride-2 conv doubling the channels →
    middle blocks → per level: 1x1 conv + PixelShuffle(2) halving the channels, plus the encoder
    skip, then NAF blocks → ending 3x3 conv to `out_channels`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int = 16,
        enc_blocks: Sequence[int] = (1, 1, 1, 28),
        middle_blocks: int = 1,
        dec_blocks: Sequence[int] = (1, 1, 1, 1),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(f"enc_blocks {tuple(enc_blocks)} and dec_blocks {tuple(dec_blocks)} "
                             "must have one entry per level each")
        self.intro = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        chan = width
        for n in enc_blocks:
            self.encoders.append(nn.Sequential(*(NAFBlock(chan, dropout=dropout) for _ in range(n))))
            self.downs.append(nn.Conv2d(chan, 2 * chan, kernel_size=2, stride=2))
            chan *= 2
        self.middle = nn.Sequential(*(NAFBlock(chan, dropout=dropout) for _ in range(middle_blocks)))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for n in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, kernel_size=1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*(NAFBlock(chan, dropout=dropout) for _ in range(n))))
        self.ending = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)
        self.multiple = 2 ** len(enc_blocks)

    @classmethod
    def preset(cls, name: str, in_channels: int, out_channels: int, **overrides: Any) -> NAFNet:
        """Build a named setting (a key of NAFNET_PRESETS); keyword overrides win."""
        if name not in NAFNET_PRESETS:
            raise ValueError(f"unknown NAFNet preset {name!r}; valid: {sorted(NAFNET_PRESETS)}")
        return cls(in_channels, out_channels, **{**NAFNET_PRESETS[name], **overrides})

    def forward(self, inp: Tensor) -> Tensor:
        h, w = inp.shape[-2:]
        x = self.intro(pad_to_multiple(inp, self.multiple))
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = decoder(up(x) + skip)
        return self.ending(x)[..., :h, :w]


BACKBONES = ("unet", *NAFNET_PRESETS)


def build_backbone(name: str, in_channels: int, out_channels: int, width: int | None = None,
                   **kwargs: Any) -> nn.Module:
    """Build a backbone by name: 'unet' (SIDUNet) or a NAFNet preset. `width` None keeps the default."""
    if width is not None:
        kwargs["width"] = width
    if name == "unet":
        return SIDUNet(in_channels, out_channels, **kwargs)
    if name in NAFNET_PRESETS:
        return NAFNet.preset(name, in_channels, out_channels, **kwargs)
    raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
