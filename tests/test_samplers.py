"""Samplers (DESIGN 3.6): no MASK out, decoded tokens never change, given text kept, the confidence schedule,
semi-ar lengths, the cache's equivalence, float64 draws. Tiny random-weight models: no training needed."""

from __future__ import annotations

import pytest
import torch

from mdlm_atat.config import ModelConfig
from mdlm_atat.diffusion.samplers import (
    Network,
    confidence_schedule,
    generate,
    gumbel_argmax,
    time_grid,
    windows,
)
from mdlm_atat.diffusion.schedule import LogLinearSchedule
from mdlm_atat.models.ar import causal_dit
from mdlm_atat.models.dit import DiT

from test_dit import padded_copy

V = 40  # real tokens; MASK = V
MASK = V
BOS, EOS = 0, 1
SCHEDULE = LogLinearSchedule(1e-3)


def random_model(
    causal: bool = False, time_conditioning: bool = False, seed: int = 0, pad_vocab_multiple: int = 64
) -> torch.nn.Module:
    cfg = ModelConfig(hidden_dim=32, num_layers=2, num_heads=2, cond_dim=16, dropout=0.0,
                      time_conditioning=time_conditioning, pad_vocab_multiple=pad_vocab_multiple)
    torch.manual_seed(seed)
    model = causal_dit(cfg, V + 1) if causal else DiT(cfg, V + 1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off MDLM's zero init, so that predictions depend on the input
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def canvas(batch: int, length: int, given: dict[int, int] | None = None) -> torch.Tensor:
    x = torch.full((batch, length), MASK)
    for pos, tok in (given or {}).items():
        x[:, pos] = tok
    return x


def run(model, x, sampler, num_steps=20, seed=0, window=None, stride=None, on_step=None):
    return generate(
        model, x, sampler=sampler, num_steps=num_steps, schedule=SCHEDULE, mask_id=MASK, head=[BOS], tail=[EOS],
        window=window, stride=stride, generator=torch.Generator().manual_seed(seed), on_step=on_step,
    )


GIVEN = {0: 5, 1: 6, 2: 7, 10: 8, 11: 9}  # a prefix and a span in the middle (infill)
CASES = [("ancestral", False, None), ("ancestral-cache", False, None), ("confidence", False, None),
         ("semi-ar", False, 8), ("ar", True, None), ("ar", True, 8)]


@pytest.mark.parametrize("sampler,causal,window", CASES)
def test_no_mask_out_and_given_positions_kept(sampler, causal, window):
    model = random_model(causal=causal)
    x = canvas(3, 20, GIVEN)
    out = run(model, x, sampler, window=window)
    assert out.tokens.shape == (3, 20)
    assert not (out.tokens == MASK).any()
    for pos, tok in GIVEN.items():
        assert (out.tokens[:, pos] == tok).all()
        assert (out.decode_step[:, pos] == -1).all()
    generated = torch.ones(20, dtype=torch.bool)
    generated[list(GIVEN)] = False
    assert (out.decode_step[:, generated] >= 0).all()  # every generated position records its step


@pytest.mark.parametrize("sampler,causal,window", CASES)
def test_padding_ids_are_never_sampled(sampler, causal, window):
    """A model with vocabulary padding rows (garbage in them, their logits 1e4, far above every real one) samples
    exactly what the same model without them does: no padding id ever comes out (the samplers see num_tokens
    columns, through `project` or the logits)."""
    plain = random_model(causal=causal, pad_vocab_multiple=1)
    padded = padded_copy(plain)  # 41 real rows, 64 in all
    x = canvas(3, 20, GIVEN)
    expected, out = run(plain, x, sampler, window=window), run(padded, x, sampler, window=window)
    assert out.tokens.max() < MASK  # real tokens only: neither MASK nor a padding id (> MASK)
    assert torch.equal(out.tokens, expected.tokens) and torch.equal(out.decode_step, expected.decode_step)


@pytest.mark.parametrize("sampler,causal", [("ancestral", False), ("ancestral-cache", False),
                                            ("confidence", False), ("ar", True)])
def test_decoded_tokens_never_change_and_never_remask(sampler, causal):
    states = []
    out = run(random_model(causal=causal), canvas(4, 16, {0: 3}), sampler, num_steps=12,
              on_step=lambda step, x: states.append(x.clone()))
    assert len(states) >= 2
    for before, after in zip(states, states[1:]):
        decoded = before != MASK
        assert torch.equal(after[decoded], before[decoded])  # what was decoded stays, MASK never comes back
    # The window's framing (BOS ... EOS) is part of what the sampler sees and is never touched either.
    assert (states[-1][:, 0] == BOS).all() and (states[-1][:, -1] == EOS).all()
    assert torch.equal(states[-1][:, 1:-1], out.tokens)


def test_confidence_unmasks_exactly_the_scheduled_count():
    states = []
    num_steps = 7
    x = canvas(3, 25, {4: 2, 5: 3})
    run(random_model(), x, "confidence", num_steps=num_steps, on_step=lambda step, x: states.append(x.clone()))
    initial = (x == MASK).sum(-1)  # (B,) 23 each
    grid = time_grid(num_steps)
    masked_before = initial
    for k, state in enumerate(states):
        masked_after = (state[:, 1:-1] == MASK).sum(-1)
        expected_left = confidence_schedule(initial, SCHEDULE, grid[k + 1])
        assert torch.equal(masked_after, expected_left), k
        assert (masked_before - masked_after >= 0).all()
        masked_before = masked_after
    assert (masked_before == 0).all()
    assert confidence_schedule(initial, SCHEDULE, 1.0).tolist() == initial.tolist()


def test_confidence_picks_the_most_confident_positions():
    class Peaked(torch.nn.Module):
        """Position i predicts token 2 with a confidence that grows with i: the last positions go first."""

        def forward(self, x, noise):
            B, L = x.shape
            logits = torch.zeros(B, L, V + 1)
            logits[:, :, 2] = torch.arange(L, dtype=torch.float32)
            return logits

    states = []
    run(Peaked(), canvas(1, 10), "confidence", num_steps=10, on_step=lambda step, x: states.append(x.clone()))
    first = (states[0][0, 1:-1] != MASK).nonzero().squeeze(-1).tolist()
    assert first == [9]  # one position a step (10 tokens, 10 steps): the most confident one


def test_semi_ar_reaches_the_requested_length():
    model = random_model()
    x = canvas(2, 45, {0: 5, 1: 6})
    out = run(model, x, "semi-ar", num_steps=5, window=12, stride=5)
    assert out.tokens.shape == (2, 45) and not (out.tokens == MASK).any()
    assert out.tokens[:, :2].tolist() == [[5, 6], [5, 6]]
    spans = windows(45, 12, 5)
    assert spans[0] == (0, 12) and spans[-1] == (33, 45)
    assert all(b - a == 12 for a, b in spans)  # every window is a full block
    assert all(b2 - b1 <= 5 for (_, b1), (_, b2) in zip(spans, spans[1:]))  # each conditions on the previous tail
    assert out.num_steps == len(spans) * 5


def test_beyond_the_block_needs_semi_ar():
    with pytest.raises(ValueError, match="semi-ar"):
        run(random_model(), canvas(1, 30), "ancestral", window=12)


def test_ancestral_cache_gives_the_same_samples_with_fewer_calls():
    model = random_model(time_conditioning=False)
    x = canvas(4, 12, {0: 3})
    plain = run(model, x, "ancestral", num_steps=40, seed=7)
    cached = run(model, x, "ancestral-cache", num_steps=40, seed=7)
    assert torch.equal(plain.tokens, cached.tokens)
    assert torch.equal(plain.decode_step, cached.decode_step)
    assert cached.cache and not plain.cache
    assert plain.num_network_calls == 40
    assert cached.num_network_calls < plain.num_network_calls
    assert cached.num_sequence_evals < plain.num_sequence_evals
    # More steps than tokens: most steps decode nothing, and the cache skips them.
    assert cached.num_sequence_evals <= 4 * 12 + 4


def test_ancestral_cache_falls_back_with_time_conditioning():
    model = random_model(time_conditioning=True)
    x = canvas(2, 10)
    plain = run(model, x, "ancestral", num_steps=15, seed=1)
    cached = run(model, x, "ancestral-cache", num_steps=15, seed=1)
    assert not cached.cache
    assert torch.equal(plain.tokens, cached.tokens)
    assert cached.num_network_calls == plain.num_network_calls == 15


def test_ancestral_unmasks_at_the_schedule_rate_and_decodes_everything_at_the_end():
    class Uniform(torch.nn.Module):
        def forward(self, x, noise):
            return torch.zeros(*x.shape, V + 1)

    states = []
    num_steps = 4
    x = canvas(8, 500)
    run(Uniform(), x, "ancestral", num_steps=num_steps, on_step=lambda step, x: states.append(x.clone()))
    # Masked at t_k = 1 - k/4 after step k-1: p(still masked) = mask_prob(t_k) / mask_prob(1) = t_k.
    for k, state in enumerate(states[:-1], start=1):
        fraction = (state[:, 1:-1] == MASK).double().mean().item()
        assert fraction == pytest.approx(1 - k / num_steps, abs=0.02), k
    assert not (states[-1] == MASK).any()  # the last step (to s = 0) decodes what is left


def test_one_step_decodes_everything():
    out = run(random_model(), canvas(2, 9), "ancestral", num_steps=1)
    assert not (out.tokens == MASK).any() and (out.decode_step == 0).all()


def test_gumbel_draws_follow_the_distribution_and_never_emit_mask():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = torch.full((20_000, V + 1), float("-inf"))
    logits[:, :4] = probs.log()
    logits[:, MASK] = 50.0  # MASK would win every draw if it were allowed
    draws = gumbel_argmax(logits, MASK, torch.Generator().manual_seed(0))
    assert not (draws == MASK).any()
    freq = torch.bincount(draws, minlength=V + 1)[:4].double() / draws.numel()
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)


def test_network_cache_recomputes_only_changed_rows():
    calls = []

    class Recording(torch.nn.Module):
        def forward(self, x, noise):
            calls.append(x.shape[0])
            return torch.zeros(*x.shape, V + 1)

    net = Network(Recording(), cache=True)
    assert not net.split  # a plain model: full logits, indexed
    x = canvas(3, 6)
    noise = torch.zeros(3)
    net.outputs(x, noise)
    net.outputs(x, noise)  # nothing changed: no call
    x[1, 2] = 4
    net.outputs(x, noise)  # row 1 changed: one call, one row
    x[0, 0] = 4
    net.outputs(x, noise, rows=torch.tensor([False, True, True]))  # row 0 changed but is not needed
    assert calls == [3, 1]


def test_network_projects_only_the_positions_asked_for():
    model = random_model()
    projected = []
    project = model.project
    model.project = lambda h: projected.append(h.shape[0]) or project(h)
    x = canvas(2, 12, GIVEN)
    noise = torch.zeros(2)
    where = torch.zeros(2, 12, dtype=torch.bool)
    where[0, 4], where[1, 7], where[1, 8] = True, True, True
    for cache in (False, True):
        net = Network(model, cache=cache)
        assert net.split
        logits = net.logits(x, noise, where)  # (3, V + 1): three positions, in row-major order
        torch.testing.assert_close(logits, model(x, noise)[where])
    assert projected == [3, 3]  # never the whole (2, 12) canvas


def test_easy_first_decodes_the_least_important_positions_first():
    seen = []

    def importance(x0, t):  # the position itself: easy-first must go left to right
        seen.append(x0.clone())
        return torch.arange(x0.shape[1], dtype=torch.float32).expand(x0.shape[0], -1)

    x = canvas(2, 12, {3: 7})
    out = generate(random_model(), x, sampler="confidence", num_steps=6, schedule=SCHEDULE, mask_id=MASK,
                   head=[BOS], tail=[EOS], generator=torch.Generator().manual_seed(0), importance=importance)
    assert not (out.tokens == MASK).any() and (out.tokens[:, 3] == 7).all()
    steps = out.decode_step
    for row in steps:
        decoded = row[row >= 0]  # generated positions, left to right
        assert (decoded[1:] >= decoded[:-1]).all()  # never a later position before an earlier one
    # The estimator reads a full prediction of x0: no MASK inside the block, the framing and given token kept.
    assert seen and all(not (x0[:, 1:-1] == MASK).any() for x0 in seen)
    assert all((x0[:, 0] == BOS).all() and (x0[:, 4] == 7).all() for x0 in seen)


def test_importance_order_is_for_the_confidence_sampler_only():
    with pytest.raises(ValueError, match="only confidence"):
        generate(random_model(), canvas(1, 8), sampler="ancestral", num_steps=4, schedule=SCHEDULE, mask_id=MASK,
                 importance=lambda x0, t: torch.zeros(x0.shape))
