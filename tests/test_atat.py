"""ATAT (DESIGN 3.2-3.4): estimator, adaptive masking, curriculum, and their wiring into the trainer."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mdlm_atat.config import AtatConfig, ConfigError, ModelConfig, load_config
from mdlm_atat.diffusion.atat import AtatTraining
from mdlm_atat.diffusion.curriculum import Curriculum
from mdlm_atat.diffusion.masking import standardize, tilted_mask_probs
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective
from mdlm_atat.diffusion.schedule import LogLinearSchedule
from mdlm_atat.eval.diagnostics import spearman_rows, tie_ranks
from mdlm_atat.models import DiT
from mdlm_atat.models.importance import ImportanceEstimator, estimator_loss, rank_percentile, unigram_surprisal
from mdlm_atat.train.trainer import train

EPS = 1e-3


def records(run_dir, event):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


# ---------------------------------------------------------------------------------------------------- masking


def random_z(B=4, L=64, seed=0):
    return standardize(torch.randn(B, L, generator=torch.Generator().manual_seed(seed)))


def test_standardize_is_zero_mean_unit_std_and_clipped():
    s = torch.rand(3, 100, generator=torch.Generator().manual_seed(0)) ** 4
    z = standardize(s)
    assert torch.allclose(z.mean(-1), torch.zeros(3), atol=0.05)
    assert z.abs().max() <= 3.0
    assert torch.equal(standardize(torch.full((2, 10), 0.5)), torch.zeros(2, 10))  # constant s: no tilt


SCHEDULE = LogLinearSchedule(EPS)


def tilted(t, z, beta, balanced=False, attention=None):
    return tilted_mask_probs(SCHEDULE, torch.as_tensor(t, dtype=torch.float32), z, beta, balanced, attention)


@pytest.mark.parametrize("beta", [-3.0, -1.0, 0.5, 2.0, 3.0])
def test_tilted_probs_hit_mdlms_endpoints_and_are_monotone_in_t(beta):
    """DESIGN 3.3 (issue D2): p_i(0) = 0 and p_i(1) = 1 - eps = MDLM's rate for every token, whatever its z."""
    z = random_z()
    z[0, :3] = torch.tensor([-3.0, 0.0, 3.0])  # the extremes of the clipped range
    times = torch.linspace(0, 1, 101)
    probs = torch.stack([tilted(t.expand(4), z, beta) for t in times])  # (T, B, L)
    assert torch.all(probs[0] == 0)
    mdlm_at_1 = SCHEDULE.mask_prob(torch.ones(1))  # float32 1 - eps
    assert torch.all(probs[-1] == mdlm_at_1)
    assert torch.all(probs[1:] >= probs[:-1])
    # Bounded tilt: p_i / alpha(t) within exp(+-3 |beta|) at every interior t.
    ratio = probs[1:-1] / SCHEDULE.mask_prob(times[1:-1])[:, None, None]
    assert ratio.max() <= math.exp(3 * abs(beta)) * 1.0001 and ratio.min() >= math.exp(-3 * abs(beta)) / 1.0001


def test_beta_zero_is_mdlm_rate_exactly():
    t = torch.tensor([0.1, 0.5, 0.9, 0.3])
    probs = tilted(t, random_z(), 0.0)
    assert torch.equal(probs, SCHEDULE.mask_prob(t)[:, None].expand(4, 64))


def test_importance_masks_high_z_more_and_inverse_less():
    z = random_z()
    t = torch.full((4,), 0.4)
    rate = float(SCHEDULE.mask_prob(t[:1]))
    hard = z > 1
    assert tilted(t, z, 1.0)[hard].min() > rate
    assert tilted(t, z, -1.0)[hard].max() < rate


def test_balanced_mean_equals_mdlms_rate():
    z = random_z(B=6)
    t = torch.tensor([0.01, 0.2, 0.5, 0.7, 0.95, 1.0])
    rate = SCHEDULE.mask_prob(t)
    probs = tilted(t, z, 1.5, balanced=True)
    torch.testing.assert_close(probs.mean(-1), rate, atol=1e-5, rtol=0)
    assert torch.all(probs[-1] == rate[-1])  # t = 1: all-MASK (up to eps) needs no shift
    attention = torch.ones(6, 64, dtype=torch.bool)
    attention[:, 40:] = False
    probs = tilted(t, standardize(torch.randn(6, 64), attention), 1.5, True, attention)
    torch.testing.assert_close(probs[:, :40].mean(-1), rate, atol=1e-5, rtol=0)


def test_corrected_weights_keep_each_tokens_expected_weight():
    """E over masks of m_i * w_i equals MDLM's alpha(t) / t at every position (Monte Carlo)."""
    torch.manual_seed(0)
    V, L, draws = 5, 16, 200_000
    schedule = LogLinearSchedule(EPS)
    objective = MaskedDiffusionObjective(schedule, mask_id=V)
    z = random_z(B=1, L=L)
    t = torch.full((draws,), 0.3)
    probs = tilted_mask_probs(schedule, t, z.expand(draws, L), 1.0)  # (draws, L)
    x0 = torch.zeros(draws, L, dtype=torch.long)
    terms = objective(lambda x, s: torch.zeros(draws, L, V + 1), x0, t=t, mask_probs=probs)
    per_position = (terms.masked * terms.weight).mean(0)  # (L,)
    expected = schedule.mask_prob(t[:1]) / t[:1]  # MDLM: alpha(t) * (1 / t) = 1 - eps
    p = probs[0]
    stderr = expected * torch.sqrt((1 - p) / (p * draws))  # of a mean of m_i / p_i (scaled) over the draws
    assert torch.all((per_position - expected).abs() < 4 * stderr)
    assert p.max() / p.min() > 5  # the tilt is real: some tokens are masked far more often than others
    # The focus ablation (no correction) over-weights the tokens that are masked more.
    focus = objective(lambda x, s: torch.zeros(draws, L, V + 1), x0, t=t, mask_probs=probs, correction=False)
    hard = int(z.argmax())
    assert (focus.masked * focus.weight).mean(0)[hard] > 1.5 * expected


# ---------------------------------------------------------------------------------------------------- curriculum


def curriculum(variant="default", masking="importance", ramp=0.0, warmup=0, total=1000):
    cfg = load_config(None, [f"curriculum.variant={variant}", f"curriculum.ramp={ramp}", f"atat.masking={masking}",
                             f"atat.estimator_warmup_steps={warmup}", "atat.beta0=0.8"])
    return Curriculum(cfg.curriculum, cfg.atat, total)


def test_curriculum_stage_boundaries():
    c = curriculum()
    assert [c.state(s).stage for s in (0, 329, 330, 659, 660, 999)] == ["easy", "easy", "medium", "medium", "hard", "hard"]
    assert [c.state(s).beta for s in (0, 500, 900)] == [-0.8, 0.0, 0.8]
    early, late = curriculum("early"), curriculum("late")
    assert early.state(199).stage == "easy" and early.state(200).stage == "medium" and early.state(600).stage == "hard"
    assert late.state(349).stage == "easy" and late.state(799).stage == "medium" and late.state(800).stage == "hard"
    assert {curriculum("none").state(s).beta for s in (0, 500, 999)} == {0.8}
    assert curriculum(masking="inverse").state(900).beta == -0.8
    assert curriculum(masking="uniform").state(900).beta == 0.0
    assert curriculum(warmup=100).state(99).stage == "warmup" and curriculum(warmup=100).state(99).beta == 0.0


def test_curriculum_ramp_is_linear_and_continuous():
    c = curriculum(ramp=0.1)
    betas = [c.state(s).beta for s in range(1000)]
    assert max(abs(a - b) for a, b in zip(betas, betas[1:])) < 0.8 * 2 / 100 + 1e-9  # no jumps
    assert c.state(330).beta == pytest.approx(-0.4)  # half-way up the first ramp


def test_curriculum_variant_conflicts_name_the_key():
    with pytest.raises(ConfigError, match="^curriculum.stage_1_end"):
        load_config(None, ["curriculum.variant=early", "curriculum.stage_1_end=0.5"])
    with pytest.raises(ConfigError, match="^curriculum.variant"):
        load_config(None, ["curriculum.variant=sometimes"])
    with pytest.raises(ConfigError, match="^atat.importance_mode"):
        load_config(None, ["atat.importance_mode=oracle"])


# ---------------------------------------------------------------------------------------------------- estimator


def test_rank_percentile_within_each_sequence():
    values = torch.tensor([[3.0, 1.0, 2.0, 9.0], [5.0, 4.0, 0.0, 0.0]])
    selected = torch.tensor([[True, True, True, False], [True, False, False, False]])
    pct = rank_percentile(values, selected)
    assert pct.tolist() == [[1.0, 0.0, 0.5, 0.0], [0.5, 0.0, 0.0, 0.0]]


def test_spearman_with_ties():
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0, 4.0]])
    sel = torch.ones_like(a, dtype=torch.bool)
    assert tie_ranks(a, sel).tolist() == [[0.0, 1.5, 1.5, 3.0, 4.0]]
    assert spearman_rows(a, a * 10, sel).item() == pytest.approx(1.0)
    assert spearman_rows(a, -a, sel).item() == pytest.approx(-1.0)


def test_estimator_modes():
    counts = torch.tensor([100.0, 10.0, 1.0, 0.0, 0.0])
    surprisal = unigram_surprisal(counts, 5)
    assert surprisal[0] < surprisal[1] < surprisal[2]
    x0, t = torch.tensor([[0, 1, 2, 1]]), torch.tensor([0.5])
    cfg = dict(estimator_hidden_dim=16, estimator_num_layers=1, estimator_num_heads=2, estimator_cond_dim=8)
    none = ImportanceEstimator(AtatConfig(importance_mode="none", **cfg), 5, surprisal)
    assert torch.equal(torch.sigmoid(none(x0, t)), torch.full((1, 4), 0.5)) and not list(none.parameters())
    freq = ImportanceEstimator(AtatConfig(importance_mode="frequency_only", **cfg), 5, surprisal)
    assert not list(freq.parameters()) and freq(x0, t)[0, 2] > freq(x0, t)[0, 1] > freq(x0, t)[0, 0]
    full = ImportanceEstimator(AtatConfig(importance_mode="full", **cfg), 5, surprisal)
    assert torch.allclose(full(x0, t), freq(x0, t))  # starts as the frequency prior
    learned = ImportanceEstimator(AtatConfig(importance_mode="learned_only", **cfg), 5, surprisal)
    assert torch.equal(learned(x0, t), torch.zeros(1, 4))  # starts at s = 0.5
    assert "surprisal" in full.state_dict()  # the frequency prior is saved with the model


def test_stop_gradient_both_ways():
    torch.manual_seed(0)
    V = 30
    cfg = load_config(None, ["atat.estimator_warmup_steps=0", "curriculum.variant=none", "atat.beta0=1.0",
                             "atat.estimator_hidden_dim=16", "atat.estimator_num_heads=2", "atat.estimator_cond_dim=8"])
    model = DiT(ModelConfig(hidden_dim=16, num_layers=1, num_heads=2, cond_dim=8), V + 1)
    for p in model.parameters():  # away from the zero init, so that every parameter can receive gradient
        torch.nn.init.normal_(p, std=0.1)
    estimator = ImportanceEstimator(cfg.atat, V + 1, unigram_surprisal(torch.arange(V + 1.0), V + 1))
    for p in estimator.parameters():
        torch.nn.init.normal_(p, std=0.1)
    atat = AtatTraining(cfg, estimator)
    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V)
    x0 = torch.randint(0, V, (4, 24))
    step = atat(objective, model, x0, torch.tensor([0.2, 0.4, 0.6, 0.8]), step=10)
    assert step.state.beta == 1.0
    nelbo_grads = torch.autograd.grad(step.terms.loss, list(estimator.parameters()), allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in nelbo_grads)  # the denoiser's loss never reaches it
    est_grads = torch.autograd.grad(step.estimator_loss, list(model.parameters()), allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in est_grads)  # and its loss never reaches the denoiser
    assert any(g is not None and g.abs().sum() > 0
               for g in torch.autograd.grad(step.estimator_loss, list(estimator.parameters()), allow_unused=True))


def test_estimator_target_does_not_move_with_beta():
    """Issue D4: the estimator's fixed point must not depend on the masks it tilts. With the same x0, t and draws,
    its targets at beta = -1 and +1 are the uniform rows' (every 4th), bit for bit those at beta = 0 there."""
    torch.manual_seed(0)
    V, B, L = 30, 16, 24
    model = DiT(ModelConfig(hidden_dim=16, num_layers=1, num_heads=2, cond_dim=8, dropout=0.0), V + 1).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V)
    x0 = torch.randint(0, V, (B, L))
    t = objective.sample_t(B, "cpu")
    noise = torch.rand(B, L, dtype=torch.float64)
    steps = {}
    for beta, masking in ((-1.0, "inverse"), (0.0, "uniform"), (1.0, "importance")):
        cfg = load_config(None, ["atat.estimator_warmup_steps=0", "curriculum.variant=none", "atat.beta0=1.0",
                                 f"atat.masking={masking}", "atat.estimator_hidden_dim=16",
                                 "atat.estimator_num_heads=2", "atat.estimator_cond_dim=8"])
        torch.manual_seed(1)  # the same estimator: the surprisal prior gives every token its own z
        estimator = ImportanceEstimator(cfg.atat, V + 1, unigram_surprisal(torch.arange(V + 1.0) ** 2, V + 1))
        steps[beta] = AtatTraining(cfg, estimator)(objective, model, x0, t, step=10, uniform_noise=noise, row_offset=8)
        assert steps[beta].state.beta == beta
    uniform_rows = torch.arange(8, 8 + B) % 4 == 0
    base = steps[0.0]
    assert torch.equal(base.target_positions, base.terms.masked)  # beta = 0: every row is uniformly masked
    for beta in (-1.0, 1.0):
        step = steps[beta]
        assert torch.equal(step.target_positions, step.terms.masked & uniform_rows[:, None])
        assert torch.equal(step.terms.masked[uniform_rows], base.terms.masked[uniform_rows])
        assert torch.equal(step.estimator_target[uniform_rows], base.estimator_target[uniform_rows])
        assert not torch.equal(step.terms.masked[~uniform_rows], base.terms.masked[~uniform_rows])  # a real tilt
    assert not torch.equal(steps[-1.0].terms.masked, steps[1.0].terms.masked)


# ---------------------------------------------------------------------------------------------------- training


def test_mode_none_without_curriculum_is_bitwise_mdlm(tiny_config, tmp_path):
    mdlm = train(tiny_config("atat.enabled=false"), tmp_path / "mdlm")
    none = train(tiny_config("atat.importance_mode=none", "curriculum.variant=none"), tmp_path / "none")
    losses = lambda run: [r["loss"] for r in records(tmp_path / run, "train")]  # noqa: E731
    assert losses("mdlm") == losses("none")
    assert mdlm["val"] == none["val"]


def test_atat_run_logs_curriculum_and_importance(tiny_config, tmp_path):
    cfg = tiny_config("training.total_steps=9", "atat.estimator_warmup_steps=2", "atat.diagnostics_batches=2",
                      "atat.masking=balanced")
    train(cfg, tmp_path / "run")
    rows = records(tmp_path / "run", "train")
    assert [r["stage"] for r in rows][:3] == ["warmup", "warmup", "easy"]
    assert rows[-1]["stage"] == "hard" and rows[-1]["beta"] == 0.5
    for key in ("mask_rate", "mask_rate_expected", "importance_mean", "importance_std", "importance_q10",
                "importance_q90", "estimator_loss"):
        assert all(math.isfinite(r[key]) for r in rows), key
    tilted = [r for r in rows if r["beta"] != 0]
    assert all(r["weight_ratio_min"] <= 1 <= r["weight_ratio_max"] for r in tilted)
    assert all(r["weight_ratio_max"] <= math.exp(3 * 0.5) * 1.01 for r in tilted)
    diagnostics = records(tmp_path / "run", "atat_val")
    assert len(diagnostics) == 3
    for key in ("spearman_estimator", "spearman_frequency_baseline", "importance_vs_surprisal",
                "importance_vs_position", "importance_vs_token_length"):
        assert -1 <= diagnostics[-1][key] <= 1, key
    assert len(diagnostics[-1]["nelbo_by_frequency_bin"]) == 5


def test_learned_estimator_learns_difficulty(tiny_config, tmp_path):
    """learned_only starts at s = 0.5 (no correlation); training makes it track the observed loss."""
    cfg = tiny_config("training.total_steps=80", "training.eval_every_n_steps=80", "training.save_every_n_steps=80",
                      "training.log_every_n_steps=40", "atat.importance_mode=learned_only",
                      "atat.estimator_hidden_dim=32", "atat.estimator_num_heads=2", "atat.estimator_cond_dim=16",
                      "atat.estimator_learning_rate=3e-3", "atat.diagnostics_batches=4", "model.dropout=0.0")
    train(cfg, tmp_path / "run")
    final = records(tmp_path / "run", "atat_val")[-1]
    assert final["spearman_estimator"] > 0.3


def test_every_documented_ablation_loads():
    import re

    from conftest import CONFIG_DIR, REPO

    text = (REPO / "docs" / "ablations.md").read_text()
    overrides = sorted(set(re.findall(r"`((?:atat|curriculum)\.[a-z_0-9]+=[^`\s]+)`", text)))
    assert len(overrides) >= 16
    for item in overrides:
        for config in ("openwebtext.yaml", "quickstart.yaml"):
            load_config(CONFIG_DIR / config, [item])
    assert load_config(CONFIG_DIR / "openwebtext.yaml").atat.enabled  # ATAT by default


@pytest.mark.parametrize("kind", ["bce", "mse"])
def test_estimator_loss_is_the_mean_over_the_selected_positions(kind):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 32, generator=gen, requires_grad=True)
    target = torch.rand(4, 32, generator=gen)
    selected = torch.rand(4, 32, generator=gen) < 0.3
    got = estimator_loss(logits, target, selected, kind)
    picked, wanted = logits[selected], target[selected]
    want = (F.binary_cross_entropy_with_logits(picked, wanted) if kind == "bce"
            else F.mse_loss(torch.sigmoid(picked), wanted))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(got, logits)
    assert torch.all(grad[~selected] == 0) and torch.all(grad[selected] != 0)
    none = estimator_loss(logits, target, torch.zeros_like(selected), kind)  # no position: 0, graph intact
    assert none.item() == 0.0 and none.requires_grad
