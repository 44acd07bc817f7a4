"""`atat report` (issue 8): the plots and the page of a tiny run, rendered headless."""

from __future__ import annotations

import json

import pytest

from mdlm_atat.cli import main
from mdlm_atat.config import load_config
from mdlm_atat.train.trainer import train
from mdlm_atat.viz.report import read_metrics, write_report

from conftest import TINY_OVERRIDES

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def atat_run(tmp_path_factory, data_cache):
    """9 steps through all three curriculum stages, an evaluation every 3 steps."""
    run = tmp_path_factory.mktemp("report") / "run"
    cfg = load_config(None, TINY_OVERRIDES + [
        f"data.cache_dir={data_cache}", "training.total_steps=9", "atat.estimator_warmup_steps=0",
        "atat.diagnostics_batches=1", "logging.tensorboard=false",
    ])
    train(cfg, run)
    return run


def test_report_renders_every_plot_and_the_page(atat_run, tmp_path):
    (atat_run / "eval.json").write_text(json.dumps({"nelbo": 6.1, "stderr": 0.1, "ppl": 445.9, "num_tokens": 512,
                                                    "step": 9, "dataset": "stdlib-docs", "split": "validation"}))
    result = write_report(atat_run, tmp_path / "report")
    names = sorted(p.rsplit("/", 1)[1] for p in result["figures"])
    assert names == sorted(["summary.png", "loss.png", "optimisation.png", "curriculum.png", "masking.png",
                            "importance.png", "nelbo_by_frequency.png", "estimator.png"])
    assert result["missing"] == []
    for path in result["figures"]:
        data = open(path, "rb").read()
        assert data.startswith(PNG) and 5_000 < len(data) < 400_000, path
    page = (tmp_path / "report" / "index.html").read_text()
    for name in names:
        assert f'src="{name}"' in page
    assert "validation NELBO (last)" in page and "total_steps: 9" in page  # final numbers, config
    assert "eval.json" in page and "445.90" in page  # the atat eval result found in the run folder
    assert "DESIGN" not in page  # captions cite what is in the repository


def test_frequency_bins_have_one_naming():
    from mdlm_atat.viz.report import frequency_bin_name

    assert [frequency_bin_name(b, 5) for b in range(5)] == [
        "fifth 1 (rarest)", "fifth 2", "fifth 3", "fifth 4", "fifth 5 (commonest)"]


def test_the_records_a_report_reads(atat_run):
    run = read_metrics(atat_run)
    assert [r["step"] for r in run.get("val")] == [3, 6, 9]
    assert {r["stage"] for r in run.get("train")} == {"easy", "medium", "hard"}
    profile = run.get("masking_profile")[-1]
    assert list(profile["by_stage"]) == ["easy", "medium", "hard"]
    t, rate = profile["t"], profile["rate"]
    assert len(t) == 10 and all(abs(r - (1 - 1e-3) * x) < 1e-9 for r, x in zip(rate, t))
    for row, mdlm in zip(profile["by_stage"]["medium"], rate):  # beta = 0: every bin masked at MDLM's rate
        assert all(abs(p - mdlm) < 1e-6 for p in row)
    hard, easy = profile["by_stage"]["hard"], profile["by_stage"]["easy"]
    assert hard[5][0] > easy[5][0] and hard[5][-1] < easy[5][-1]  # hard stage: rare tokens masked more


def test_mdlm_run_and_resumed_run_with_a_torn_line(tiny_config, tmp_path):
    run = tmp_path / "mdlm"
    train(tiny_config("atat.enabled=false", "logging.tensorboard=false"), run, max_steps=3)
    train(tiny_config("atat.enabled=false", "logging.tensorboard=false"), run, resume=True)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 7, "lo')  # a line cut short by kill -9
    records = read_metrics(run)
    assert records.skipped_lines == 1 and len(records.starts) == 2
    assert [r["step"] for r in records.get("train")] == [1, 2, 3, 4, 5, 6]  # each step once
    result = write_report(run)
    assert (run / "report" / "index.html").is_file()
    assert set(result["missing"]) == {"curriculum", "masking", "importance", "nelbo_by_frequency", "estimator"}
    assert "1 unreadable line" in (run / "report" / "index.html").read_text()


def test_report_cli(atat_run, tmp_path, capsys):
    assert main(["report", str(atat_run), "--out", str(tmp_path / "r")]) == 0
    assert "index.html (8 figures)" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl here" in capsys.readouterr().err
