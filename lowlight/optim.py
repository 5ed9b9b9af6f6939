"""Learning-rate schedules and EMA weights for the train loop."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from lowlight.config import TrainConfig


def lr_lambda(tc: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine to zero, halving every ``step_every`` steps, or constant."""

    def factor(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        if tc.schedule == "cosine":
            progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if tc.schedule == "step":
            return 0.5 ** ((step - tc.warmup_steps) // tc.step_every)
        return 1.0

    return factor


def build_optimizer(method: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the method's parameter groups (their own learning rates and betas where it sets them)."""
    return torch.optim.AdamW(method.optimizer_groups(tc.lr), lr=tc.lr, weight_decay=tc.weight_decay)


class EMA:
    """Exponential moving average of a method's checkpointed modules."""

    def __init__(self, method: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in method.state_dict().items()}

    @torch.no_grad()
    def update(self, method: nn.Module) -> None:
        for k, v in method.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @contextmanager
    def swapped_into(self, method: nn.Module):
        """Evaluate with the EMA weights, then put the trained weights back."""
        saved = {k: v.detach().clone() for k, v in method.state_dict().items()}
        method.load_state_dict(self.shadow)
        try:
            yield method
        finally:
            method.load_state_dict(saved)

    def modules(self, method: nn.Module) -> dict[str, nn.Module]:
        """The method's checkpoint modules carrying EMA weights (copies, for saving)."""
        with self.swapped_into(method):
            return {name: copy.deepcopy(module) for name, module in method.checkpoint_modules().items()}
