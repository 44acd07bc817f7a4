"""Samplers (DESIGN 3.6): MDLM's reverse process and its variants, on the schedule the loss uses.

Every sampler takes a canvas x (B, L): token ids where the text is given (a prefix, the spans of an infill
template, the BOS / EOS framing) and MASK where it is to be generated. Given positions are never masked and never
change; MASK is never emitted (its logit is -inf, as in the SUBS parameterisation the model was trained with);
once a position is decoded it never changes again. Categorical draws are Gumbel-max in float64: float32 Gumbel
noise is truncated (u is at most 1 - 2^-24), which lowers the entropy of the samples (Zheng et al. 2024,
"Masked diffusion models are secretly time-agnostic masked models and exploit inaccurate categorical sampling").

- `ancestral`: MDLM's reverse process on the grid t_k = 1 - k/N. From t to s < t, a masked token stays masked
  with probability mask_prob(s) / mask_prob(t) (= s/t for the log-linear schedule), else it is drawn from
  p_theta(x0 | x_t); unmasked tokens carry over. The last step goes to s = 0, where everything left is decoded.
  One network call per step, as MDLM's `ddpm_update`.
- `ancestral-cache`: the same draws, in the same order from the same generator, so the same samples; a
  sequence whose tokens did not change since its last network call is not recomputed (MDLM's `ddpm_cache`,
  valid only without time conditioning: the output then depends on x_t alone), and a step that decodes nothing
  in a sequence does not call the network for it. A time-conditioned model falls back to `ancestral`.
- `confidence`: each step unmasks the scheduled number of tokens, round(n * mask_prob(t) / mask_prob(1)) still
  masked at t, choosing the positions whose prediction is most confident (highest max probability) and drawing
  their tokens; a decoded token is never re-sampled. With an `importance` function (ATAT's estimator) the order
  is easy-first instead: the estimator reads the current prediction of x0 (the canvas with every masked position
  filled by its most likely token) and the positions it rates least important are decoded first.
- `ar`: left-to-right for a causal model (`model.name: ar`): position i is drawn from p(x_i | x_<i); given
  positions are teacher-forced.
- `semi-ar` (`generate`): lengths beyond the block. Windows of the model's block length slide over the canvas by
  `stride` tokens; each window keeps what earlier windows decoded (the previous block's tail) as a given prefix
  and runs `ancestral-cache` over what is still masked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from mdlm_atat.config import SamplerName, choices
from mdlm_atat.diffusion.objective import mask_draws
from mdlm_atat.diffusion.schedule import MaskingSchedule

SAMPLERS = choices(SamplerName)  # config.py: the CLI reads its choices there
AR_SAMPLERS = ("ar",)
DIFFUSION_SAMPLERS = tuple(name for name in SAMPLERS if name not in AR_SAMPLERS)

StepCallback = Callable[[int, torch.Tensor], None]  # (global step, canvas after the step (B, L)) -> None
Importance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x0 (B, L), t (B,)) -> importance (B, L)


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, N) long: the canvas with every MASK decoded
    decode_step: torch.Tensor  # (B, N) long: the (global) step that decoded each position; -1 where given
    num_steps: int  # steps taken, over all windows
    num_network_calls: int  # forward passes of the network
    num_sequence_evals: int  # sequences through the network: calls x rows (the cache skips rows)
    cache: bool  # whether the network cache was in use


class Network:
    """The denoiser behind a counter; with `cache`, a per-sequence cache of its output.

    A sampler asks for the logits at the positions it decodes (`logits(x, noise, where)`). A model that splits
    into `features` and `project` (the DiT) runs its blocks on the whole sequence but projects only those
    positions to the vocabulary: at 1000 steps a step decodes about a thousandth of the canvas, so the output
    layer (a third of MDLM-small's forward) and its (B, L, V) logits all but vanish; the cache then holds
    (B, L, D) features instead of (B, L, V) logits. Any other model gives full logits, indexed here.

    Without time conditioning the output depends on x_t alone, so a row whose tokens are unchanged since its
    last evaluation keeps its cached output; only the rows the caller needs are brought up to date.
    """

    def __init__(self, model: Any, cache: bool, autocast: contextlib.AbstractContextManager | None = None):
        self.model = model
        self.cache = cache
        self.autocast = autocast or contextlib.nullcontext()
        self.split = callable(getattr(model, "features", None)) and callable(getattr(model, "project", None))
        self.num_calls = 0
        self.num_sequence_evals = 0
        self._x: torch.Tensor | None = None  # (B, L): the inputs the cached outputs belong to
        self._out: torch.Tensor | None = None  # (B, L, D) features, or (B, L, V) logits

    def reset(self) -> None:
        self._x = self._out = None

    def _forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        self.num_calls += 1
        self.num_sequence_evals += x.shape[0]
        with self.autocast:
            return self.model.features(x, noise_level) if self.split else self.model(x, noise_level)

    def outputs(self, x: torch.Tensor, noise_level: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, L, D) or logits (B, L, V) for x (B, L), correct at least in `rows` (B,) (default: all)."""
        if not self.cache or self._out is None or self._x.shape != x.shape:
            # No cache, or nothing cached yet: the whole batch in one call.
            self._out = self._forward(x, noise_level)
            self._x = x.clone()
            return self._out
        changed = (x != self._x).any(-1)  # (B,): a row with unchanged tokens keeps its output
        need = changed if rows is None else changed & rows
        if need.any():
            index = need.nonzero().squeeze(-1)  # (R,)
            self._out[index] = self._forward(x[index], noise_level[index])
            self._x[index] = x[index]
        return self._out

    @torch.no_grad()
    def logits(self, x: torch.Tensor, noise_level: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Logits (M, V) at the positions `where` (B, L) bool, in row-major order. Without the cache this is one
        network call over the whole batch whatever `where` holds (MDLM's one call per step)."""
        selected = self.outputs(x, noise_level, rows=where.any(-1))[where]  # (M, D) or (M, V)
        if not self.split:
            return selected
        with self.autocast:
            return self.model.project(selected)


class RowGenerators:
    """One random stream per sequence of the batch: every draw for row b comes from `generators[b]`, so a sample
    depends on its own seed alone, not on which other samples share its batch (`atat sample --num-samples 2`
    gives the first two samples of `--num-samples 4`). The samplers take it wherever they take a generator."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators

    @classmethod
    def for_samples(cls, seed: int, indices: Sequence[int], device: torch.device | str) -> RowGenerators:
        """Sample i's stream is seeded from (seed, i) (numpy's SeedSequence: no two pairs share a stream)."""
        import numpy as np

        seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]) for i in indices]
        return cls([torch.Generator(device=device).manual_seed(s) for s in seeds])

    def __len__(self) -> int:
        return len(self.generators)


Generator = torch.Generator | RowGenerators | None


def uniform(shape: tuple[int, int], generator: Generator, device: torch.device) -> torch.Tensor:
    """U[0, 1) draws of `shape` (B, L) in float64, row b from generator b with RowGenerators."""
    if isinstance(generator, RowGenerators):
        return torch.stack([mask_draws(shape[1:], device, g) for g in generator.generators])
    return mask_draws(shape, device, generator)


def gumbel_argmax(
    logits: torch.Tensor, mask_id: int, generator: Generator, rows_per_chunk: int = 2048,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """One categorical draw per row of logits (M, V), Gumbel-max in float64; MASK is excluded. -> (M,) long.

    With RowGenerators, `selected` (B, ...) bool is the mask whose boolean indexing gave the logits' rows (so
    they come sequence by sequence), and each sequence's rows draw their noise from its own stream; other
    generators need no `selected` (no per-step count, no host sync). Chunked over rows so that the float64 noise
    stays at most rows_per_chunk x V (0.8 GB for GPT-2's V)."""
    if isinstance(generator, RowGenerators):
        counts = selected.flatten(1).sum(-1).tolist()  # (B,) rows of logits per sequence
        pieces = logits.split(counts)
        return torch.cat([gumbel_argmax(piece, mask_id, g, rows_per_chunk)
                          for piece, g in zip(pieces, generator.generators)])
    out = []
    for chunk in logits.split(rows_per_chunk):
        chunk = chunk.to(torch.float64, copy=True)
        chunk[:, mask_id] = float("-inf")  # SUBS: MASK is never a token
        u = torch.rand(chunk.shape, generator=generator, device=chunk.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
        out.append((chunk + gumbel).argmax(-1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=logits.device)


def time_grid(num_steps: int) -> list[float]:
    """t_0 = 1 > t_1 > ... > t_N = 0, evenly spaced: step k goes from t_k to t_{k+1}."""
    return [1.0 - k / num_steps for k in range(num_steps + 1)]


def _noise(schedule: MaskingSchedule, t: float, batch: int, device) -> torch.Tensor:
    return schedule.total_noise(torch.full((batch,), t, device=device, dtype=torch.float32))


def _mask_prob(schedule: MaskingSchedule, t: float) -> float:
    return float(schedule.mask_prob(torch.tensor(t, dtype=torch.float64)))


def _steps(x: torch.Tensor, num_steps: int, step_offset: int, on_step: StepCallback | None, progress: Any):
    """(k, t, s) for each step of the grid, t_k -> t_{k+1}; after each, the canvas x (updated in place by the
    sampler) goes to `on_step` and the progress bar moves."""
    grid = time_grid(num_steps)
    for k in range(num_steps):
        yield k, grid[k], grid[k + 1]
        if on_step is not None:
            on_step(step_offset + k, x)
        if progress is not None:
            progress.update(1)


@torch.no_grad()
def ancestral(
    network: Network,
    x: torch.Tensor,
    *,
    schedule: MaskingSchedule,
    mask_id: int,
    num_steps: int,
    generator: Generator = None,
    cache: bool = False,
    step_offset: int = 0,
    on_step: StepCallback | None = None,
    progress: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MDLM's reverse process over `num_steps` steps. x (B, L) -> (x decoded, decode_step (B, L))."""
    x = x.clone()
    decode_step = torch.full_like(x, -1)
    B = x.shape[0]
    for k, t, s in _steps(x, num_steps, step_offset, on_step, progress):
        noise = _noise(schedule, t, B, x.device)
        # p(still masked at s | masked at t) = mask_prob(s) / mask_prob(t): s / t for the log-linear schedule.
        p_unmask = 1.0 - _mask_prob(schedule, s) / _mask_prob(schedule, t)
        u = uniform(x.shape, generator, x.device)  # (B, L)
        unmask = (x == mask_id) & (u < p_unmask)  # (B, L)
        decoding = bool(unmask.any())
        if decoding or not cache:  # without the cache, MDLM's ddpm_update: one call per step, whatever it decodes
            logits = network.logits(x, noise, unmask)
        if decoding:
            x[unmask] = gumbel_argmax(logits, mask_id, generator, selected=unmask)
            decode_step[unmask] = step_offset + k
    return x, decode_step


def confidence_schedule(num_masked: torch.Tensor, schedule: MaskingSchedule, t: float) -> torch.Tensor:
    """How many of `num_masked` (B,) initially masked positions are still masked at time t (B,) long."""
    fraction = _mask_prob(schedule, t) / _mask_prob(schedule, 1.0)
    return torch.round(num_masked.double() * fraction).long()


def _max_log_prob(logits: torch.Tensor, mask_id: int, rows_per_chunk: int = 2048) -> torch.Tensor:
    """log max_v p(v) over the real tokens, (M, V) -> (M,) float32, a chunk of rows at a time (memory)."""
    out = []
    for chunk in logits.split(rows_per_chunk):
        chunk = chunk.float()
        chunk[..., mask_id] = float("-inf")
        out.append(chunk.amax(-1) - torch.logsumexp(chunk, -1))
    return torch.cat(out)


def _most_likely(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """argmax over the real tokens, (M, V) -> (M,) long."""
    best = logits.argmax(-1)
    if (best == mask_id).any():  # MASK is never a token: take the best of the rest
        masked = logits.clone()
        masked[:, mask_id] = float("-inf")
        best = masked.argmax(-1)
    return best


@torch.no_grad()
def confidence(
    network: Network,
    x: torch.Tensor,
    *,
    schedule: MaskingSchedule,
    mask_id: int,
    num_steps: int,
    generator: Generator = None,
    cache: bool = False,
    step_offset: int = 0,
    on_step: StepCallback | None = None,
    progress: Any = None,
    importance: Importance | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence-ordered decoding: the scheduled count per step, most confident positions first (or, with
    `importance`, the positions whose predicted token the estimator rates least important first)."""
    x = x.clone()
    decode_step = torch.full_like(x, -1)
    B, L = x.shape
    num_initial = (x == mask_id).sum(-1)  # (B,)
    positions = torch.arange(L, device=x.device).expand(B, L)
    for k, t, s in _steps(x, num_steps, step_offset, on_step, progress):
        masked = x == mask_id  # (B, L)
        count = masked.sum(-1) - confidence_schedule(num_initial, schedule, s)  # (B,): to unmask this step
        rows = count > 0
        if rows.any():
            candidates = masked & rows[:, None]  # (B, L): every position that may be chosen this step
            logits = network.logits(x, _noise(schedule, t, B, x.device), candidates)  # (M, V)
            score = torch.full((B, L), float("-inf"), device=x.device)
            if importance is None:
                score[candidates] = _max_log_prob(logits, mask_id)
            else:  # easy-first: the estimator reads the current prediction of x0
                x0_hat = x.clone()
                x0_hat[candidates] = _most_likely(logits, mask_id)
                rated = importance(x0_hat, torch.full((B,), t, device=x.device)).float()  # (B, L)
                score[candidates] = -rated[candidates]
            order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # (B, L): most confident first
            rank = torch.empty_like(order).scatter_(1, order, positions)  # (B, L): each position's rank
            chosen = masked & (rank < count[:, None])
            x[chosen] = gumbel_argmax(logits[chosen[candidates]], mask_id, generator, selected=chosen)
            decode_step[chosen] = step_offset + k
    return x, decode_step


@torch.no_grad()
def autoregressive(
    network: Network,
    x: torch.Tensor,
    *,
    mask_id: int,
    generator: Generator = None,
    step_offset: int = 0,
    on_step: StepCallback | None = None,
    progress: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left to right with a causal model: each masked position i drawn from p(x_i | x_<i). x[:, 0] is given."""
    x = x.clone()
    decode_step = torch.full_like(x, -1)
    B, L = x.shape
    if (x[:, 0] == mask_id).any():
        raise ValueError("autoregressive sampling needs a given first token (BOS) to condition on")
    step = step_offset
    for i in range(1, L):
        need = x[:, i] == mask_id  # (B,)
        if not need.any():
            continue
        last = torch.zeros((B, i), dtype=torch.bool, device=x.device)
        last[:, -1] = need  # p(x_i | x_<i) is read at position i - 1
        logits = network.logits(x[:, :i], torch.zeros(B, device=x.device), last)  # (rows in need, V)
        x[need, i] = gumbel_argmax(logits, mask_id, generator, selected=need[:, None])
        decode_step[need, i] = step
        if on_step is not None:
            on_step(step, x)
        if progress is not None:
            progress.update(1)
        step += 1
    return x, decode_step


def windows(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) windows of `window` positions covering `length`, `stride` apart; the last ends at `length`."""
    if length <= window:
        return [(0, length)]
    starts = list(range(0, length - window, stride)) + [length - window]
    return [(a, a + window) for a in starts]


def count_steps(sampler: str, canvas: torch.Tensor, mask_id: int, num_steps: int, window: int, stride: int) -> int:
    """Steps `generate` will take (for a progress bar)."""
    spans = windows(canvas.shape[1], window, stride)
    if sampler in AR_SAMPLERS:
        # Each position masked in any row is one step, windows in order (a later window finds earlier ones done).
        return int((canvas == mask_id).any(0).sum())
    return len(spans) * num_steps


@torch.no_grad()
def generate(
    model: Any,
    canvas: torch.Tensor,
    *,
    sampler: str,
    num_steps: int,
    schedule: MaskingSchedule,
    mask_id: int,
    head: Sequence[int] = (),
    tail: Sequence[int] = (),
    window: int | None = None,
    stride: int | None = None,
    generator: Generator = None,
    autocast: contextlib.AbstractContextManager | None = None,
    on_step: StepCallback | None = None,
    progress: Any = None,
    importance: Importance | None = None,
) -> SampleOutput:
    """Decode every MASK of `canvas` (B, N) with `sampler`; the model sees head + canvas[:, window] + tail.

    `head` / `tail` are the framing ids every training block had (e.g. [BOS] ... [EOS]); `window` is how many
    canvas positions fit between them in one block (default: all of N). Only `semi-ar` and `ar` go beyond one
    window; `stride` (default window // 2) is how far each window moves on. `importance` (confidence only): an
    (x0, t) -> (B, L) rating, ATAT's estimator, for easy-first order.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if importance is not None and sampler != "confidence":
        raise ValueError(f"sampler {sampler!r}: only confidence orders positions by importance")
    B, N = canvas.shape
    window = window or N
    stride = stride or max(1, window // 2)
    if N > window and sampler not in ("semi-ar", "ar"):
        raise ValueError(
            f"length {N} is beyond the model's block ({window} tokens between the framing); use the semi-ar sampler"
        )
    time_conditioned = bool(getattr(model, "time_conditioning", False))
    cache = sampler in ("ancestral-cache", "semi-ar", "confidence") and not time_conditioned
    network = Network(model, cache=cache, autocast=autocast)
    inner = {"ancestral": ancestral, "ancestral-cache": ancestral, "semi-ar": ancestral,
             "confidence": confidence, "ar": autoregressive}[sampler]
    device = canvas.device
    head_ids = torch.tensor(list(head), dtype=canvas.dtype, device=device).expand(B, -1)
    tail_ids = torch.tensor(list(tail), dtype=canvas.dtype, device=device).expand(B, -1)
    tokens = canvas.clone()
    decode_step = torch.full_like(tokens, -1)
    steps_taken = 0
    for a, b in windows(N, window, stride):
        if not (tokens[:, a:b] == mask_id).any():
            continue
        x = torch.cat([head_ids, tokens[:, a:b], tail_ids], dim=1)  # (B, len(head) + b - a + len(tail))
        network.reset()  # a new window: cached logits belong to other positions
        out, steps = inner(
            network, x, schedule=schedule, mask_id=mask_id, num_steps=num_steps, generator=generator,
            cache=cache, step_offset=steps_taken, on_step=on_step, progress=progress,
            **({"importance": importance} if importance is not None else {}),
        )
        inside = slice(len(head), len(head) + b - a)
        tokens[:, a:b] = out[:, inside]
        decoded = steps[:, inside] >= 0
        decode_step[:, a:b] = torch.where(decoded, steps[:, inside], decode_step[:, a:b])
        steps_taken = int(steps.max()) + 1 if sampler in AR_SAMPLERS and (steps >= 0).any() else steps_taken + num_steps
    return SampleOutput(
        tokens=tokens,
        decode_step=decode_step,
        num_steps=steps_taken,
        num_network_calls=network.num_calls,
        num_sequence_evals=network.num_sequence_evals,
        cache=cache,
    )
