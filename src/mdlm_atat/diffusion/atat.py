"""ATAT's training step (DESIGN 3.2-3.4): estimator -> adaptive masks -> corrected NELBO -> estimator loss.

Stop-gradient both ways: the masks and the 1/p_i weights use the estimator's output detached, so the denoiser's
loss sends no gradient into the estimator; the estimator's targets are the rank percentiles of the denoiser's
detached per-token losses, so its loss sends none into the denoiser. Both losses are summed and back-propagated
once; each reaches only its own parameters, which sit in their own optimiser groups.

The estimator's target must not depend on its own masks: under a tilt, a token's loss is seen mostly where the
tilt masked it, and its rank among the masked tokens of its sequence moves with beta (by 0.27 for the median
token at beta = +-1). So every `uniform_every`-th row of the global batch keeps MDLM's uniform masks while beta
!= 0, and the estimator learns from those rows alone (from every row while beta = 0): its fixed point, the
expected rank of each token's loss under uniform masking, is the same at every beta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mdlm_atat.config import Config
from mdlm_atat.diffusion.curriculum import Curriculum, CurriculumState
from mdlm_atat.diffusion.masking import standardize, tilted_mask_probs
from mdlm_atat.diffusion.objective import Denoiser, MaskedDiffusionObjective, NelboTerms
from mdlm_atat.models.importance import ImportanceEstimator, estimator_loss, rank_percentile

_MAX_QUANTILE_ELEMENTS = 1 << 20  # torch.quantile's input limit is 2^24; a strided sample is plenty for logging


@dataclass
class AtatStep:
    terms: NelboTerms
    estimator_loss: torch.Tensor  # scalar, 0 when the estimator has no parameters
    state: CurriculumState
    stats: dict[str, torch.Tensor]  # device scalars, filled only when asked for (logging steps)
    estimator_target: torch.Tensor | None  # (B, L) rank percentiles the estimator regresses on; None unlearned
    target_positions: torch.Tensor | None  # (B, L) bool: where it does (masked positions of uniform rows)


class AtatTraining:
    def __init__(self, cfg: Config, estimator: ImportanceEstimator, forward: torch.nn.Module | None = None):
        """`forward` is what the step calls in place of `estimator` (a compiled or DDP-wrapped one); `estimator`
        stays the plain module, whose attributes the step reads."""
        self.cfg = cfg.atat
        self.estimator = estimator
        self.forward = estimator if forward is None else forward
        self.curriculum = Curriculum(cfg.curriculum, cfg.atat, cfg.training.total_steps)

    def __call__(
        self,
        objective: MaskedDiffusionObjective,
        model: Denoiser,
        x0: torch.Tensor,
        t: torch.Tensor,
        step: int,
        attention_mask: torch.Tensor | None = None,
        with_stats: bool = False,
        uniform_noise: torch.Tensor | None = None,
        row_offset: int = 0,
    ) -> AtatStep:
        """`uniform_noise` (B, L): the masks' draws, as the objective takes them (the trainer passes the global
        batch's rows, train/distributed.py); `row_offset`: the global batch index of x0's first row, which
        decides the uniform rows independently of how many processes share the batch."""
        state = self.curriculum.state(step)
        importance_logits = self.forward(x0, t)  # (B, L)
        s = torch.sigmoid(importance_logits.detach())  # (B, L), stop-gradient into the masks and weights
        mask_probs = None
        uniform = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)  # (B,) rows with MDLM's masks
        if state.beta != 0.0:
            z = standardize(s, attention_mask)
            balanced = self.cfg.masking == "balanced"
            tilted = tilted_mask_probs(objective.schedule, t, z, state.beta, balanced, attention_mask)  # (B, L)
            rows = torch.arange(row_offset, row_offset + x0.shape[0], device=x0.device)
            uniform = rows % self.cfg.uniform_every == 0
            rate = objective.schedule.mask_prob(t)[:, None].expand_as(tilted)  # (B, L)
            mask_probs = torch.where(uniform[:, None], rate, tilted)
        terms = objective(
            model, x0, t=t, attention_mask=attention_mask, uniform_noise=uniform_noise, mask_probs=mask_probs,
            correction=self.cfg.correction,
        )
        target = positions = None
        if self.estimator.learned:
            positions = terms.masked & uniform[:, None]  # (B, L)
            target = rank_percentile(terms.token_nll.detach(), positions)
            est_loss = estimator_loss(importance_logits, target, positions, self.cfg.estimator_loss)
        else:
            est_loss = torch.zeros((), device=x0.device)
        stats = self._stats(terms, s, mask_probs, objective, attention_mask) if with_stats else {}
        return AtatStep(terms, est_loss, state, stats, target, positions)

    @torch.no_grad()
    def _stats(self, terms, s, mask_probs, objective, attention_mask) -> dict[str, torch.Tensor]:
        real = torch.ones_like(terms.masked) if attention_mask is None else attention_mask.bool()
        values = s[real]
        sample = values[:: max(1, values.numel() // _MAX_QUANTILE_ELEMENTS)]
        q = torch.quantile(sample, torch.tensor([0.1, 0.5, 0.9], device=sample.device))
        rate = objective.schedule.mask_prob(terms.t)  # (B,)
        stats = {
            "mask_rate": terms.num_masked.float() / terms.num_tokens,  # realised
            "mask_rate_expected": (rate[:, None] * real).sum() / real.sum(),  # MDLM's rate at these t
            "importance_mean": values.mean(),
            "importance_std": values.std(),
            "importance_q10": q[0],
            "importance_q50": q[1],
            "importance_q90": q[2],
        }
        if mask_probs is not None and terms.masked.any():
            # The effective weight relative to MDLM's 1/t, over the masked tokens: alpha(t) / p_i (or 1 without
            # the correction). Bounded by about exp(+-3 beta).
            ratio = (rate[:, None] / mask_probs)[terms.masked] if self.cfg.correction else torch.ones(1, device=s.device)
            stats["weight_ratio_min"], stats["weight_ratio_max"] = ratio.min(), ratio.max()
        return stats
