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


def test_ema_tracks_the_average():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = build_ema(model, 0.9)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)
    assert ema.module.weight.item() == pytest.approx(0.1)
    assert build_ema(model, 0.0) is None
    assert math.isfinite(ema.module.weight.item())
