"""The NELBO perplexity bound (DESIGN 3.5): uniform masking, stratified t per sequence, a fixed seed.

Whatever a model was trained with, it is scored under MDLM's uniform forward process, so the number is a valid
upper bound on its negative log-likelihood and comparable with the MDLM paper. Each sequence is scored at
`num_t` times t_k = eps + (1 - eps) (u + k) / num_t (one u per sequence): a stratified estimate of the integral
over t with far lower variance than one draw. The standard error is over sequences (each sequence's estimate is
independent of the others').
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from mdlm_atat.diffusion.objective import Denoiser, MaskedDiffusionObjective, mask_draws


@dataclass
class BoundResult:
    nelbo: float  # nats per token
    stderr: float  # standard error of nelbo, nats per token
    ppl: float  # exp(nelbo): an upper bound on the perplexity
    bits_per_token: float
    num_tokens: int
    num_sequences: int
    num_t: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def to_device(x: torch.Tensor, device: torch.device | str, pin: bool) -> torch.Tensor:
    """x on `device`; a CPU tensor goes through pinned memory without blocking the host when `pin` (CUDA): a copy
    from pageable memory would wait for the device's queue first."""
    if pin and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@torch.no_grad()
def evaluate_bound(
    model: Denoiser,
    objective: MaskedDiffusionObjective,
    batches: Iterable[torch.Tensor],
    num_t: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    pad_id: int | None = None,
) -> BoundResult:
    """Score every sequence of `batches` (each (B, L) long) with `num_t` stratified t; never touches global RNG.

    `pad_id` (padded framing): positions holding it are padding, neither masked nor counted.

    An objective whose loss is exact (`objective.exact`, the AR baseline's NLL) is scored in one pass: num_t = 1.
    """
    exact = getattr(objective, "exact", False)
    num_t = 1 if exact else num_t
    if isinstance(model, torch.nn.Module):
        was_training = model.training
        model.eval()
    # A private generator on the CPU: the same numbers on any device, and the training RNG stream is untouched.
    generator = torch.Generator().manual_seed(seed)
    # Batches and draws are copied from pinned memory without blocking, and the per-sequence results stay on the
    # device until the end: no host sync per batch, so the host draws batch k + 1 while the GPU scores k.
    pin = torch.device(device).type == "cuda"
    sequence_losses: list[torch.Tensor] = []  # (B,) per batch: per-token NELBO of each sequence
    token_counts: list[torch.Tensor] = []
    for x0 in batches:
        x0 = to_device(x0, device, pin)
        real = None if pad_id is None else x0 != pad_id  # (B, L): padded framing; packed rows are all real
        times = [None]  # an exact objective needs no t: one pass
        if not exact:  # (K, B) stratified times
            times = to_device(objective.schedule.stratified_t(x0.shape[0], num_t, generator), device, pin)
        per_t = []
        for t in times:
            # (B, L), drawn on CPU for determinism
            noise = None if t is None else to_device(mask_draws(x0.shape, generator=generator), device, pin)
            with autocast or contextlib.nullcontext():
                terms = objective(model, x0, t=t, uniform_noise=noise, attention_mask=real)
            per_t.append(terms.sequence_loss.double())
        sequence_losses.append(torch.stack(per_t).mean(0))
        token_counts.append(terms.tokens_per_sequence.double())
    if isinstance(model, torch.nn.Module) and was_training:
        model.train()
    if not sequence_losses:
        raise ValueError("evaluation got no batches: the split is empty or eval_batches selected none")
    losses = torch.cat(sequence_losses).cpu()  # (N,): the one host sync
    counts = torch.cat(token_counts).cpu()  # (N,)
    # Token-weighted mean (sequences may differ in length when padded); its standard error by the ratio estimator.
    nelbo = float((losses * counts).sum() / counts.sum())
    n = losses.numel()
    if n > 1:
        weights = counts / counts.mean()
        stderr = float(((weights * (losses - nelbo)) ** 2).sum().div(n * (n - 1)).sqrt())
    else:
        stderr = float("nan")
    return BoundResult(
        nelbo=nelbo,
        stderr=stderr,
        ppl=math.exp(nelbo),
        bits_per_token=nelbo / math.log(2),
        num_tokens=int(counts.sum()),
        num_sequences=n,
        num_t=num_t,
        seed=seed,
    )
