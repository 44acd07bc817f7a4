"""Adaptive, time-aware masking probabilities (DESIGN 3.3).

p_i(t) = alpha_max * sigmoid(logit(alpha(t) / alpha_max) + beta * z_i), with alpha(t) the schedule's masking
probability, alpha_max = alpha(1) (1 - eps for MDLM's log-linear schedule: MDLM's factor sits outside the tilt),
and z_i the importance s_i standardised over the sequence's real tokens (mean 0, std 1, clipped to [-3, 3]).
So p_i(0) = 0 and p_i(1) = alpha_max for every token, as MDLM masks at t = 1 (the prior stays all-MASK); p_i is
monotone in t; p_i / alpha(t) stays within exp(+-3 beta); and beta = 0 is MDLM exactly (alpha(t) itself is
returned, not alpha_max sigmoid(logit(.)), so it is bitwise MDLM). Tilting alpha(t) itself instead would leave
a token with z = -3 unmasked at t = 1 with probability 0.89 at beta = 3.
"""

from __future__ import annotations

import torch

from mdlm_atat.diffusion.schedule import MaskingSchedule

Z_CLIP = 3.0
_BISECTION_STEPS = 40  # halves a bracket of width 2 * (3 beta + 1) to well below float32 resolution


def standardize(s: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """z-scores of s over each sequence's real tokens, clipped to [-3, 3]; 0 where s is constant. (B, L) -> (B, L)"""
    s = s.float()
    real = torch.ones_like(s, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    count = real.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(real, s, 0.0).sum(-1, keepdim=True) / count
    var = torch.where(real, (s - mean) ** 2, 0.0).sum(-1, keepdim=True) / count
    std = var.sqrt()
    z = torch.where(std > 1e-6, (s - mean) / std.clamp(min=1e-6), torch.zeros_like(s))
    return torch.where(real, z.clamp(-Z_CLIP, Z_CLIP), torch.zeros_like(z))


def tilted_mask_probs(
    schedule: MaskingSchedule,
    t: torch.Tensor,
    z: torch.Tensor,
    beta: float,
    balanced: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token masking probabilities at times t. t (B,), z (B, L) -> p (B, L) float32.

    balanced: a per-sequence shift c inside the sigmoid so that the mean of p over the real tokens equals
    alpha(t) (found by bisection: the mean is monotone in c).
    """
    if beta == 0.0:
        return schedule.mask_prob(t)[:, None].expand_as(z)
    t64 = t.double()
    alpha_max = schedule.mask_prob(torch.ones_like(t64))  # (B,)
    frac = (schedule.mask_prob(t64) / alpha_max).clamp(0.0, 1.0)  # (B,) in [0, 1]: exactly t for log-linear
    logits = torch.logit(frac)[:, None] + beta * z.double()  # (B, L); logit(0) = -inf -> 0, logit(1) = inf -> 1
    if balanced:
        logits = logits + _balancing_shift(logits, frac, attention_mask)
    return (alpha_max[:, None] * torch.sigmoid(logits)).to(torch.float32)


def _balancing_shift(logits: torch.Tensor, rate: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """c (B, 1) with mean_i sigmoid(logits_i + c) = rate over real tokens. rate (B,) in [0, 1]."""
    real = torch.ones_like(logits, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    count = real.sum(-1, keepdim=True).clamp(min=1)
    # The shift that balances lies within the largest tilt |logit_i - logit(rate)| <= 3 |beta| (plus a margin).
    finite = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
    base = torch.logit(rate.clamp(1e-12, 1 - 1e-12))[:, None]
    width = (finite - base).abs().amax(-1, keepdim=True) + 1.0
    lo, hi = -width, width.clone()
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        mean = torch.where(real, torch.sigmoid(logits + mid), 0.0).sum(-1, keepdim=True) / count
        too_high = mean > rate[:, None]
        hi = torch.where(too_high, mid, hi)
        lo = torch.where(too_high, lo, mid)
    shift = (lo + hi) / 2
    # rate 0 or 1: every sigmoid is already 0 or 1; no shift is needed (and -inf + c stays -inf).
    return torch.where(torch.isfinite(base), shift, torch.zeros_like(shift))
