"""What the importance estimator learned, measured on held-out data (DESIGN 3.2, issue 4 point 4).

On validation batches, under uniform masking (as the bound), it compares the estimator's s with the
denoiser's observed per-token loss -log p(x0_i | x_t) at the masked positions: the Spearman correlation within
each sequence (one t per sequence), averaged over sequences, next to the same figure for the unigram-surprisal
baseline. It also reports the NELBO by token-frequency bin (rarest fifth of training tokens first) and how
importance relates to frequency, position and token length (characters). `masking_profile` records how the
adaptive masks treat tokens of each frequency at each t under each curriculum stage's beta (plotted by
`atat report`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch

from mdlm_atat.data.tokenizers import Tokenizer
from mdlm_atat.diffusion.masking import standardize, tilted_mask_probs
from mdlm_atat.diffusion.objective import Denoiser, MaskedDiffusionObjective, mask_draws
from mdlm_atat.models.importance import ImportanceEstimator

NUM_FREQUENCY_BINS = 5
_ROW_CHUNK = 8  # rows ranked at once: the tie-aware ranking builds (rows, L, L) comparisons


def tie_ranks(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their ranks) among the selected positions of each row. (B, L)"""
    out = []
    for v, sel in zip(values.float().split(_ROW_CHUNK), selected.split(_ROW_CHUNK)):
        other_selected = sel[:, None, :]  # (b, 1, L): compare with selected positions only
        less = ((v[:, None, :] < v[:, :, None]) & other_selected).sum(-1)
        equal = ((v[:, None, :] == v[:, :, None]) & other_selected).sum(-1)
        out.append(less.float() + (equal.float() - 1) / 2)
    return torch.cat(out)


def spearman_rows(a: torch.Tensor, b: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Spearman's rho between a and b over the selected positions of each row; NaN where it is undefined. (B,)"""
    ra, rb = tie_ranks(a, selected), tie_ranks(b, selected)
    n = selected.sum(-1).float()
    sel = selected.float()
    ma = (ra * sel).sum(-1) / n.clamp(min=1)
    mb = (rb * sel).sum(-1) / n.clamp(min=1)
    da, db = (ra - ma[:, None]) * sel, (rb - mb[:, None]) * sel
    denom = (da.pow(2).sum(-1) * db.pow(2).sum(-1)).sqrt()
    rho = (da * db).sum(-1) / denom
    return torch.where((n >= 3) & (denom > 0), rho, torch.full_like(rho, math.nan))


def token_char_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """Characters in each token's text (specials and MASK count 0). (num_tokens,)"""
    lengths = torch.zeros(tokenizer.num_tokens)
    for i in range(tokenizer.vocab_size):
        lengths[i] = len(tokenizer.decode([i]).strip())
    return lengths


def frequency_bin_edges(surprisal: torch.Tensor, num_bins: int = NUM_FREQUENCY_BINS) -> torch.Tensor:
    """Surprisal thresholds (nats) that split the training tokens into equal-mass bins. (num_bins - 1,), increasing.

    The smoothed unigram probability of a token is exp(-surprisal), so the token mass below a threshold is the
    cumulative sum of those probabilities in order of surprisal.
    """
    values, order = surprisal.double().sort()  # common (low surprisal) first
    mass = torch.exp(-values)
    cumulative = mass.cumsum(0) / mass.sum()
    cuts = torch.searchsorted(cumulative, torch.arange(1, num_bins, dtype=torch.float64) / num_bins)
    return values[cuts.clamp(max=values.numel() - 1)].float()


@torch.no_grad()
def importance_diagnostics(
    model: Denoiser,
    estimator: ImportanceEstimator,
    objective: MaskedDiffusionObjective,
    batches: Iterable[torch.Tensor],
    tokenizer: Tokenizer,
    seed: int = 0,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float | list[float]]:
    was_training = (getattr(model, "training", False), estimator.training)
    if isinstance(model, torch.nn.Module):
        model.eval()
    estimator.eval()
    generator = torch.Generator().manual_seed(seed)
    prior = estimator.surprisal_z  # (num_tokens,), higher = rarer
    edges = frequency_bin_edges(estimator.surprisal.cpu()).to(device)
    char_lengths = token_char_lengths(tokenizer).to(device)
    rho = {"estimator": [], "frequency": [], "vs_frequency": [], "vs_position": [], "vs_token_length": []}
    bin_loss = torch.zeros(NUM_FREQUENCY_BINS, dtype=torch.float64, device=device)
    bin_count = torch.zeros(NUM_FREQUENCY_BINS, dtype=torch.float64, device=device)
    for x0 in batches:
        x0 = x0.to(device)
        B, L = x0.shape
        t = objective.schedule.sample_t(B, generator=generator).to(device)  # stratified over the batch
        noise = mask_draws(x0.shape, generator=generator).to(device)
        with autocast or contextlib.nullcontext():
            terms = objective(model, x0, t=t, uniform_noise=noise)
        s = estimator(x0, t)  # (B, L) logits: ranks are the same as s's
        masked, real = terms.masked, torch.ones_like(terms.masked)
        rho["estimator"].append(spearman_rows(s, terms.token_nll, masked))
        rho["frequency"].append(spearman_rows(prior[x0], terms.token_nll, masked))
        rho["vs_frequency"].append(spearman_rows(s, prior[x0], real))
        positions = torch.arange(L, device=device).expand(B, L)
        rho["vs_position"].append(spearman_rows(s, positions, real))
        rho["vs_token_length"].append(spearman_rows(s, char_lengths[x0], real))
        # Bin 0 holds the rarest fifth of training tokens: its mean is the bound restricted to those tokens.
        bins = (NUM_FREQUENCY_BINS - 1) - torch.bucketize(estimator.surprisal[x0], edges)
        bin_loss.index_add_(0, bins.flatten(), terms.token_loss.double().flatten())
        bin_count.index_add_(0, bins.flatten(), torch.ones_like(bins.flatten(), dtype=torch.float64))
    if isinstance(model, torch.nn.Module):
        model.train(was_training[0])
    estimator.train(was_training[1])

    def mean(values: list[torch.Tensor]) -> float:
        stacked = torch.cat(values)
        stacked = stacked[~torch.isnan(stacked)]
        return float(stacked.mean()) if stacked.numel() else math.nan

    return {
        "spearman_estimator": mean(rho["estimator"]),
        "spearman_frequency_baseline": mean(rho["frequency"]),
        "importance_vs_surprisal": mean(rho["vs_frequency"]),
        "importance_vs_position": mean(rho["vs_position"]),
        "importance_vs_token_length": mean(rho["vs_token_length"]),
        "nelbo_by_frequency_bin": [
            float(loss / count) if count > 0 else math.nan for loss, count in zip(bin_loss, bin_count)
        ],
    }


MASKING_PROFILE_T = tuple(round(0.05 + 0.1 * k, 2) for k in range(10))  # 0.05, 0.15, ..., 0.95


def stage_betas(curriculum) -> dict[str, float]:
    """The beta of each curriculum stage (diffusion/curriculum.py): easy / medium / hard, or the one fixed beta."""
    if curriculum.uniform:
        return {"uniform": 0.0}
    beta = curriculum.sign * curriculum.beta0
    if curriculum.cfg.variant == "none":
        return {"fixed": beta}
    return {"easy": -beta, "medium": 0.0, "hard": beta}


@torch.no_grad()
def masking_profile(
    estimator: ImportanceEstimator,
    schedule,
    betas: dict[str, float],
    batches: Iterable[torch.Tensor],
    balanced: bool = False,
    pad_id: int | None = None,
    device: torch.device | str = "cpu",
    t_grid: tuple[float, ...] = MASKING_PROFILE_T,
) -> dict[str, object]:
    """How adaptive masking (DESIGN 3.3) treats tokens of each frequency at each noise level, with the current
    estimator: the mean masking probability p_i(t) = sigmoid(logit(rate(t)) + beta z_i) over the real tokens of
    each frequency bin (bin 0: the rarest fifth of training tokens), at each t of `t_grid`, under each stage's beta.

    {"t": [T], "rate": [T] (MDLM's), "beta": {stage: beta}, "by_stage": {stage: [T][num_bins]}}
    """
    was_training = estimator.training
    estimator.eval()
    edges = frequency_bin_edges(estimator.surprisal.cpu()).to(device)
    T = len(t_grid)
    sums = {stage: torch.zeros(T, NUM_FREQUENCY_BINS, dtype=torch.float64, device=device) for stage in betas}
    counts = torch.zeros(T, NUM_FREQUENCY_BINS, dtype=torch.float64, device=device)
    for x0 in batches:
        x0 = x0.to(device)
        B = x0.shape[0]
        real = None if pad_id is None else x0 != pad_id  # (B, L)
        bins = (NUM_FREQUENCY_BINS - 1) - torch.bucketize(estimator.surprisal[x0], edges)  # (B, L), 0 = rarest
        keep = torch.ones_like(bins, dtype=torch.bool) if real is None else real
        flat_bins = bins[keep]
        for k, t_value in enumerate(t_grid):
            t = torch.full((B,), float(t_value), device=device)
            z = standardize(torch.sigmoid(estimator(x0, t)), real)  # (B, L)
            counts[k].index_add_(0, flat_bins, torch.ones_like(flat_bins, dtype=torch.float64))
            for stage, beta in betas.items():
                p = tilted_mask_probs(schedule, t, z, beta, balanced, real)  # (B, L)
                sums[stage][k].index_add_(0, flat_bins, p[keep].double())
    estimator.train(was_training)
    rate = schedule.mask_prob(torch.tensor(t_grid, dtype=torch.float64))
    return {
        "t": list(t_grid),
        "rate": [float(r) for r in rate],
        "beta": dict(betas),
        "by_stage": {stage: (s / counts).tolist() for stage, s in sums.items()},  # 0 / 0 = nan: an empty bin
    }
