"""AdaptBIR's second control phase (Liu et al. 2024, Eq. 5): Controllable Spatial Feature Transform layers,
F_hat = F + (alpha * F + beta) * w with (alpha, beta) = M_theta(F_par), attached to a diffusers
``UNet2DConditionModel`` by forward hooks and fed the latent ControlNet's own features (the parallel
module's, taken before its zero convolutions), so no UNet forward is forked.

Where (``position``):

* ``backbone`` (the paper's Fig. 3(d), as the released code does): after the mid block and after every
  up-block resnet, the decoder path the skips join; the up-block resnet that consumes skip i is paired with
  the ControlNet's feature i, which has its resolution;
* ``skip`` (Fig. 3(c), the ablation): on the skip features the down blocks hand to the decoder (all but
  conv_in's), each paired with the ControlNet feature at the same index; the backbone is untouched.

M_theta is conv 3x3 -> GroupNorm -> SiLU, then a 3x3 conv each for alpha and beta, both zero-initialised
so a fresh layer is the identity whatever w is (stage III starts from the stage-II model). w is one number
per sample; w = 0 leaves every feature exactly as it was.
"""

from __future__ import annotations

from typing import Literal

from diffusers import ControlNetModel, UNet2DConditionModel
from torch import Tensor, nn

Position = Literal["backbone", "skip"]


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class CSFTLayer(nn.Module):
    def __init__(self, condition_channels: int, feature_channels: int, hidden: int = 128):
        super().__init__()
        self.shared = nn.Sequential(nn.Conv2d(condition_channels, hidden, 3, padding=1),
                                    nn.GroupNorm(_groups(hidden), hidden), nn.SiLU())
        self.alpha = nn.Conv2d(hidden, feature_channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, feature_channels, 3, padding=1)
        for conv in (self.alpha, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, feature: Tensor, condition: Tensor, w: Tensor) -> Tensor:
        dtype = self.alpha.weight.dtype
        h = self.shared(condition.to(dtype))
        f = feature.to(dtype)
        return (f + (self.alpha(h) * f + self.beta(h)) * w.to(dtype).view(-1, 1, 1, 1)).to(feature.dtype)


class CSFTControl(nn.Module):
    """The CSFT layers of one UNet + latent ControlNet pair. After ``set_strength(w)`` a ControlNet call records
    its features and the UNet call that follows is modulated; before the first ``set_strength`` the hooks
    do nothing."""

    def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNetModel, position: Position = "backbone",
                 hidden: int = 128):
        super().__init__()
        self.position = position
        feature_channels = [conv.in_channels for conv in controlnet.controlnet_down_blocks]
        count = len(feature_channels)
        self._features: dict[int | str, Tensor] = {}
        self._w: Tensor | None = None
        self._handles = [conv.register_forward_pre_hook(self._recorder(i))
                         for i, conv in enumerate(controlnet.controlnet_down_blocks)]
        self._handles.append(controlnet.controlnet_mid_block.register_forward_pre_hook(self._recorder("mid")))
        mid_channels = controlnet.controlnet_mid_block.in_channels
        if position == "backbone":
            resnets = [r for block in unet.up_blocks for r in block.resnets]
            if len(resnets) != count:
                raise ValueError(f"CSFT pairs {len(resnets)} up-block resnets with {count} ControlNet features")
            self.layers = nn.ModuleList([CSFTLayer(feature_channels[count - 1 - k], r.out_channels, hidden)
                                         for k, r in enumerate(resnets)])
            self.mid = CSFTLayer(mid_channels, mid_channels, hidden)
            self._handles += [r.register_forward_hook(self._modulator(k, count - 1 - k))
                              for k, r in enumerate(resnets)]
            self._handles.append(unet.mid_block.register_forward_hook(self._mid_modulator()))
        else:
            self.layers = nn.ModuleList([CSFTLayer(c, c, hidden) for c in feature_channels[1:]])
            first = 1  # index of each down block's first skip (conv_in's is 0)
            for block in unet.down_blocks:
                skips = len(block.resnets) + (1 if block.downsamplers else 0)
                self._handles.append(block.register_forward_hook(self._skip_modulator(first, skips)))
                first += skips

    def _recorder(self, key: int | str):
        def record(module: nn.Module, args: tuple) -> None:
            if self._w is not None:
                self._features[key] = args[0]
        return record

    def _modulator(self, layer: int, feature: int):
        def modulate(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if self._w is None:
                return None
            return self.layers[layer](output, self._features[feature], self._w)
        return modulate

    def _mid_modulator(self):
        def modulate(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if self._w is None:
                return None
            return self.mid(output, self._features["mid"], self._w)
        return modulate

    def _skip_modulator(self, first: int, skips: int):
        def modulate(module: nn.Module, args: tuple, output: tuple) -> tuple | None:
            if self._w is None:
                return None
            hidden, res = output
            res = tuple(self.layers[first + i - 1](r, self._features[first + i], self._w) for i, r in enumerate(res))
            return hidden, res
        return modulate

    def set_strength(self, w: Tensor) -> None:
        """Modulate the next ControlNet + UNet call with strength ``w`` (one per sample); the ControlNet must
        run first (``conditioned_output`` does). It stays set until the next call: gradient checkpointing
        re-runs the UNet's blocks during backward, and they must be modulated as in the forward pass."""
        self._w, self._features = w, {}
