"""The MDLM objective and the evaluation bound (DESIGN 3.1, 3.5)."""

import math

import pytest
import torch

from mdlm_atat.config import ModelConfig
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective, mask_draws, masked_token_nll
from mdlm_atat.diffusion.schedule import LogLinearSchedule
from mdlm_atat.eval.likelihood import evaluate_bound
from mdlm_atat.models import DiT

EPS = 1e-3


def subs_reference(logits, x0, x_t, mask_id):
    """MDLM's literal SUBS parameterisation over the whole (B, L, V) tensor, then -log p(x0 | x_t)."""
    logits = logits.double().clone()
    logits[:, :, mask_id] = -1e9
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    unmasked = x_t != mask_id
    logp[unmasked] = -1e9
    logp[unmasked, x_t[unmasked]] = 0.0
    return -logp.gather(-1, x0[..., None]).squeeze(-1)


def test_masked_nll_equals_subs_reference():
    gen = torch.Generator().manual_seed(0)
    V, mask_id = 50, 50
    logits = torch.randn(4, 16, V + 1, generator=gen) * 3
    x0 = torch.randint(0, V, (4, 16), generator=gen)
    masked = torch.rand(4, 16, generator=gen) < 0.5
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    ours = masked_token_nll(logits, x0, masked, mask_id)
    torch.testing.assert_close(ours.double(), subs_reference(logits, x0, x_t, mask_id), rtol=1e-6, atol=1e-6)


def test_hand_computed_three_token_example():
    # V = 3 real tokens, MASK = 3. x0 = [0, 1, 2]; at t = 0.5 positions 0 and 2 are masked.
    class Fixed(torch.nn.Module):
        def forward(self, x_t, noise):
            return torch.tensor([[[1.0, 2.0, 0.0, 5.0], [7.0, 7.0, 7.0, 7.0], [0.0, 0.0, 0.0, 9.0]]])

    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=3)
    x0 = torch.tensor([[0, 1, 2]])
    noise = torch.tensor([[0.1, 0.9, 0.2]])  # masked where noise < (1 - eps) * 0.5
    terms = objective(Fixed(), x0, t=torch.tensor([0.5]), uniform_noise=noise)
    nll_0 = math.log(math.e + math.e**2 + 1.0) - 1.0  # MASK logit (5) excluded
    nll_2 = math.log(3.0)  # uniform over the 3 real tokens
    expected = (1 / 0.5) * (nll_0 + nll_2) / 3  # weight 1/t, divided by all 3 tokens
    assert terms.num_masked.item() == 2
    assert terms.num_tokens.item() == 3
    assert terms.loss.item() == pytest.approx(expected, rel=1e-6)
    assert terms.token_loss[0, 1].item() == 0.0


def test_unmasked_positions_contribute_exactly_zero():
    gen = torch.Generator().manual_seed(1)
    V = 20
    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V)
    x0 = torch.randint(0, V, (3, 12), generator=gen)
    logits = torch.randn(3, 12, V + 1, generator=gen, requires_grad=True)
    noise = torch.rand(3, 12, generator=gen)
    t = torch.tensor([0.2, 0.5, 0.9])
    terms = objective(lambda x_t, s: logits, x0, t=t, uniform_noise=noise)
    unmasked = ~(noise < (1 - EPS) * t[:, None])
    assert unmasked.any()
    assert torch.all(terms.token_loss[unmasked] == 0)
    terms.loss.backward()
    assert torch.all(logits.grad[unmasked] == 0)  # no gradient through carried-over tokens
    # Changing the logits at unmasked positions does not change the loss at all.
    other = logits.detach().clone()
    other[unmasked] = torch.randn_like(other[unmasked]) * 10
    again = objective(lambda x_t, s: other, x0, t=t, uniform_noise=noise)
    assert again.loss.item() == terms.loss.item()


def test_padding_is_never_masked_and_not_counted():
    V = 10
    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V)
    x0 = torch.randint(0, V, (2, 8))
    attention = torch.ones(2, 8, dtype=torch.bool)
    attention[1, 5:] = False
    x_t, masked = objective.corrupt(x0, torch.tensor([1.0, 1.0]), attention)
    assert not masked[1, 5:].any() and masked[attention].float().mean() > 0.9
    terms = objective(lambda x_t, s: torch.zeros(2, 8, V + 1), x0, t=torch.tensor([1.0, 1.0]), attention_mask=attention)
    assert terms.num_tokens.item() == 13


def test_antithetic_t_is_stratified():
    schedule = LogLinearSchedule(EPS)
    for seed in range(5):
        B = 16
        t = schedule.sample_t(B, antithetic=True, generator=torch.Generator().manual_seed(seed))
        assert t.min() >= EPS and t.max() < 1.0
        strata = torch.floor((t.double() - EPS) / (1 - EPS) * B).long()
        assert sorted(strata.tolist()) == list(range(B))  # exactly one t in each of B equal strata


def test_schedule_weight_is_mdlm_continuous_time_weight():
    schedule = LogLinearSchedule(EPS)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    sigma = schedule.total_noise(t)
    dsigma = (1 - EPS) / (1 - (1 - EPS) * t)  # d sigma / dt of the log-linear schedule
    torch.testing.assert_close(dsigma / torch.expm1(sigma), schedule.loss_weight(t))
    torch.testing.assert_close(1 - torch.exp(-sigma), schedule.mask_prob(t))


def random_token_batches(V, num_batches=4, batch=64, length=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (batch, length), generator=gen) for _ in range(num_batches)]


def tiny_dit(num_tokens):
    return DiT(ModelConfig(hidden_dim=32, num_layers=2, num_heads=2, cond_dim=16, dropout=0.0), num_tokens)


def test_untrained_model_loss_is_log_vocab():
    """Zero-initialised output layer: every real token equally likely, so E[loss] = (1 - eps) ln V."""
    V = 1000
    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V)
    result = evaluate_bound(tiny_dit(V + 1), objective, random_token_batches(V), num_t=8, seed=0)
    assert result.nelbo == pytest.approx((1 - EPS) * math.log(V), rel=0.01)
    # And training-style batches with antithetic t agree too. One batch's loss has a heavy tail (a token masked
    # at t near eps weighs 1/t): its sd over seeds is 0.08 (1.2%), so the mean of 8 has sd 0.4% against 2%.
    torch.manual_seed(0)
    model = tiny_dit(V + 1)
    losses = [objective(model, torch.randint(0, V, (512, 64))).loss.item() for _ in range(8)]
    assert sum(losses) / len(losses) == pytest.approx((1 - EPS) * math.log(V), rel=0.02)


def test_eval_is_deterministic_and_more_t_shrinks_the_error():
    V = 100
    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V)
    model = tiny_dit(V + 1)
    batches = random_token_batches(V, num_batches=2, batch=32, length=32)
    a = evaluate_bound(model, objective, batches, num_t=2, seed=3)
    b = evaluate_bound(model, objective, batches, num_t=2, seed=3)
    assert a == b
    many = evaluate_bound(model, objective, batches, num_t=16, seed=3)
    assert many.stderr < a.stderr
    assert a.num_tokens == 2 * 32 * 32 and a.ppl == pytest.approx(math.exp(a.nelbo))
    assert a.bits_per_token == pytest.approx(a.nelbo / math.log(2))


def test_eval_does_not_touch_global_rng():
    V = 50
    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V)
    model, batches = tiny_dit(V + 1), random_token_batches(V, 1, 4, 16)
    state = torch.get_rng_state()
    evaluate_bound(model, objective, batches, num_t=2)
    assert torch.equal(state, torch.get_rng_state())


def test_rows_only_projection_matches_full_logits():
    """The DiT projecting only the masked rows gives the loss of the full (B, L, V) logits."""
    V = 40
    torch.manual_seed(0)
    model = tiny_dit(V + 1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x0 = torch.randint(0, V, (4, 24))
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    noise = torch.rand(4, 24)
    full = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V)(model, x0, t=t, uniform_noise=noise)
    rows = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V, rows_only=True)(model, x0, t=t, uniform_noise=noise)
    torch.testing.assert_close(rows.token_loss, full.token_loss, rtol=1e-5, atol=1e-6)
    assert rows.num_masked == full.num_masked


def finer_than_float32(u: torch.Tensor) -> float:
    """The fraction of draws that are not multiples of 2^-24, the spacing of float32 uniforms in [0, 1)."""
    return ((u.double() * 2**24) % 1 != 0).double().mean().item()


def test_mask_draws_resolve_probabilities_below_float32_spacing():
    """Issue D3: a tilted p_i can be ~1e-7 near t = eps while its weight is 1/p_i, so u < p_i must be exact there;
    float32 uniforms (multiples of 2^-24) masked a p = 1.2e-7 token 1.49x too often."""
    u = mask_draws((1 << 16,), generator=torch.Generator().manual_seed(0))
    assert u.dtype == torch.float64 and finer_than_float32(u) > 0.99
    # The objective's own draw (no uniform_noise given) is that draw: same generator state, same masks.
    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=7)
    x0 = torch.zeros(64, 256, dtype=torch.long)
    probs = torch.full((64, 256), 2.0**-30)
    probs[:, ::2] = 0.5
    _, masked = objective.corrupt(x0, torch.full((64,), 0.5), generator=torch.Generator().manual_seed(3), mask_probs=probs)
    expected = mask_draws(x0.shape, generator=torch.Generator().manual_seed(3)) < probs
    assert torch.equal(masked, expected)
