"""The autoregressive baseline (issue 5): MDLM's DiT with causal attention and a next-token loss.

Same backbone, same loop, same verbs (STYLE principle 2): `model.name: ar` builds `causal_dit` and the trainer
uses `NextTokenObjective` in place of the diffusion objective. The objective has the diffusion objective's call
signature and returns the same `NelboTerms`, so training, validation and `atat eval` need no AR-specific code;
its loss is the exact negative log-likelihood, not a bound, so the evaluation scores it in one pass.

The model always sees noise level 0 (an AR model has no diffusion time); its adaLN layers then act as learned
biases, exactly as MDLM's DiT without time conditioning. The MASK row of the vocabulary is unused: its logit is
-inf in the softmax, so the untrained (zero output layer) model scores ln V per token, V = the real tokens.
"""

from __future__ import annotations

import torch

from mdlm_atat.config import ModelConfig
from mdlm_atat.diffusion.objective import Denoiser, NelboTerms, masked_token_nll
from mdlm_atat.models.dit import DiT


def causal_dit(cfg: ModelConfig, num_tokens: int) -> DiT:
    """MDLM's DiT with causal attention: logits at position i depend on tokens 0..i only."""
    return DiT(cfg, num_tokens, causal=True)


class NextTokenObjective:
    """Mean next-token NLL in nats per predicted token: -log p(x_i | x_<i) for i = 1 .. L-1 (teacher forcing).

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
