"""Building blocks shared by the backbones.

NAFNet block after Chen et al., "Simple Baselines for Image Restoration" (ECCV 2022):
LayerNorm2d → 1x1 conv → 3x3 depthwise conv → SimpleGate → simplified channel attention → 1x1 conv,
then a feed-forward branch LayerNorm2d → 1x1 conv → SimpleGate → 1x1 conv. Each branch is added to
its input scaled by a learnable per-channel factor (beta, gamma) initialised to zero, so a fresh
block is exactly the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """Layer normalisation over the channel axis of an NCHW tensor, with per-channel affine.

    Statistics are computed in float32 (so bf16/fp16 autocast stays stable) and the result is cast
    back to the input's dtype.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        mu = x.mean(dim=1, keepdim=True)
        var = (x - mu).pow(2).mean(dim=1, keepdim=True)
        y = (x - mu) * torch.rsqrt(var + self.eps)
        y = y * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        return y.to(dtype)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them (NAFNet's activation replacement)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class SimplifiedChannelAttention(nn.Module):
    """Global average pool → 1x1 conv → channel-wise rescaling (no sigmoid, as in NAFNet)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv(self.pool(x))


class NAFBlock(nn.Module):
    """One NAFNet block on `channels` channels; identity at initialisation (beta = gamma = 0)."""

    def __init__(self, channels: int, dw_expand: int = 2, ffn_expand: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        dw_channels = channels * dw_expand
        ffn_channels = channels * ffn_expand
        if dw_channels % 2 or ffn_channels % 2:
            raise ValueError(f"NAFBlock expansions must give even widths, got {dw_channels} and {ffn_channels}")
        # spatial branch
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, dw_channels, kernel_size=1, bias=True)
        self.conv2 = nn.Conv2d(dw_channels, dw_channels, kernel_size=3, padding=1, groups=dw_channels, bias=True)
        self.gate = SimpleGate()
        self.sca = SimplifiedChannelAttention(dw_channels // 2)
        self.conv3 = nn.Conv2d(dw_channels // 2, channels, kernel_size=1, bias=True)
        self.dropout1 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # feed-forward branch
        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, ffn_channels, kernel_size=1, bias=True)
        self.conv5 = nn.Conv2d(ffn_channels // 2, channels, kernel_size=1, bias=True)
        self.dropout2 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, inp: Tensor) -> Tensor:
        x = self.conv2(self.conv1(self.norm1(inp)))
        x = self.sca(self.gate(x))
        x = self.dropout1(self.conv3(x))
        y = inp + x * self.beta

        x = self.conv4(self.norm2(y))
        x = self.dropout2(self.conv5(self.gate(x)))
        return y + x * self.gamma
