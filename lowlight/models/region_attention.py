"""DarkDiff's region-based cross-attention (Zheng et al., Sec. 4.2, Fig. 6, Eq. 5-7).

A context processor, a copy of the UNet encoder initialised from it, turns the condition latent z_y into
features per cross-attention layer. In each cross-attention layer of the UNet's down blocks the noisy
latent's tokens attend to the condition's tokens only within the same spatial region: the layer's token
map is cut into a grid of g x g regions (K = g^2; g = 1 is global cross-attention). Q comes from the
layer's own ``to_q``, K and V from new projections of the condition features, shared by all regions;
the output goes through the layer's ``to_out``. The layers are diffusers attention processors, installed
on the UNet's ``attn2`` modules; up-block and mid-block cross-attention keep the empty-prompt text.

Regions when a side is not a multiple of g: the boundaries are round(i * side / g), so region sizes
differ by at most one token (a side shorter than g gets one region per token); regions are padded to
the largest for batching, and padded keys are masked out.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn


def region_index(height: int, width: int, grid: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(K, N_max) token indices of each region (row-major token order) and the mask of real entries."""
    def bounds(side: int) -> list[tuple[int, int]]:
        g = min(grid, side)
        edges = [round(i * side / g) for i in range(g + 1)]
        return list(itertools.pairwise(edges))

    regions = [torch.arange(top, bottom, device=device)[:, None] * width + torch.arange(left, right, device=device)
               for top, bottom in bounds(height) for left, right in bounds(width)]
    longest = max(r.numel() for r in regions)
    index = torch.zeros(len(regions), longest, dtype=torch.long, device=device)
    mask = torch.zeros(len(regions), longest, dtype=torch.bool, device=device)
    for k, r in enumerate(regions):
        index[k, :r.numel()] = r.flatten()
        mask[k, :r.numel()] = True
    return index, mask


def region_cross_attention(query: Tensor, key: Tensor, value: Tensor, size: tuple[int, int], grid: int,
                           heads: int, scale: float | None = None) -> Tensor:
    """Multi-head attention of (B, N, D) query tokens to key/value tokens of the same (H, W) map, within
    each region of a ``grid`` x ``grid`` partition; returns (B, N, D_v)."""
    batch, tokens, _ = query.shape
    height, width = size
    if tokens != height * width or key.shape[1] != tokens:
        raise ValueError(f"region attention: {tokens} query and {key.shape[1]} key tokens for a {height}x{width} map")
    index, mask = region_index(height, width, grid, query.device)
    regions, longest = index.shape

    def split(x: Tensor) -> Tensor:  # (B, N, D) -> (B*K, heads, N_max, D/heads)
        grouped = x[:, index.flatten()].view(batch, regions, longest, heads, -1)
        return grouped.permute(0, 1, 3, 2, 4).reshape(batch * regions, heads, longest, -1)

    keep = mask[None, :, None, None, :].expand(batch, regions, 1, 1, longest).reshape(batch * regions, 1, 1, longest)
    out = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=keep, scale=scale)
    out = out.view(batch, regions, heads, longest, -1).permute(0, 1, 3, 2, 4).reshape(batch, regions * longest, -1)
    result = out.new_zeros(batch, tokens, out.shape[-1])
    real = mask.flatten()
    result[:, index.flatten()[real]] = out[:, real]
    return result


class ContextState:
    """The condition features of the current denoiser call, read by every region-attention processor."""

    def __init__(self):
        self.features: dict[str, Tensor] | None = None

    @contextmanager
    def using(self, features: dict[str, Tensor]) -> Iterator[None]:
        self.features = features
        try:
            yield
        finally:
            self.features = None


class RegionCrossAttention(nn.Module):
    """The trainable part of one region cross-attention layer: K and V projections of the condition features."""

    def __init__(self, attn: Attention, context_channels: int, grid: int):
        super().__init__()
        inner = attn.to_q.out_features
        self.to_k = nn.Linear(context_channels, inner, bias=False)
        self.to_v = nn.Linear(context_channels, inner, bias=False)
        nn.init.zeros_(self.to_v.weight)  # starts as attention to nothing, like the empty prompt of a text-free UNet
        self.grid = grid

    def forward(self, attn: Attention, hidden_states: Tensor, context: Tensor) -> Tensor:
        if hidden_states.dim() != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("region attention replaces transformer-block cross-attention (token input, no extra norms)")
        residual = hidden_states
        height, width = context.shape[-2:]
        tokens = context.flatten(2).transpose(1, 2).to(self.to_k.weight.dtype)
        query = attn.to_q(hidden_states)
        key, value = self.to_k(tokens).to(query.dtype), self.to_v(tokens).to(query.dtype)
        out = region_cross_attention(query, key, value, (height, width), self.grid, attn.heads, attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class RegionProcessor:
    """The diffusers attention processor calling a ``RegionCrossAttention`` with its layer's condition
    features. A plain object, so the UNet does not register the trainable module as its own child."""

    def __init__(self, layer: RegionCrossAttention, state: ContextState, name: str):
        self.layer, self.state, self.name = layer, state, name

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        if self.state.features is None:
            raise RuntimeError(f"region attention '{self.name}' called without condition features")
        return self.layer(attn, hidden_states, self.state.features[self.name])


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, list[Attention]]:
    """The down blocks' transformers (``down_blocks.i.attentions.j``) and their cross-attention modules."""
    layers = {}
    for i, block in enumerate(unet.down_blocks):
        for j, transformer in enumerate(getattr(block, "attentions", None) or []):
            layers[f"down_blocks.{i}.attentions.{j}"] = [b.attn2 for b in transformer.transformer_blocks
                                                          if getattr(b, "attn2", None) is not None]
    return layers


def install_region_attention(unet: UNet2DConditionModel, grids: list[int], state: ContextState) -> nn.ModuleDict:
    """Region processors on every down-block cross-attention module; ``grids`` gives g per transformer in
    order (one value: the same everywhere). Returns the trainable layers, keyed by transformer and module."""
    layers = cross_attention_layers(unet)
    if len(grids) not in (1, len(layers)):
        raise ValueError(f"region grids: {len(grids)} values for {len(layers)} cross-attention layers "
                         f"({', '.join(layers)}); give one value or one per layer")
    trainable = nn.ModuleDict()
    for k, (name, modules) in enumerate(layers.items()):
        grid = grids[0] if len(grids) == 1 else grids[k]
        for m, attn in enumerate(modules):
            layer = RegionCrossAttention(attn, attn.to_q.in_features, grid)
            trainable[f"{name.replace('.', '_')}_{m}"] = layer
            attn.set_processor(RegionProcessor(layer, state, name))
    return trainable


def replaced_projections(unet: UNet2DConditionModel) -> list[nn.Module]:
    """The text K/V projections of the down-block cross-attention modules, unused once region processors
    are installed (they must not train: no gradient reaches them)."""
    return [p for modules in cross_attention_layers(unet).values() for attn in modules for p in (attn.to_k, attn.to_v)]


class ContextProcessor(nn.Module):
    """A copy of the UNet encoder (input conv, time embedding, down blocks up to the last one with
    cross-attention, whose features nothing after would read): condition latent -> features per layer."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        last = max(i for i, b in enumerate(unet.down_blocks) if getattr(b, "attentions", None))
        self.down_blocks = nn.ModuleList(copy.deepcopy(b) for b in unet.down_blocks[:last + 1])
        self.down_blocks[-1].downsamplers = None  # its output would feed nothing

    def forward(self, latent: Tensor, t: Tensor, prompt: Tensor) -> dict[str, Tensor]:
        dtype = self.conv_in.weight.dtype
        latent = latent.to(dtype)
        t = t.expand(latent.shape[0]) if t.dim() else t.repeat(latent.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(dtype))
        h, features = self.conv_in(latent), {}
        for i, block in enumerate(self.down_blocks):
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                h = resnet(h, emb)
                if attentions:
                    h = attentions[j](h, encoder_hidden_states=prompt.to(dtype), return_dict=False)[0]
                    features[f"down_blocks.{i}.attentions.{j}"] = h
            for down in block.downsamplers or []:
                h = down(h)
        return features
