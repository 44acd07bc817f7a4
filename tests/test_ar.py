"""The AR baseline (issue 5): causal DiT, next-token loss, exact NLL in eval, same verbs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mdlm_atat.cli import main
from mdlm_atat.config import ConfigError, ModelConfig, load_config
from mdlm_atat.eval.likelihood import evaluate_bound
from mdlm_atat.models import build_model
from mdlm_atat.diffusion.objective import NextTokenObjective
from mdlm_atat.models.ar import causal_dit

from conftest import TINY_OVERRIDES

V = 30
MASK = V


def tiny_causal(randomise: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = causal_dit(ModelConfig(hidden_dim=32, num_layers=2, num_heads=2, cond_dim=16, dropout=0.0), V + 1)
    if randomise:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def test_loss_at_position_i_ignores_later_tokens():
    model = tiny_causal()
    objective = NextTokenObjective(MASK)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, V, (2, 16), generator=gen)
    base = objective(model, x0).token_loss
    for i in (3, 8, 14):
        changed = x0.clone()
        changed[:, i + 1 :] = torch.randint(0, V, changed[:, i + 1 :].shape, generator=gen)
        after = objective(model, changed).token_loss
        torch.testing.assert_close(after[:, : i + 1], base[:, : i + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, i + 1 :], base[:, i + 1 :])  # later terms do change


def test_untrained_model_scores_ln_v_exactly_and_eval_is_one_pass():
    model = tiny_causal(randomise=False)  # zero output layer: uniform over the V real tokens (MASK excluded)
    objective = NextTokenObjective(MASK)
    x0 = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(0))
    terms = objective(model, x0)
    assert terms.loss.item() == pytest.approx(math.log(V), rel=1e-6)
    assert terms.num_tokens.item() == 3 * 11  # the first token is context, never predicted
    assert (terms.token_loss[:, 0] == 0).all()
    result = evaluate_bound(model, objective, [x0, x0[:2]], num_t=8, seed=0)
    assert result.num_t == 1  # exact: no Monte Carlo over t
    assert result.nelbo == pytest.approx(math.log(V), rel=1e-6)
    assert objective.sample_t(4, "cpu").tolist() == [0.0] * 4


def test_padding_is_not_scored():
    model = tiny_causal()
    objective = NextTokenObjective(MASK)
    x0 = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(2))
    real = torch.ones(1, 10, dtype=torch.bool)
    real[:, 7:] = False
    padded = objective(model, x0, attention_mask=real)
    short = objective(model, x0[:, :7])
    assert padded.num_tokens.item() == 6
    torch.testing.assert_close(padded.nll_sum, short.nll_sum)


def test_model_name_ar_builds_a_causal_dit(tiny_config):
    cfg = tiny_config("model.name=ar", "atat.enabled=false")
    model = build_model(cfg.model, 50)
    assert model.causal and all(block.causal for block in model.blocks)


def test_ar_with_atat_enabled_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="^atat.enabled: must be false with model.name: ar"):
        tiny_config("model.name=ar", "atat.enabled=true")


def test_ar_trains_evals_and_samples_through_the_cli(tmp_path, data_cache, capsys):
    run = tmp_path / "ar"
    overrides = [*TINY_OVERRIDES, f"data.cache_dir={data_cache}", "model.name=ar", "atat.enabled=false",
                 "model.dropout=0.0"]
    config = tmp_path / "ar.yaml"
    config.write_text("training:\n  total_steps: 6\n")
    assert main(["train", "--config", str(config), "--log-dir", str(run), *overrides]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["event"] == "train")
    cfg = load_config(config, overrides)
    assert first["loss"] == pytest.approx(math.log(512), abs=0.05)  # starts at ln V: uniform next-token model
    capsys.readouterr()

    output = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--max-batches", "2", "--num-t", "5", "--device", "cpu",
                 "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["num_t"] == 1 and "exact NLL" in result["objective"]
    assert result["num_tokens"] == 2 * 8 * (cfg.data.max_length - 1)
    assert result["step"] == 6 and result["nelbo"] < math.log(512)
    capsys.readouterr()

    samples = tmp_path / "ar.jsonl"
    assert main(["sample", "--checkpoint", str(run), "--num-samples", "3", "--length", "40", "--prefix", "The",
                 "--output", str(samples), "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sampler"] == "ar" and summary["length"] == 40  # beyond the block (30): sliding windows
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["token_ids"]) == 40 and r["text"].startswith("The") for r in rows)
    assert all("[MASK]" not in r["text"] for r in rows)

    assert main(["sample", "--checkpoint", str(run), "--sampler", "confidence"]) == 2
    assert "autoregressive" in capsys.readouterr().err

    # B7: where a user compares AR with diffusion, the AR run is named as what it is, not as MDLM.
    assert records[0]["event"] == "start" and records[0]["method"].startswith("ar (autoregressive")
    from mdlm_atat.export import export_checkpoint

    export_checkpoint(run, tmp_path / "export", eval_files=[output])
    card = (tmp_path / "export" / "README.md").read_text()
    assert "tags: [autoregressive, causal-lm" in card and "masked-diffusion" not in card
    assert "| NLL (nats/token) |" in card and "NELBO" not in card
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from mdlm_atat.viz.report import write_report

    (run / "eval.json").write_text(output.read_text())
    write_report(run, tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "validation NLL (last)" in page and "PPL = " in page and "ar (autoregressive" in page
    assert "validation NELBO" not in page and "PPL &lt;=" not in page and "PPL &le;" not in page
    image = imread(tmp_path / "report" / "summary.png")[..., :3]  # (H, W, 3)
    h, w = image.shape[0] // 2, image.shape[1] // 2
    quadrants = [image[:h, :w], image[:h, w:], image[h:, :w], image[h:, w:]]
    assert all((q < 0.9).any(axis=-1).mean() > 0.01 for q in quadrants)  # no blank panel (3 of 4 were)
