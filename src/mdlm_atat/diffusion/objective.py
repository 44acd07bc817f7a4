"""The MDLM objective: corruption, SUBS parameterisation and the continuous-time NELBO (DESIGN 3.1).

The denoiser only maps (x_t, noise level) to logits; everything about masking, weighting and reduction is
here, so the trainer, the evaluation bound and (later) adaptive masking share one definition.

SUBS (Sahoo et al. 2024, section 3.2): the MASK logit is -inf, so log p is a log-softmax over the real
tokens; a position that is not masked in x_t carries its token over with log p = 0, so it adds nothing to the
loss. We therefore evaluate the log-softmax only at masked positions, which gives exactly SUBS's loss without
building the (B, L, V) SUBS tensor.

Three paths compute the same loss: the denoiser's full (B, L, V) logits (any denoiser); `rows_only`, the
masked rows' (M, V) logits (the DiT); `fused`, where this objective hands the DiT's output layer a `project`
callback, the chunked SUBS loss of diffusion/fused_loss.py with the targets and weights computed here, which
projects the masked rows itself and returns the weighted sum and each row's NLL without ever holding the (M, V)
logits. Weighting and the reduction's denominator stay here on every path.

`NextTokenObjective`, the AR baseline's loss, shares the call signature and the returned terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mdlm_atat.diffusion.fused_loss import fused_subs_nll
from mdlm_atat.diffusion.schedule import MaskingSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, L), noise (B,)) -> logits (B, L, V)


@dataclass
class NelboTerms:
    """The NELBO estimate of one batch, as named terms (nats).

    Gradients flow through `loss` and `nll_sum` only: on the fused path `token_loss` and `token_nll` are detached.
    """

    loss: torch.Tensor  # scalar: nll_sum / num_tokens, nats per token; what training minimises
    nll_sum: torch.Tensor  # scalar: sum over masked positions of weight * -log p(x0_i | x_t)
    num_tokens: torch.Tensor  # scalar: real (non-padding) tokens, masked or not: the denominator
    num_masked: torch.Tensor  # scalar: masked positions
    token_loss: torch.Tensor  # (B, L): weight * -log p at masked positions, exactly 0 elsewhere
    t: torch.Tensor  # (B,): the diffusion times used
    tokens_per_sequence: torch.Tensor  # (B,): real tokens per sequence
    token_nll: torch.Tensor  # (B, L): -log p(x0_i | x_t) at masked positions (unweighted), 0 elsewhere
    masked: torch.Tensor  # (B, L) bool: the positions that were MASK in x_t
    weight: torch.Tensor  # (B, 1) or (B, L): the weight applied to each masked position's -log p

    @property
    def sequence_loss(self) -> torch.Tensor:
        """Per-sequence NELBO in nats per token, (B,): the unit the evaluation's standard error is over."""
        return self.token_loss.sum(-1) / self.tokens_per_sequence


def mask_draws(
    shape: tuple[int, ...], device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """The uniforms that decide the masks (token i is masked iff u_i < p_i), in float64.

    float32 uniforms are multiples of 2^-24 (on CPU), so a probability below ~1e-5 would be rounded up while its
    weight stays 1/p_i: at p = 1.2e-7 a token was masked 1.49x too often. Tilted masks reach such p near t = eps.
    """
    return torch.rand(shape, device=device, generator=generator, dtype=torch.float64)


def masked_token_nll(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p_theta(x0_i | x_t) under SUBS at masked positions, 0 elsewhere.

    logits (B, L, V) in any dtype, or (M, V) already restricted to the masked positions (in row-major order);
    x0 (B, L) long, masked (B, L) bool -> (B, L) float32. The log-sum-exp runs in float32 over the masked rows
    only: a bf16 log-softmax over 50k classes loses about 2 decimal digits.
    """
    rows = (logits if logits.dim() == 2 else logits[masked]).float()  # (M, V)
    if rows.data_ptr() == logits.data_ptr():  # already float32 and restricted: do not write into the caller's
        rows = rows.clone()
    rows[:, mask_id] = float("-inf")  # SUBS: MASK is never predicted (in place on our float32 copy)
    target = x0[masked]  # (M,)
    nll = torch.logsumexp(rows, dim=-1) - rows.gather(-1, target[:, None]).squeeze(-1)  # (M,)
    out = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    return out.masked_scatter(masked, nll)


class MaskedDiffusionObjective:
    """Uniform (MDLM) masking and the continuous-time NELBO in nats per token."""

    def __init__(
        self,
        schedule: MaskingSchedule,
        mask_id: int,
        antithetic: bool = True,
        rows_only: bool = False,
        fused: bool = False,
        mask_padding: bool = False,
    ):
        self.schedule = schedule
        self.mask_id = mask_id
        self.antithetic = antithetic
        # MDLM masks padding in x_t like any token (diffusion.py q_xt) and only drops it from the loss; by
        # default we keep PAD visible. Either way PAD is never a loss position nor counted.
        self.mask_padding = mask_padding
        # The DiT supports both; test fakes that return (B, L, V) logits need neither.
        self.rows_only = rows_only  # call model(x_t, noise, rows=masked): (M, V) logits
        self.fused = fused  # call model(..., rows=masked, project=<the fused loss>): (loss_sum, nll), no logits

    def sample_t(self, num: int, device: torch.device | str, generator: torch.Generator | None = None):
        return self.schedule.sample_t(num, device=device, antithetic=self.antithetic, generator=generator)

    def corrupt(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        uniform_noise: torch.Tensor | None = None,
        mask_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward process q(x_t | x0): each real token becomes MASK with probability alpha(t).

        x0 (B, L), t (B,) -> x_t (B, L), masked (B, L) bool: the loss positions, never padding (which is MASK in
        x_t too with `mask_padding`, as in MDLM). `uniform_noise` (B, L) in [0, 1) (float64, see mask_draws)
        replaces the draw (evaluation passes noise drawn on the CPU so results match across devices).
        `mask_probs` (B, L) replaces alpha(t) per token (adaptive masking, DESIGN 3.3).
        """
        probs = self.schedule.mask_prob(t)[:, None] if mask_probs is None else mask_probs  # (B, 1) or (B, L)
        if uniform_noise is None:
            uniform_noise = mask_draws(x0.shape, x0.device, generator)
        drawn = uniform_noise < probs  # (B, L)
        masked = drawn if attention_mask is None else drawn & attention_mask.bool()
        x_t = torch.where(drawn if self.mask_padding else masked, torch.full_like(x0, self.mask_id), x0)
        return x_t, masked

    def __call__(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        uniform_noise: torch.Tensor | None = None,
        mask_probs: torch.Tensor | None = None,
        correction: bool = True,
    ) -> NelboTerms:
        """One Monte Carlo estimate of the NELBO for a batch x0 (B, L).

        With adaptive `mask_probs` p_i (B, L), a masked token's weight is (1/t) * alpha(t) / p_i when
        `correction` is on, so that E[m_i * weight_i] equals MDLM's at every t (DESIGN 3.3); without it, 1/t
        (the "focus" ablation). With mask_probs None this is MDLM's loss, bit for bit.
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        x_t, masked = self.corrupt(x0, t, attention_mask, generator, uniform_noise, mask_probs)
        noise = self.schedule.total_noise(t)
        weight = self.schedule.loss_weight(t)[:, None]  # (B, 1)
        if mask_probs is not None and correction:
            weight = weight * self.schedule.mask_prob(t)[:, None] / mask_probs.detach()  # (B, L)
        # Only masked positions carry loss (SUBS): a denoiser that can, projects those rows alone (M, V), or
        # fuses the projection with the loss.
        if self.fused:
            targets, token_weights = x0[masked], weight.expand_as(masked)[masked]  # (M,), (M,)

            def project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, num_tokens: int):
                # w, b may hold padding rows past num_tokens (models/dit.py): the loss excludes them
                return fused_subs_nll(h, w, b, targets, token_weights, self.mask_id, num_tokens=num_tokens)

            nll_sum, nll = model(x_t, noise, rows=masked, project=project)  # scalar, (M,) detached
            # Detached per-token terms, for the estimator's targets and the diagnostics; only nll_sum has a graph.
            token_nll = torch.zeros(x0.shape, dtype=nll.dtype, device=x0.device).masked_scatter(masked, nll)
            token_loss = token_nll * weight  # (B, L)
        else:
            logits = model(x_t, noise, rows=masked) if self.rows_only else model(x_t, noise)  # (M, V) or (B, L, V)
            token_nll = masked_token_nll(logits, x0, masked, self.mask_id)  # (B, L)
            token_loss = token_nll * weight
            nll_sum = token_loss.sum()
        if attention_mask is None:
            tokens_per_sequence = torch.full((x0.shape[0],), x0.shape[1], device=x0.device, dtype=torch.float32)
        else:
            tokens_per_sequence = attention_mask.float().sum(-1)
        num_tokens = tokens_per_sequence.sum()
        return NelboTerms(
            loss=nll_sum / num_tokens,
            nll_sum=nll_sum,
            num_tokens=num_tokens,
            num_masked=masked.sum(),
            token_loss=token_loss,
            t=t,
            tokens_per_sequence=tokens_per_sequence,
            token_nll=token_nll,
            masked=masked,
            weight=weight,
        )


class NextTokenObjective:
    """The AR baseline's objective (models/ar.py): mean next-token NLL in nats per predicted token,
    -log p(x_i | x_<i) for i = 1 .. L-1 (teacher forcing).

    Position 0 (BOS under the packed framing) is context only. `t`, `generator` and `uniform_noise` exist for the
    diffusion objective's signature and are unused; `sample_t` returns zeros.
    """

    exact = True  # the loss is the NLL itself: one pass scores it (evaluate_bound uses num_t = 1)

    def __init__(self, mask_id: int):
        self.mask_id = mask_id

    def sample_t(self, num: int, device: torch.device | str, generator: torch.Generator | None = None):
        return torch.zeros(num, device=device)

    def __call__(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        uniform_noise: torch.Tensor | None = None,
    ) -> NelboTerms:
        B, L = x0.shape
        zeros = torch.zeros(B, device=x0.device)
        # The whole block goes in (a fixed shape for compile); the last position predicts nothing.
        logits = model(x0, zeros)[:, :-1]  # (B, L-1, V): row i predicts x0[:, i + 1]
        targets = x0[:, 1:]  # (B, L-1)
        if attention_mask is None:
            predicted = torch.ones_like(targets, dtype=torch.bool)
        else:
            predicted = attention_mask[:, 1:].bool()
        nll = masked_token_nll(logits, targets, predicted, self.mask_id)  # (B, L-1), 0 where not predicted
        token_loss = torch.nn.functional.pad(nll, (1, 0))  # (B, L): position i holds -log p(x_i | x_<i); 0 at 0
        scored = torch.nn.functional.pad(predicted, (1, 0))  # (B, L) bool: the positions with a loss term
        tokens_per_sequence = predicted.float().sum(-1)  # (B,)
        num_tokens = tokens_per_sequence.sum()
        nll_sum = token_loss.sum()
        return NelboTerms(
            loss=nll_sum / num_tokens,
            nll_sum=nll_sum,
            num_tokens=num_tokens,
            num_masked=predicted.sum(),  # the predicted positions play the role of the masked ones
            token_loss=token_loss,
            t=zeros if t is None else t,
            tokens_per_sequence=tokens_per_sequence,
            token_nll=token_loss,  # unweighted: every predicted token has weight 1
            masked=scored,
            weight=torch.ones(B, 1, device=x0.device),
        )
