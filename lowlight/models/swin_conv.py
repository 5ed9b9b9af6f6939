"""The Swin-Conv block of SCUNet (Zhang et al., "Practical Blind Image Denoising via Swin-Conv-UNet and Data
Synthesis", 2023), which condition refinement builds its encoders and predictors from.

A 1x1 convolution mixes the input, its channels are split in two halves: a residual convolution branch
(3x3 conv, ReLU, 3x3 conv) and a Swin transformer branch (LayerNorm, windowed multi-head self-attention
with a relative position bias, LayerNorm, 4x MLP, both residual), the windows shifted by half a window in
every second block; the halves are concatenated, mixed by a 1x1 convolution and added to the input.
Heads have 32 channels, windows 8x8 tokens. Inputs whose sides are not multiples of the window are
padded at the bottom and right (replicating the edge, as SCUNet pads) and cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WindowAttention(nn.Module):
    """Multi-head self-attention within non-overlapping windows, optionally shifted (SW-MSA)."""

    def __init__(self, channels: int, head_dim: int = 32, window: int = 8, shifted: bool = False):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.window, self.shifted = window, shifted
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.bias_table = nn.Parameter(torch.zeros(self.heads, (2 * window - 1) ** 2))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]) + window - 1
        self.register_buffer("bias_index", relative[0] * (2 * window - 1) + relative[1], persistent=False)

    def _shift_mask(self, height: int, width: int, device: torch.device) -> Tensor:
        """(windows, N, N): True where two tokens of a shifted window came from different image regions."""
        w, s = self.window, self.window // 2
        label = torch.zeros(height, width, device=device)
        bands = (slice(0, -w), slice(-w, -s), slice(-s, None))
        for k, (rows, cols) in enumerate((r, c) for r in bands for c in bands):
            label[rows, cols] = k
        windows = label.view(height // w, w, width // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        return windows[:, :, None] != windows[:, None, :]

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) with H, W multiples of the window."""
        b, h, w, c = x.shape
        win, s = self.window, self.window // 2
        if self.shifted:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        tokens = x.view(b, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win, c)
        q, k, v = self.qkv(tokens).view(tokens.shape[0], win * win, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.bias_table[:, self.bias_index].to(q.dtype)  # (heads, N, N)
        mask = bias[None].expand(tokens.shape[0], -1, -1, -1)
        if self.shifted:
            blocked = self._shift_mask(h, w, x.device).repeat(b, 1, 1)[:, None]
            mask = mask.masked_fill(blocked, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj(out.transpose(1, 2).reshape(tokens.shape[0], win * win, c))
        out = out.view(b, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return torch.roll(out, shifts=(s, s), dims=(1, 2)) if self.shifted else out


class SwinBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, window: int, shifted: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attention = WindowAttention(channels, head_dim, window, shifted)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwinConvBlock(nn.Module):
    """SCUNet's ConvTransBlock on ``channels`` (split evenly between the two branches)."""

    def __init__(self, channels: int, head_dim: int = 32, window: int = 8, shifted: bool = False):
        super().__init__()
        if channels % 2:
            raise ValueError(f"a Swin-Conv block splits its channels in two; {channels} is odd")
        half = channels // 2
        self.window = window
        self.mix_in, self.mix_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.conv = nn.Sequential(nn.Conv2d(half, half, 3, padding=1), nn.ReLU(), nn.Conv2d(half, half, 3, padding=1))
        self.swin = SwinBlock(half, head_dim, window, shifted)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.window, -width % self.window
        padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        conv_part, swin_part = self.mix_in(padded).chunk(2, dim=1)
        conv_part = conv_part + self.conv(conv_part)
        swin_part = self.swin(swin_part.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out = self.mix_out(torch.cat([conv_part, swin_part], dim=1))
        return x + out[..., :height, :width]


class SwinConvLayer(nn.Sequential):
    """Two Swin-Conv blocks, windows plain then shifted, as every SCUNet stage pairs them."""

    def __init__(self, channels: int, head_dim: int = 32, window: int = 8):
        super().__init__(SwinConvBlock(channels, head_dim, window, shifted=False),
                         SwinConvBlock(channels, head_dim, window, shifted=True))
