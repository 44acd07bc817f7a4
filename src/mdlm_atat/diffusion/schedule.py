"""The masking schedule: one interface shared by the loss, the evaluation bound and the samplers.

MDLM's log-linear schedule (Sahoo et al. 2024, DESIGN 3.1): at time t in (0, 1] a token is masked with
probability alpha(t) = (1 - eps) * t, i.e. total noise sigma(t) = -log(1 - (1 - eps) t). The continuous-time
NELBO weight on a masked token is sigma'(t) / expm1(sigma(t)) = 1 / t exactly.
"""

from __future__ import annotations

import torch


class LogLinearSchedule:
    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is MASK at time t. (B,) -> (B,)"""
        return (1.0 - self.eps) * t

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t), the noise level a time-conditioned denoiser sees (as MDLM feeds its DiT). (B,) -> (B,)"""
        return -torch.log1p(-(1.0 - self.eps) * t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous-time NELBO weight of a masked token: sigma'(t) / expm1(sigma(t)) = 1 / t. (B,) -> (B,)"""
        return 1.0 / t

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
        return (self.eps + (1.0 - self.eps) * frac).float()
