"""Conditioning a pretrained UNet2DConditionModel on an image.

Three ways, one per baseline in the seed papers:

* input concatenation (InstructPix2Pix): the UNet's first conv takes extra channels,
  zero-initialised, so the expanded UNet starts out as the pretrained one;
* ControlNet (Zhang et al.): a trainable copy of the UNet encoder sees the condition image
  through a small pixel-space hint encoder; zero convs feed its features into the UNet's skips;
* latent ControlNet (DiffBIR): the copy's input is the noisy latent concatenated with the VAE
  latent of the (pre-enhanced) condition, with no hint encoder; the extra input channels start
  at zero, so at initialisation it sees exactly what the UNet sees.
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.controlnet import ControlNetOutput
from torch import Tensor, nn


@torch.no_grad()
def expand_conv_in(model: UNet2DConditionModel | ControlNetModel, extra_channels: int) -> None:
    """Give ``model.conv_in`` ``extra_channels`` more input channels with zero weights (in place)."""
    old = model.conv_in
    new = nn.Conv2d(old.in_channels + extra_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    new.weight.zero_()
    new.weight[:, : old.in_channels].copy_(old.weight)
    new.bias.copy_(old.bias)
    model.conv_in = new.to(old.weight.device, old.weight.dtype)
    model.register_to_config(in_channels=new.in_channels)


class NoHint(nn.Module):
    """Replaces ControlNet's pixel-space hint encoder when the hint enters through ``conv_in``
    instead: diffusers' forward adds the hint embedding to the input features, and zero adds nothing."""

    def forward(self, hint: Tensor) -> Tensor:
        return hint.new_zeros(())


def pixel_controlnet(unet: UNet2DConditionModel, image_channels: int = 3) -> ControlNetModel:
    """ControlNet initialised from the UNet's encoder; the hint is an image at the decoded resolution."""
    return ControlNetModel.from_unet(unet, conditioning_channels=image_channels)


def latent_controlnet(unet: UNet2DConditionModel, condition_channels: int) -> ControlNetModel:
    """DiffBIR's latent ControlNet: input = concat(noisy latent, condition latent)."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,))
    controlnet.controlnet_cond_embedding = NoHint()
    expand_conv_in(controlnet, condition_channels)
    return controlnet


def control_residuals(controlnet: ControlNetModel, sample: Tensor, t: Tensor, prompt: Tensor, hint: Tensor,
                      scale: float | Tensor, cross_attention_kwargs: dict | None = None) -> ControlNetOutput:
    """The ControlNet's residuals times ``scale`` (a number, or one per sample: AdaptBIR's w), its inputs in
    its own dtype (a trainable ControlNet stays fp32 beside a bf16 frozen UNet). ``prompt`` is any
    ``encoder_hidden_states`` (extra tokens included)."""
    dtype = controlnet.dtype
    per_sample = isinstance(scale, Tensor)
    out = controlnet(sample.to(dtype), t, encoder_hidden_states=prompt.to(dtype), controlnet_cond=hint.to(dtype),
                     conditioning_scale=1.0 if per_sample else scale, cross_attention_kwargs=cross_attention_kwargs)
    if not per_sample:
        return out
    w = scale.to(out.mid_block_res_sample).view(-1, 1, 1, 1)
    return ControlNetOutput(down_block_res_samples=[r * w for r in out.down_block_res_samples],
                            mid_block_res_sample=out.mid_block_res_sample * w)


def unet_output(unet: UNet2DConditionModel, sample: Tensor, t: Tensor, prompt: Tensor,
                control: ControlNetOutput | None = None, cross_attention_kwargs: dict | None = None) -> Tensor:
    """The denoiser's raw output (epsilon or v), with ControlNet residuals added to its skips when given.
    Everything enters in the UNet's dtype, as diffusers' ControlNet training casts the residuals, so mixed
    precision works with and without autocast. ``prompt`` is any ``encoder_hidden_states`` (extra tokens
    included); ``cross_attention_kwargs`` reach the attention processors a method installs."""
    dtype = unet.dtype
    extra = {}
    if control is not None:
        extra = {"down_block_additional_residuals": [r.to(dtype) for r in control.down_block_res_samples],
                 "mid_block_additional_residual": control.mid_block_res_sample.to(dtype)}
    return unet(sample.to(dtype), t, encoder_hidden_states=prompt.to(dtype),
                cross_attention_kwargs=cross_attention_kwargs, **extra).sample


def conditioned_output(kind: str, unet: UNet2DConditionModel, x_t: Tensor, t: Tensor, prompt: Tensor, hint: Tensor,
                       controlnet: ControlNetModel | None = None, scale: float | Tensor = 1.0) -> Tensor:
    """The UNet's output with the condition entering as ``kind`` says: ``concat`` (the hint latent concatenated
    at the input; ``expand_conv_in`` made room), ``controlnet`` (a pixel ControlNet fed the hint image) or
    ``latent_controlnet`` (DiffBIR's: concat(x_t, hint latent) into the ControlNet)."""
    if kind == "concat":
        return unet_output(unet, torch.cat([x_t, hint.to(x_t.dtype)], dim=1), t, prompt)
    if kind == "controlnet":
        control = control_residuals(controlnet, x_t, t, prompt, hint, scale)
    elif kind == "latent_controlnet":
        sample = torch.cat([x_t, hint.to(x_t.dtype)], dim=1)
        control = control_residuals(controlnet, sample, t, prompt, sample, scale)
    else:
        raise ValueError(f"unknown conditioning '{kind}'")
    return unet_output(unet, x_t, t, prompt, control)
