"""ExposureDiffusion (Wang et al., ICCV 2023): low-light raw as an intermediate state of an exposure process.

A raw image is X = lambda*K*I + N. The input X_T is a short exposure (lambda_T = 1/ratio of the
reference). At each step the network F predicts the reference from X_t, and a longer exposure is
drawn physically from that prediction. Defaults follow the released code (github wyf0912/
ExposureDiffusion, ``models/ELD_model_iter.py``, ``models/arch/NAFNet.py``, README's training commands);
the paper-literal variants are options:

* states: training makes ``train_steps`` network evaluations (3 by default: T = 2 transitions, the
  code's ``--iter_num 2``) at lambda_T and ``train_steps`` - 1 exposures drawn uniformly in
  (lambda_T, 1) and sorted, so their order statistics sit where inference's evenly spaced exposures
  are; ``train_exposures: log_uniform`` is the previous law;
* next state: ``redraw_from_input`` (the code) X_{t-1} = X_T + K*Poisson((lambda_{t-1} - lambda_T) *
  F(X_t) / K); ``accumulate`` (the paper's Eq. 10) X_{t-1} = X_t + K*Poisson((lambda_{t-1} - lambda_t)
  * F(X_t) / K). With one prediction both have the same law (Poisson additivity); the first redraws
  the synthetic photons from the latest prediction. Training lets gradients through the draw
  (straight-through: sample - mean.detach() + mean), as the code does;
* network input: the amplified X_t, plus its photon map X_t/K (``with_photon``, normalised raw over K:
  the network sees how many of its photons are real) and, for ELD and real noise, the amplified input
  X_T (``concat_origin``), as the code's ``--with_photon`` / ``--concat_origin``;
* adaptive residual head (Eq. 12): 2C+1 outputs, a soft mask M, a direct estimate X^ and a residual R^,
  F(X_t) = M*clip(X^) + (1 - M)*clip(X_t/lambda_t + R^);
* loss: L1 on F(X_t) plus, per branch, L1 of X^ weighted by M and of clip(X_t/lambda_t + R^) by 1 - M
  (``branch_loss``, the code's ``--auxloss``), combined over steps with learnable weights, the code's
  ``--adaptive_loss``: equal at the start, and the weight moves to the step with the lowest loss
  (d loss / d logit_t = w_t (L_t - sum_s w_s L_s)). The released form (w_t clipped to [0, 1], the last
  step 1 - sum w with the sum unclipped) lets the last weight go negative, and the optimiser then
  maximises the last step's loss: here, with early steps the better ones, validation PSNR was 2.3 dB at
  step 1000, far under the amplified input's 19 dB. A softmax over per-step logits keeps the start and
  the pull without leaving the simplex. ``step_weights: equal`` sums the steps. ``poisson_kl`` is the released KL loss
  (``models/losses.py``): Eq. 11's direction, KL(P(F) || P(X_ref)) = F log(F/X_ref) + X_ref - F, with
  L1 where either side is below 0.2;
* ``ls_oracle`` (off by default, it reads the ground truth): the released code rescales every step's
  prediction by the least-squares factor fitted to the ground truth, in training and at test time.

Sampling happens in photo-electrons (normalised raw x (white - black) / K); K comes with the short
exposure (:mod:`lowlight.methods.short_exposure`): the gain the noise was synthesised with, or from the
ISO for real pairs, so synthesis and the Poisson steps use the same K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lowlight.config import MethodConfig, ModelConfig
from lowlight.methods.base import EnhanceOptions, Method, register
from lowlight.methods.short_exposure import ShortExposure, ShortExposureOptions, ShortExposureSource
from lowlight.metrics import least_squares_rescale
from lowlight.models.backbones import build_backbone

KL_L1_BELOW = 0.2  # the released KL loss uses L1 where the prediction or the target is darker than this


class ExposureDiffusionOptions(ShortExposureOptions):
    train_steps: int = Field(3, ge=1, description="network evaluations per training sample (T + 1 states)")
    infer_steps: int = Field(3, ge=1, description="network evaluations at inference (1 = plain regression)")
    train_exposures: Literal["uniform", "log_uniform"] = Field(
        "uniform", description="law of the intermediate training exposures in (lambda_T, 1)")
    next_state: Literal["redraw_from_input", "accumulate"] = Field(
        "redraw_from_input", description="released code (from X_T) or the paper's Eq. 10 (from X_t)")
    with_photon: bool = Field(True, description="feed the photon map X_t/K")
    concat_origin: bool | None = Field(
        None, description="feed the amplified X_T; null: on for eld and paired, off for pg")
    loss: Literal["l1", "poisson_kl"] = "l1"
    branch_loss: bool = Field(True, description="L1 on each branch of the adaptive residual head")
    step_weights: Literal["learned", "equal"] = "learned"
    ls_oracle: Literal["off", "inference", "training_and_inference"] = Field(
        "off", description="ORACLE: rescale each step's prediction by its least-squares fit to the truth")


@dataclass
class HeadOutput:
    """F(X_t) and the two branches of the adaptive residual head it mixes."""

    final: Tensor
    direct: Tensor  # X^, unclipped
    by_residual: Tensor  # clip(X_t / lambda_t + R^)
    mask: Tensor


@register
class ExposureDiffusion(Method):
    name = "exposure_diffusion"
    Options = ExposureDiffusionOptions
    domains = ("raw",)

    def __init__(self, cfg: MethodConfig, options: ExposureDiffusionOptions, channels: int,
                 model: ModelConfig):
        super().__init__(cfg, options, channels, model)
        self.inputs = ShortExposureSource(options)
        self.white_minus_black = self.inputs.white_minus_black
        self.concat_origin = options.noise != "pg" if options.concat_origin is None else options.concat_origin
        in_channels = channels * (1 + options.with_photon + self.concat_origin)
        self.backbone = build_backbone(cfg.backbone, in_channels, 2 * channels + 1, width=cfg.width)
        learned = options.step_weights == "learned" and options.train_steps > 1
        # Logits of the per-step loss weights (softmax: equal at the start, as the released --adaptive_loss).
        self.step_weights = nn.Parameter(torch.zeros(options.train_steps)) if learned else None

    @classmethod
    def columns_for(cls, cfg: MethodConfig) -> tuple[str, ...]:
        return ("raw_in", "raw_gt", "ratio", "iso", "wb", "ccm")

    def network(self, x_t: Tensor, exposure: Tensor, k: Tensor, origin: Tensor) -> HeadOutput:
        """F(X_t); ``exposure`` is lambda_t relative to the reference, ``origin`` the amplified X_T."""
        amplified = x_t / exposure.view(-1, 1, 1, 1)
        inputs = [amplified]
        if self.options.with_photon:
            inputs.append(x_t / k.view(-1, 1, 1, 1))
        if self.concat_origin:
            inputs.append(origin)
        out = self.backbone(torch.cat(inputs, dim=1))
        c = self.channels
        mask = torch.sigmoid(out[:, :1])
        direct, residual = out[:, 1:1 + c], out[:, 1 + c:]
        by_residual = (amplified + residual).clamp(0, 1)
        return HeadOutput(mask * direct.clamp(0, 1) + (1 - mask) * by_residual, direct, by_residual, mask)

    def next_state(self, x_input: Tensor, x_t: Tensor, prediction: Tensor, exposures: Tensor, t: int,
                   k: Tensor, generator: torch.Generator, straight_through: bool) -> Tensor:
        """X_{t-1} from F(X_t): the photons gained since X_T (or since X_t) drawn from a Poisson law."""
        if self.options.next_state == "redraw_from_input":
            base, since = x_input, exposures[:, 0]
        else:
            base, since = x_t, exposures[:, t]
        delta = (exposures[:, t + 1] - since).view(-1, 1, 1, 1) * prediction.clamp(0, 1)
        k = k.view(-1, 1, 1, 1)
        mean_electrons = (delta * self.white_minus_black / k).float()  # float32: no bf16 Poisson sampler
        electrons = torch.poisson(mean_electrons.detach(), generator=generator)
        if straight_through:
            electrons = electrons - mean_electrons.detach() + mean_electrons
        return base + electrons * k / self.white_minus_black

    def rollout(self, short: ShortExposure, exposures: Tensor, generator: torch.Generator,
                straight_through: bool, oracle: bool) -> list[HeadOutput]:
        """F at every state X_T, X_{T-1}, ... of ``exposures`` (B, steps), from the short exposure on."""
        origin = short.amplified()  # clipped like the network's first input in the released code
        x_input = origin / short.ratio.view(-1, 1, 1, 1)
        x, outputs = x_input, []
        for t in range(exposures.shape[1]):
            head = self.network(x, exposures[:, t], short.k, origin)
            if oracle:
                if short.target is None:
                    raise ValueError("ls_oracle needs the ground truth 'raw_gt' in the batch")
                head.final = least_squares_rescale(head.final, short.target)
            outputs.append(head)
            if t + 1 < exposures.shape[1]:
                x = self.next_state(x_input, x, head.final, exposures, t, short.k, generator,
                                    straight_through)
        return outputs

    def training_exposures(self, ratio: Tensor, generator: torch.Generator) -> Tensor:
        """(B, train_steps): lambda_T = 1/ratio, then train_steps - 1 rising exposures in (lambda_T, 1)."""
        start = 1.0 / ratio
        shape = (ratio.shape[0], self.options.train_steps - 1)
        u = torch.rand(shape, generator=generator, device=generator.device)
        u = u.to(ratio.device).sort(dim=1).values
        if self.options.train_exposures == "uniform":
            between = start[:, None] + (1 - start[:, None]) * u
        else:
            between = (start.log()[:, None] * (1 - u)).exp()
        return torch.cat([start[:, None], between], dim=1)

    @staticmethod
    def inference_exposures(ratio: Tensor, steps: int) -> Tensor:
        """(B, steps): evenly spaced from lambda_T = 1/ratio towards the reference exposure."""
        start = 1.0 / ratio
        frac = torch.arange(steps, device=ratio.device, dtype=ratio.dtype) / steps
        return start[:, None] + (1 - start[:, None]) * frac[None, :]

    def step_loss(self, head: HeadOutput, target: Tensor) -> Tensor:
        if self.options.loss == "l1":
            loss = F.l1_loss(head.final, target)
        else:
            pred = head.final
            kl_region = (pred >= KL_L1_BELOW) & (target >= KL_L1_BELOW)
            safe_pred, safe_target = pred.clamp_min(KL_L1_BELOW), target.clamp_min(KL_L1_BELOW)
            kl = safe_pred * (safe_pred / safe_target).log() + safe_target - safe_pred
            loss = torch.where(kl_region, kl, (pred - target).abs()).mean()
        if self.options.branch_loss:
            loss = loss + ((head.direct - target).abs() * head.mask
                           + (head.by_residual - target).abs() * (1 - head.mask)).mean()
        return loss

    def combine(self, losses: list[Tensor]) -> Tensor:
        if self.step_weights is None:
            return torch.stack(losses).sum()
        return (self.step_weights.softmax(0) * torch.stack(losses)).sum()

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        short = self.inputs.training(batch, generator)
        exposures = self.training_exposures(short.ratio, generator)
        outputs = self.rollout(short, exposures, generator, straight_through=True,
                               oracle=self.options.ls_oracle == "training_and_inference")
        losses = [self.step_loss(head, short.target) for head in outputs]
        total = self.combine(losses)
        logs = {f"loss_step{t}": float(v.detach()) for t, v in enumerate(losses)}
        if self.step_weights is not None:
            logs |= {f"weight_step{t}": float(w) for t, w in enumerate(self.step_weights.detach().softmax(0))}
        logs["loss"] = float(total.detach())
        return total, logs

    def enhance_defaults(self) -> dict[str, object]:
        return {"steps": self.options.infer_steps}

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], opts: EnhanceOptions) -> Tensor:
        steps = opts.steps or self.options.infer_steps
        short = self.inputs.inference(batch)
        generator = torch.Generator(device=short.x.device).manual_seed(opts.seed)
        exposures = self.inference_exposures(short.ratio, steps)
        outputs = self.rollout(short, exposures, generator, straight_through=False,
                               oracle=self.options.ls_oracle != "off")
        return outputs[-1].final.clamp(0, 1)
