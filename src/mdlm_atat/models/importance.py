"""The importance estimator (DESIGN 3.2): clean tokens x0 and time t -> s_i in (0, 1), the predicted difficulty
of token i for the denoiser at noise level t.

A small bidirectional transformer built from the denoiser's own parts (DiT blocks with adaLN time
conditioning), plus the unigram-surprisal feature -log p(token) counted over the training split (add-one
smoothing). The surprisal table is a buffer, so it is saved with the model. Modes:
- full: the network sees the surprisal as an input feature and adds it to its output logit (with a learned
  scale initialised at 1), so it starts as the frequency baseline and learns what frequency misses;
- learned_only: the network alone (starts at s = 0.5 everywhere);
- frequency_only: s = sigmoid(standardised surprisal), no parameters;
- none: s = 0.5 everywhere, which makes ATAT exactly MDLM.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdlm_atat.config import AtatConfig
from mdlm_atat.models.dit import DiTBlock, FinalLayer, RotaryTable, TimestepEmbedder, TokenEmbedding

TIME_SCALE = 1000.0  # t in (0, 1] is fed as 1000 t: the sinusoidal embedding resolves steps of about 1e-3


def unigram_surprisal(counts: np.ndarray | torch.Tensor, num_tokens: int) -> torch.Tensor:
    """-log p(token) with add-one smoothing over the real vocabulary. counts (V',) -> (num_tokens,) float32."""
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    padded = torch.zeros(num_tokens, dtype=torch.float64)
    padded[: min(num_tokens, counts.numel())] = counts[:num_tokens]
    probs = (padded + 1.0) / (padded.sum() + num_tokens)
    return (-torch.log(probs)).float()


class ImportanceEstimator(nn.Module):
    def __init__(self, cfg: AtatConfig, num_tokens: int, surprisal: torch.Tensor | None = None):
        super().__init__()
        self.mode = cfg.importance_mode
        surprisal = torch.zeros(num_tokens) if surprisal is None else surprisal.float()
        # Standardised over the vocabulary weighted by frequency, i.e. over training tokens, so z ~ N(0, 1)-ish.
        probs = torch.exp(-surprisal.double())
        probs = probs / probs.sum()
        mean = (probs * surprisal).sum()
        std = ((probs * (surprisal - mean) ** 2).sum()).sqrt().clamp(min=1e-6)
        self.register_buffer("surprisal", surprisal.clone())  # (num_tokens,) nats, as counted
        self.register_buffer("surprisal_z", ((surprisal - mean) / std).float())  # (num_tokens,)
        self.learned = self.mode in ("full", "learned_only")
        if not self.learned:
            return
        dim = cfg.estimator_hidden_dim
        self.head_dim = dim // cfg.estimator_num_heads
        self.embed = TokenEmbedding(dim, num_tokens)
        self.surprisal_in = nn.Linear(1, dim) if self.mode == "full" else None
        self.time_map = TimestepEmbedder(cfg.estimator_cond_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, cfg.estimator_num_heads, cfg.estimator_cond_dim, mlp_ratio=4, dropout=0.0)
            for _ in range(cfg.estimator_num_layers)
        )
        self.head = FinalLayer(dim, 1, cfg.estimator_cond_dim)  # zero-initialised: starts at the prior
        self.rotary = RotaryTable(self.head_dim)
        self.surprisal_scale = nn.Parameter(torch.ones(())) if self.mode == "full" else None

    def forward(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Importance logits (B, L), float32; s = sigmoid(logits)."""
        if self.mode == "none":
            return torch.zeros(x0.shape, device=x0.device)
        prior = self.surprisal_z[x0]  # (B, L)
        if self.mode == "frequency_only":
            return prior
        h = self.embed(x0)  # (B, L, D)
        if self.surprisal_in is not None:
            h = h + self.surprisal_in(prior[..., None])
        c = F.silu(self.time_map(TIME_SCALE * t))  # (B, cond)
        cos, sin = self.rotary(x0.shape[1], x0.device)
        for block in self.blocks:
            h = block(h, cos, sin, c)
        logits = self.head(h, c).squeeze(-1).float()  # (B, L)
        if self.surprisal_scale is not None:
            logits = logits + self.surprisal_scale * prior
        return logits


def rank_percentile(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Rank percentile in [0, 1] of `values` among the selected positions of each row (ties broken by position);
    0.5 where a row has a single selected position, 0 outside the selection. (B, L) -> (B, L)"""
    keyed = torch.where(selected, values.float(), torch.full_like(values, math.inf, dtype=torch.float32))
    order = keyed.argsort(dim=-1, stable=True)  # unselected (inf) sort last
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(values.shape[-1], device=values.device).expand_as(order))
    count = selected.sum(-1, keepdim=True)  # (B, 1)
    pct = ranks.float() / (count - 1).clamp(min=1).float()
    pct = torch.where(count == 1, torch.full_like(pct, 0.5), pct)
    return torch.where(selected, pct, torch.zeros_like(pct))


def estimator_loss(logits: torch.Tensor, target: torch.Tensor, selected: torch.Tensor, kind: str) -> torch.Tensor:
    """Regression of s = sigmoid(logits) on the rank-percentile targets, averaged over the selected positions
    (scalar; 0, with the graph intact, when none is selected). A weighted mean over every position rather than a
    gather of the selected ones: no host sync in the training step."""
    target = target.to(logits.dtype)
    if kind == "bce":
        per_token = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    else:
        per_token = (torch.sigmoid(logits) - target) ** 2
    weight = selected.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)
