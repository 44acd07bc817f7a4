"""Masking schedules (diffusion/schedule.py): one interface for the loss, the bound, adaptive masking and the
samplers; a second schedule chosen by `diffusion.schedule`."""

import math

import pytest
import torch

from mdlm_atat.config import SCHEDULE_NAMES, ConfigError, ModelConfig, load_config
from mdlm_atat.diffusion.masking import standardize, tilted_mask_probs
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective
from mdlm_atat.diffusion.samplers import generate
from mdlm_atat.diffusion.schedule import SCHEDULES, CosineSchedule, LogLinearSchedule, build_schedule
from mdlm_atat.eval.likelihood import evaluate_bound
from mdlm_atat.models import DiT
from mdlm_atat.run import make_objective

EPS = 1e-3


def test_every_configured_name_has_a_schedule_and_the_config_picks_it():
    assert set(SCHEDULES) == set(SCHEDULE_NAMES)
    for schedule in SCHEDULES.values():  # atat eval's JSON and the model card say each in words
        assert schedule.title and "{eps}" in schedule.alpha_formula
    cfg = load_config(None, ["diffusion.schedule=cosine"])
    objective = make_objective(cfg, type("Tok", (), {"mask_id": 7})())
    assert isinstance(objective.schedule, CosineSchedule) and objective.schedule.eps == cfg.diffusion.eps
    with pytest.raises(ConfigError, match="diffusion.schedule"):
        load_config(None, ["diffusion.schedule=linear-ish"])


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_identities(name):
    """alpha from 0 to 1 - eps, increasing; sigma = -log(1 - alpha); the weight is alpha'/alpha (checked against
    a finite difference in float64) and equals MDLM's sigma'/expm1(sigma)."""
    schedule = build_schedule(name, EPS)
    t = torch.linspace(1e-3, 1.0, 2001, dtype=torch.float64)
    alpha = schedule.mask_prob(t)
    assert schedule.mask_prob(torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-15)
    assert alpha[-1].item() == pytest.approx(1 - EPS, rel=1e-12)
    assert torch.all(alpha[1:] > alpha[:-1])
    torch.testing.assert_close(schedule.total_noise(t), -torch.log1p(-alpha))
    h = 1e-6
    numeric = (schedule.mask_prob(t + h) - schedule.mask_prob(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.mask_prob_derivative(t), numeric, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(schedule.loss_weight(t), numeric / alpha, rtol=1e-6, atol=0)
    sigma = schedule.total_noise(t)
    dsigma = schedule.mask_prob_derivative(t) / (1 - alpha)
    torch.testing.assert_close(schedule.loss_weight(t), dsigma / torch.expm1(sigma), rtol=1e-9, atol=0)


def test_loglinear_is_mdlms_and_cosine_masks_less_early():
    t = torch.tensor([0.1, 0.5, 0.9])
    loglinear, cosine = LogLinearSchedule(EPS), CosineSchedule(EPS)
    assert torch.equal(loglinear.mask_prob(t), (1 - EPS) * t) and torch.equal(loglinear.loss_weight(t), 1 / t)
    assert torch.all(cosine.mask_prob(t[:2]) < loglinear.mask_prob(t[:2]))
    # MDLM's CosineNoise: sigma(t) = -log(eps + (1 - eps) cos(pi t / 2)).
    torch.testing.assert_close(cosine.total_noise(t), -torch.log(EPS + (1 - EPS) * torch.cos(math.pi * t / 2)))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_untrained_bound_follows_the_schedule(name):
    """A zero output layer predicts uniformly over V tokens, so the bound is ln V times E_t[alpha'(t)] over
    t ~ U[eps, 1): (alpha(1) - alpha(eps)) / (1 - eps) ln V; exactly (1 - eps) ln V for log-linear."""
    V = 200
    schedule = build_schedule(name, EPS)
    objective = MaskedDiffusionObjective(schedule, mask_id=V)
    model = DiT(ModelConfig(hidden_dim=16, num_layers=1, num_heads=2, cond_dim=8, dropout=0.0), V + 1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, V, (16, 32), generator=gen) for _ in range(4)]
    result = evaluate_bound(model, objective, batches, num_t=32, seed=0)
    ends = schedule.mask_prob(torch.tensor([EPS, 1.0], dtype=torch.float64))
    expected = float(ends[1] - ends[0]) / (1 - EPS) * math.log(V)
    assert result.nelbo == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_tilted_masks_and_samplers_use_the_schedule(name):
    schedule = build_schedule(name, EPS)
    t = torch.tensor([0.3, 1.0])
    z = standardize(torch.randn(2, 16, generator=torch.Generator().manual_seed(0)))
    p = tilted_mask_probs(schedule, t, z, 1.0, balanced=True)
    torch.testing.assert_close(p.mean(-1), schedule.mask_prob(t), atol=1e-5, rtol=0)
    assert torch.all(p[1] == schedule.mask_prob(t[1:]))
    V = 20
    model = DiT(ModelConfig(hidden_dim=16, num_layers=1, num_heads=2, cond_dim=8, dropout=0.0), V + 1).eval()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.2)
    canvas = torch.full((64, 64), V)
    out = generate(model, canvas, sampler="ancestral", num_steps=4, schedule=schedule, mask_id=V,
                   generator=torch.Generator().manual_seed(1))
    assert not (out.tokens == V).any()
    # The first step, t = 1 -> 0.75, decodes a masked token with probability 1 - alpha(0.75) / alpha(1):
    # 0.25 for log-linear, cos(3 pi / 8) = 0.383 for cosine.
    expected = 1 - float(schedule.mask_prob(torch.tensor(0.75)) / schedule.mask_prob(torch.tensor(1.0)))
    first = (out.decode_step == 0).double().mean().item()
    assert abs(first - expected) < 4 * math.sqrt(expected * (1 - expected) / canvas.numel())
    confident = generate(model, canvas, sampler="confidence", num_steps=4, schedule=schedule, mask_id=V)
    still_masked = round(64 * (1 - expected))  # per row: the confidence sampler's count at t = 0.75
    assert torch.all((confident.decode_step == 0).sum(-1) == 64 - still_masked)
