"""Optimiser, learning-rate schedule and EMA (DESIGN 3.1: AdamW, linear warm-up then constant, EMA 0.9999)."""

from __future__ import annotations

import copy
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from mdlm_atat.config import TrainingConfig


def build_optimizer(
    model: torch.nn.Module,
    cfg: TrainingConfig,
    device: torch.device,
    extra_groups: list[dict] | None = None,
) -> torch.optim.AdamW:
    """AdamW; weight decay (if any) on matrices only: decaying norms' gains and biases only hurts.

    `extra_groups` are further parameter groups with their own settings (ATAT's estimator has its own LR); the
    LR schedule scales every group's LR by the same warm-up / decay factor.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *(extra_groups or []),
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",  # one kernel for all parameters on GPU
    )


def lr_multiplier(step: int, cfg: TrainingConfig) -> float:
    """Linear warm-up over warmup_steps, then constant (MDLM) or cosine down to min_lr_ratio at total_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))


class ModelEMA:
    """MDLM's exponential moving average of the weights (MDLM models/ema.py), used for evaluation and sampling.

    The average starts from the weights it is built with (before the first optimiser step) and, at update n
    (1, 2, ...), decays by min(decay, (1 + n) / (10 + n)): the warm-up lets the first thousands of updates wash
    out, where a fixed 0.9999 would keep 37% of its weight on the initial weights after 10,000 updates. The update
    is MDLM's arithmetic (shadow -= (1 - d) (shadow - param)), so the two agree bit for bit.
    `module` is a copy of the model holding the averaged weights (buffers are copied at construction: the
    models' buffers are constants).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model)

    def current_decay(self) -> float:
        """The decay the next update applies."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        one_minus_decay = 1.0 - self.current_decay()
        self.num_updates += 1
        shadow = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        diff = torch._foreach_sub(shadow, params)
        torch._foreach_mul_(diff, one_minus_decay)
        torch._foreach_sub_(shadow, diff)


def build_ema(model: torch.nn.Module, decay: float) -> ModelEMA | None:
    """The EMA of `model`'s weights (MDLM's, with its decay warm-up); None when decay is 0."""
    if decay == 0:
        return None
    return ModelEMA(model, decay)
