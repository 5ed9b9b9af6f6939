"""The networks of condition refinement (Xu et al., "Boosting Fidelity for Pre-Trained-Diffusion-Based
Low-Light Image Enhancement via Condition Refinement"; ``../shared/papers/condition_refinement_xu.txt``).

* ``VisualEncoder`` E_v: the low-light image -> t_l at the latent resolution (three stride-2 4x4 convs,
  each followed by a Swin-Conv layer, then 3x3 and 1x1 convs to 64 channels; LeakyReLU);
* ``pyramid``: h_m = l_m + up2(down2 l_m) + ... + up16(down16 l_m), concatenated (bilinear);
* ``LatentPrior`` eps_theta: a small DDPM over h_m (DiffIR's: T steps, all of them run in training and at
  inference, training starting from the forward-noised target), conditioned on (t_i, t_l, l_c);
* ``LatentPredictor`` gamma: a shared trunk and one head per latent channel giving a weight map
  (sigmoid) and a bias: l_hat = l_c + w * b;
* ``Interaction`` beta: (x_t, l_hat) -> (dx, dm), the residuals added to the noisy latent and the
  condition at every denoiser call.

``simple=True`` swaps every Swin-Conv layer for a 3x3 conv + LeakyReLU (the paper's "simple eps/gamma").
The last convolution of every predictor head and interaction head starts at zero, so a fresh plug-in
returns l_hat = l_c and no residuals: the wrapped baseline exactly. Inputs are at the latent resolution
(images at 8x it); callers pad their sides to a multiple of ``MULTIPLE`` latent pixels (``pad_to``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowlight.models.swin_conv import SwinConvLayer

PYRAMID_FACTORS = (1, 2, 4, 8, 16)
MULTIPLE = 16  # latent pixels: the pyramid's coarsest level is 1/16


def pad_to(x: Tensor, multiple: int) -> Tensor:
    """Pad the bottom and right edges to a multiple of ``multiple`` by replicating the last row/column."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple), mode="replicate")


def pyramid(latent: Tensor, factors: tuple[int, ...] = PYRAMID_FACTORS) -> Tensor:
    """[l, up_2(down_2 l), ..., up_16(down_16 l)] concatenated on channels; bilinear (half-pixel centres)."""
    h, w = latent.shape[-2:]
    levels = []
    for f in factors:
        if f == 1:
            levels.append(latent)
            continue
        down = F.interpolate(latent, size=(max(1, h // f), max(1, w // f)), mode="bilinear", align_corners=False)
        levels.append(F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(levels, dim=1)


def _layer(channels: int, simple: bool) -> nn.Module:
    if simple:
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2))
    return SwinConvLayer(channels)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class VisualEncoder(nn.Module):
    def __init__(self, simple: bool = False, channels: int = 3, out: int = 64):
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.net = nn.Sequential(
            nn.Conv2d(channels, 64, 4, 2, 1), act, _layer(64, simple),
            nn.Conv2d(64, 128, 4, 2, 1), act, _layer(128, simple),
            nn.Conv2d(128, 256, 4, 2, 1), act, _layer(256, simple),
            nn.Conv2d(256, 256, 3, padding=1), act, nn.Conv2d(256, out, 1))

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image * 2 - 1)


class _ConditionNet(nn.Module):
    def __init__(self, channels: int, width: int, simple: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2), _layer(width, simple),
                                 nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(width, width, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Denoiser(nn.Module):
    """conv 3x3 -> (Swin-Conv -> conv 3x3) x 3 -> conv 3x3 to the prior's channels; input: the noisy prior,
    the condition features and t/T as a constant channel."""

    def __init__(self, channels: int, condition: int, width: int, simple: bool):
        super().__init__()
        body: list[nn.Module] = [nn.Conv2d(channels + condition + 1, width, 3, padding=1), nn.LeakyReLU(0.2)]
        for _ in range(3):
            body += [_layer(width, simple), nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2)]
        body.append(nn.Conv2d(width, channels, 3, padding=1))
        self.net = nn.Sequential(*body)

    def forward(self, x: Tensor, condition: Tensor, t_fraction: Tensor) -> Tensor:
        level = t_fraction.to(x.dtype).view(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[-2:])
        return self.net(torch.cat([x, condition, level], dim=1))


class LatentPrior(nn.Module):
    """eps_theta with DiffIR's schedule (T steps, betas linear from 0.1 to 0.99) and reverse process (the
    posterior mean, no added noise), or, with ``generative=False``, the same network as a one-shot
    regression (the paper's "w/o gen.")."""

    def __init__(self, channels: int, condition_channels: int, steps: int = 4, width: int = 256,
                 simple: bool = False, generative: bool = True):
        super().__init__()
        self.channels, self.steps, self.generative = channels, steps, generative
        self.condition = _ConditionNet(condition_channels, width, simple)
        self.denoiser = _Denoiser(channels, width, width, simple)
        betas = torch.linspace(0.1, 0.99, steps) if steps > 1 else torch.tensor([0.99])
        self.register_buffer("alphas", 1 - betas, persistent=False)
        self.register_buffer("alpha_bars", torch.cumprod(1 - betas, 0), persistent=False)

    def forward(self, condition: Tensor, target: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """The prior h_hat_{m,0}: training starts from the forward-noised ``target``, inference (target None)
        from Gaussian noise; both then run every reverse step."""
        features = self.condition(condition)
        n, device = condition.shape[0], condition.device
        shape = (n, self.channels, *condition.shape[-2:])
        if not self.generative:
            return self.denoiser(torch.zeros(shape, device=device, dtype=features.dtype), features,
                                 torch.zeros(n, device=device))
        noise = torch.randn(shape, generator=generator, device=device, dtype=features.dtype)
        last = self.alpha_bars[-1]
        x = noise if target is None else last.sqrt() * target + (1 - last).sqrt() * noise
        for t in reversed(range(self.steps)):
            eps = self.denoiser(x, features, torch.full((n,), (t + 1) / self.steps, device=device))
            alpha, alpha_bar = self.alphas[t], self.alpha_bars[t]
            x = (x - (1 - alpha) / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt()
        return x


class LatentPredictor(nn.Module):
    """gamma: trunk (conv to 512, Swin-Conv, conv to 256, 1x1) and per latent channel a head (conv to 128,
    Swin-Conv, conv to 64, 1x1 to 2): weight map and bias."""

    def __init__(self, inputs: int, latent_channels: int = 4, simple: bool = False, attention: bool = True):
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.attention = attention
        self.trunk = nn.Sequential(nn.Conv2d(inputs, 512, 3, padding=1), act, _layer(512, simple),
                                   nn.Conv2d(512, 256, 3, padding=1), act, nn.Conv2d(256, 256, 1), act)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(256, 128, 3, padding=1), act, _layer(128, simple),
                          nn.Conv2d(128, 64, 3, padding=1), act, _zero(nn.Conv2d(64, 2, 1)))
            for _ in range(latent_channels))

    def forward(self, inputs: Tensor, condition: Tensor) -> Tensor:
        shared = self.trunk(inputs)
        outs = [head(shared) for head in self.heads]
        bias = torch.cat([o[:, 1:2] for o in outs], dim=1)
        if not self.attention:
            return condition + bias
        weight = torch.sigmoid(torch.cat([o[:, :1] for o in outs], dim=1))
        return condition + weight * bias


class Interaction(nn.Module):
    """beta: (x_t, l_hat) -> (dx, dm); trunk (8 channels in: conv to 256, Swin-Conv, conv, 1x1 to 128) and two
    heads (conv to 512, conv to 64, 1x1 to the latent channels), both zero at the start."""

    def __init__(self, latent_channels: int = 4, simple: bool = False):
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.trunk = nn.Sequential(nn.Conv2d(2 * latent_channels, 256, 3, padding=1), act, _layer(256, simple),
                                   nn.Conv2d(256, 256, 3, padding=1), act, nn.Conv2d(256, 128, 1), act)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(128, 512, 3, padding=1), act, nn.Conv2d(512, 64, 3, padding=1), act,
                          _zero(nn.Conv2d(64, latent_channels, 1))) for _ in range(2))

    def forward(self, x_t: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        shared = self.trunk(torch.cat([x_t, condition.to(x_t.dtype)], dim=1))
        dx, dm = (head(shared) for head in self.heads)
        return dx, dm


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unshuffled_channels(factor: int) -> int:
    """Channels of t_i: an RGB image space-to-depth by the VAE factor."""
    return 3 * factor * factor

