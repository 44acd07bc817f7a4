"""Masking schedules: one interface shared by the loss, the evaluation bound, adaptive masking and the samplers.

A schedule gives alpha(t), the probability that a token is MASK at time t in (0, 1], increasing from 0 to
alpha(1) = 1 - eps. Everything else follows from it (MDLM, Sahoo et al. 2024, section 3; MD4, Shi et al. 2024):
- the total noise a time-conditioned denoiser sees, sigma(t) = -log(1 - alpha(t)) (as MDLM feeds its DiT);
- the continuous-time NELBO weight of a masked token, alpha'(t) / alpha(t) (MDLM writes it
  sigma'(t) / expm1(sigma(t)), the same quantity);
- the reverse process: a token masked at t is still masked at s < t with probability alpha(s) / alpha(t).

`diffusion.schedule` picks one: `loglinear` (MDLM's default: alpha = (1 - eps) t, weight 1 / t) or `cosine`
(alpha = (1 - eps)(1 - cos(pi t / 2)), MDLM's `CosineNoise` and MD4's cosine schedule).
"""

from __future__ import annotations

import math

import torch


class MaskingSchedule:
    """alpha(t) and what follows from it. Subclasses define `mask_prob` and `mask_prob_derivative`."""

    name: str  # as `diffusion.schedule` names it
    title: str  # as prose names it (atat eval's JSON)
    alpha_formula: str  # alpha(t) as the model card writes it, with {eps}

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """alpha(t): probability that a token is MASK at time t. (B,) -> (B,), in t's dtype."""
        raise NotImplementedError

    def mask_prob_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """alpha'(t). (B,) -> (B,)"""
        raise NotImplementedError

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = -log(1 - alpha(t)), the noise level a time-conditioned denoiser sees. (B,) -> (B,)"""
        return -torch.log1p(-self.mask_prob(t))

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous-time NELBO weight of a masked token, alpha'(t) / alpha(t). (B,) -> (B,)"""
        return self.mask_prob_derivative(t) / self.mask_prob(t)

    def times(self, frac: torch.Tensor) -> torch.Tensor:
        """Map fractions in [0, 1) to times in [eps, 1) (float64 in, float32 out), as training samples t."""
        return (self.eps + (1.0 - self.eps) * frac).float()

    def sample_t(
        self,
        num: int,
        device: torch.device | str = "cpu",
        antithetic: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw `num` times in [eps, 1).

        Antithetic (stratified) sampling, DESIGN 3.1: t_b = eps + (1 - eps) * ((u + b / B) mod 1) with one
        u ~ U[0, 1): exactly one t in each of B equal strata, which lowers the variance of the batch loss.
        """
        if antithetic:
            u = torch.rand(1, device=device, generator=generator, dtype=torch.float64)
            offsets = torch.arange(num, device=device, dtype=torch.float64) / num
            frac = torch.remainder(u + offsets, 1.0)
        else:
            frac = torch.rand(num, device=device, generator=generator, dtype=torch.float64)
        return self.times(frac)

    def stratified_t(self, num_sequences: int, num_t: int, generator: torch.Generator) -> torch.Tensor:
        """(num_t, num_sequences) times for the evaluation bound: t_k = eps + (1 - eps) (u + k) / num_t with one
        u per sequence, a stratified estimate of the integral over t (DESIGN 3.5). Drawn on the CPU."""
        u = torch.rand(num_sequences, generator=generator, dtype=torch.float64)  # (B,)
        frac = (u[None, :] + torch.arange(num_t, dtype=torch.float64)[:, None]) / num_t  # (K, B) in [0, 1)
        return self.times(frac)


class LogLinearSchedule(MaskingSchedule):
    """MDLM's log-linear schedule (DESIGN 3.1): alpha(t) = (1 - eps) t, sigma(t) = -log(1 - (1 - eps) t), and
    the NELBO weight alpha'/alpha = 1 / t exactly."""

    name = "loglinear"
    title = "log-linear"
    alpha_formula = "(1 - {eps}) t"

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * t

    def mask_prob_derivative(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, 1.0 - self.eps)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t  # alpha'/alpha exactly, without the rounding of (1 - eps) / ((1 - eps) t)


class CosineSchedule(MaskingSchedule):
    """alpha(t) = (1 - eps)(1 - cos(pi t / 2)): MDLM's `CosineNoise` (sigma = -log(eps + (1 - eps) cos(pi t / 2)))
    and MD4's cosine schedule. Fewer tokens are masked at small t than log-linear's; the weight is about 2 / t
    near 0."""

    name = "cosine"
    title = "cosine"
    alpha_formula = "(1 - {eps}) (1 - cos(pi t / 2))"

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * (1.0 - torch.cos(0.5 * math.pi * t))

    def mask_prob_derivative(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        # alpha'/alpha with 1 - cos(x) written 2 sin^2(x / 2): no cancellation at small t.
        half = 0.25 * math.pi * t
        return 0.5 * math.pi * torch.sin(2 * half) / (2 * torch.sin(half) ** 2)


SCHEDULES: dict[str, type[MaskingSchedule]] = {s.name: s for s in (LogLinearSchedule, CosineSchedule)}


def build_schedule(name: str, eps: float) -> MaskingSchedule:
    """The schedule `diffusion.schedule` names (config validation has checked the name)."""
    return SCHEDULES[name](eps)
