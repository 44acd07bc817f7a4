"""Optimiser, learning-rate schedule and EMA (DESIGN 3.1: AdamW, linear warm-up then constant, EMA 0.9999)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

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


def build_ema(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights, used for evaluation and sampling; None when decay is 0."""
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
