import math

import pytest
import torch

from mdlm_atat.config import TrainingConfig
from mdlm_atat.train.optim import build_ema, build_optimizer, lr_multiplier


def test_linear_warmup_then_constant():
    cfg = TrainingConfig(warmup_steps=10, total_steps=100, lr_schedule="constant")
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert all(lr_multiplier(s, cfg) == 1.0 for s in range(10, 200))


def test_cosine_decays_to_the_floor():
    cfg = TrainingConfig(warmup_steps=10, total_steps=110, lr_schedule="cosine", min_lr_ratio=0.1)
    values = [lr_multiplier(s, cfg) for s in range(10, 111)]
    assert values[0] == pytest.approx(1.0)
    assert values[50] == pytest.approx(0.1 + 0.9 * 0.5)
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, TrainingConfig(weight_decay=0.01), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.01 and all(p.ndim == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])


def test_ema_starts_from_the_initial_weights_with_mdlms_decay_warmup():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = build_ema(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # update 1: decay min(0.9, 2 / 11)
    assert ema.module.weight.item() == pytest.approx(1 - 2 / 11)
    assert ema.num_updates == 1
    assert build_ema(model, 0.0) is None


def test_ema_forgets_the_first_weights_as_mdlms_does():
    """Issue D1: one update at weight 1, then 9,999 at 0. MDLM's EMA keeps prod_n min(d, (1+n)/(10+n)) of the
    first weights (2e-29 here); a fixed 0.9999 decay from the first update kept 0.3679."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    ema = build_ema(model, 0.9999)
    ema.update_parameters(model)
    torch.nn.init.zeros_(model.weight)
    for _ in range(9999):
        ema.update_parameters(model)
    expected = 1.0
    for n in range(2, 10001):  # update 1 averaged the weight 1 into a shadow of 1
        expected *= min(0.9999, (1 + n) / (10 + n))
    assert ema.module.weight.item() == pytest.approx(expected, rel=1e-4, abs=0.0)
    assert ema.module.weight.item() < 1e-6
