"""The autoregressive baseline (issue 5): MDLM's DiT with causal attention (its next-token loss,
`NextTokenObjective`, is in diffusion/objective.py beside the diffusion objective whose signature it shares).

Same backbone, same loop, same verbs (STYLE principle 2): `model.name: ar` builds `causal_dit` and the trainer
uses `NextTokenObjective` in place of the diffusion objective, so training, validation and `atat eval` need no
AR-specific code; its loss is the exact negative log-likelihood, not a bound, so the evaluation scores it in one
pass.

The model always sees noise level 0 (an AR model has no diffusion time); its adaLN layers then act as learned
biases, exactly as MDLM's DiT without time conditioning. The MASK row of the vocabulary is unused: its logit is
-inf in the softmax, so the untrained (zero output layer) model scores ln V per token, V = the real tokens.
"""

from __future__ import annotations

from mdlm_atat.config import ModelConfig
from mdlm_atat.models.dit import DiT


def causal_dit(cfg: ModelConfig, num_tokens: int) -> DiT:
    """MDLM's DiT with causal attention: logits at position i depend on tokens 0..i only."""
    return DiT(cfg, num_tokens, causal=True)
