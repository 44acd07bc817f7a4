"""The ATAT-vs-MDLM study script (benchmarks/study.py): a real two-arm run on CPU, its report, and its pieces."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_data import GPT2, SHARED, needs_shared

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import study  # noqa: E402

SMOKE = [
    "model.size=null", "model.hidden_dim=32", "model.num_layers=1", "model.num_heads=2", "model.cond_dim=16",
    "data.max_length=64", "data.batch_size=4", "data.num_workers=0", "training.total_steps=4",
    "training.warmup_steps=1", "training.eval_every_n_steps=2", "training.eval_batches=1",
    "training.log_every_n_steps=1", "training.compile=false", "training.mixed_precision=fp32",
    "atat.estimator_warmup_steps=1", "atat.estimator_hidden_dim=16", "atat.estimator_num_heads=2",
    "atat.estimator_cond_dim=16", "atat.diagnostics_batches=1",
]


def small_corpora(folder: Path) -> Path:
    """The first documents of each split of the real corpora: the study's files, small enough for a test."""
    folder.mkdir()
    for name in (*study.PROSE, *study.ZERO_SHOT):
        kept, per_split = [], {"train": 0, "validation": 0}
        with open(SHARED / "corpora" / f"{name}.jsonl") as f:
            for line in f:
                split = json.loads(line)["split"]
                if per_split.get(split, 99) < 3:
                    per_split[split] += 1
                    kept.append(line)
                if all(n >= 3 for n in per_split.values()):
                    break
        (folder / f"{name}.jsonl").write_text("".join(kept))
    return folder


@needs_shared
@pytest.mark.slow
def test_study_runs_two_arms_and_reports_what_they_wrote(tmp_path, capsys):
    corpora, out, doc = small_corpora(tmp_path / "corpora"), tmp_path / "study", tmp_path / "docs" / "results.md"
    args = ["run", "--out", str(out), "--gpus", "cpu", "--arms", "mdlm,atat", "--seeds", "0", "--num-t", "2",
            "--max-batches", "1", "--corpora", str(corpora), "--tokenizer", str(GPT2), *SMOKE]
    assert study.main(args) == 0
    for arm in ("mdlm", "atat"):
        run = out / "runs" / f"{arm}-s0"
        record = json.loads((run / "study.json").read_text())
        assert record["arm"] == arm and record["train_command"].startswith("python -m mdlm_atat train")
        evals = json.loads((run / "eval.json").read_text())
        assert len(evals) == 5 and all(r["step"] == 4 and r["tokens_seen"] == 4 * 4 * 64 for r in evals.values())
    assert "atat.enabled=false" in json.loads((out / "runs" / "mdlm-s0" / "study.json").read_text())["train_command"]
    assert "enabled: false" in (out / "runs" / "mdlm-s0" / "config.yaml").read_text()
    assert "enabled: false" not in (out / "runs" / "atat-s0" / "config.yaml").read_text()

    assert study.main(args) == 0  # the same command again: every job is done, nothing re-runs
    assert capsys.readouterr().out.count("skipped") == 2

    assert study.main(["report", "--out", str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    runs = {r.arm: r for r in study.load_runs(out)}
    assert f"| mdlm-s0 | {runs['mdlm'].prose_nelbo:.4f} |" in text
    assert f"| atat-s0 | {runs['atat'].prose_nelbo:.4f} |" in text
    assert "## Conclusion" in text and "atat's pooled prose bound is" in text
    assert (doc.parent / "images" / "results_curves.png").stat().st_size > 10_000


def test_pooled_prose_bound_weights_corpora_by_tokens():
    evals = {c: {"nelbo": 1.0, "num_tokens": 100} for c in study.PROSE}
    evals["sotu"] = {"nelbo": 4.0, "num_tokens": 300}
    run = study.Run("atat", 0, Path("."), {}, evals, ([], []))
    assert run.prose_nelbo == pytest.approx((4.0 * 300 + 3 * 100) / 600)


def test_crossing_interpolates_between_evaluations():
    curve = ([0.0, 10.0, 20.0, 30.0], [5.0, 4.0, 3.0, 2.5])
    assert study.crossing(curve, 3.5) == pytest.approx(15.0)
    assert study.crossing(curve, 5.5) == 0.0
    assert study.crossing(curve, 2.0) is None


def test_verdict_compares_the_difference_with_the_seed_spread():
    def runs(arm, values):
        return [study.Run(arm, i, Path("."), {}, {c: {"nelbo": v, "num_tokens": 1} for c in study.PROSE}, ([], []))
                for i, v in enumerate(values)]

    # Paired by seed: differences -0.10 and -0.09, so the standard error is sd(-0.10, -0.09) / sqrt(2) = 0.005,
    # far below the seed-to-seed spread of either arm (0.02 and 0.014).
    text, diff, se = study.verdict("atat", runs("atat", [3.00, 3.03]), runs("mdlm", [3.10, 3.12]))
    assert diff == pytest.approx(-0.095) and se == pytest.approx(0.005)
    assert "lower (better)" in text and "more than twice" in text and "2 paired seeds" in text
    text, _, _ = study.verdict("atat", runs("atat", [3.10, 3.14]), runs("mdlm", [3.11, 3.12]))
    assert "no measurable difference" in text


def test_missing_corpora_is_one_clear_error(tmp_path, capsys):  # checked before anything else, tokenizer included
    assert study.main(["run", "--out", str(tmp_path / "s"), "--corpora", str(tmp_path), "--gpus", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --corpora") and "sotu.jsonl" in err and "../shared/corpora" in err


def test_unknown_arm_names_the_choices(tmp_path, capsys):
    args = ["run", "--out", str(tmp_path / "s"), "--arms", "mdlm,fancy", "--gpus", "cpu", "--tokenizer", str(tmp_path)]
    assert study.main(args) == 2
    assert "unknown arm fancy" in capsys.readouterr().err


def test_missing_tokenizer_is_one_clear_error(tmp_path, capsys):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    for name in (*study.PROSE, *study.ZERO_SHOT):
        (corpora / f"{name}.jsonl").write_text("")
    assert study.main(["run", "--out", str(tmp_path / "s"), "--corpora", str(corpora), "--tokenizer", str(tmp_path),
                       "--gpus", "cpu"]) == 2
    assert "--tokenizer" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_report_without_runs_says_to_run_first(tmp_path, capsys):
    assert study.main(["report", "--out", str(tmp_path)]) == 2
    assert "run the study first" in capsys.readouterr().err


def test_per_corpus_differences_pair_by_seed_on_every_corpus():
    def run(arm, seed, sotu, rest):
        evals = {c: {"nelbo": sotu if c == "sotu" else rest, "num_tokens": 1} for c in (*study.PROSE, *study.ZERO_SHOT)}
        return study.Run(arm, seed, Path("."), {}, evals, ([], []))

    base = [run("mdlm", 0, 3.0, 4.0), run("mdlm", 1, 3.2, 4.0)]
    arms = {"mdlm": base, "atat": [run("atat", 0, 2.9, 4.1), run("atat", 1, 3.0, 4.1), run("atat", 7, 0.0, 0.0)],
            "focus": [run("focus", 5, 1.0, 1.0)]}  # shares no seed with MDLM: no row
    lines = study.per_corpus_differences(arms, base, "###")
    rows = [line for line in lines if line.startswith("| atat")]
    # sotu: -0.1 and -0.2 (seed 7 has no MDLM pair) -> -0.15 +- 0.05; every other corpus +0.1 +- 0.
    assert rows == ["| atat | 2 | -0.1500 ± 0.0500 | +0.1000 ± 0.0000 | +0.1000 ± 0.0000 | +0.1000 ± 0.0000 "
                    "| +0.1000 ± 0.0000 |"]
    assert not any(line.startswith(("| mdlm", "| focus")) for line in lines)
    assert study.per_corpus_differences({"mdlm": base}, base, "###") == []


def test_paired_ratio_interval_and_last_tenth_movement():
    mean, se, half = study.mean_ci([1.0, 1.02, 0.98, 1.0])
    assert mean == pytest.approx(1.0) and se == pytest.approx(math.sqrt(0.0008 / 3) / 2)
    assert half == pytest.approx(3.182 * se)  # Student's t, 3 degrees of freedom
    assert study.mean_ci([2.0])[1:] == (None, None)
    # The bound at 90% of the tokens (interpolated) minus the last: 3.0 at 90 -> 2.9 at 100.
    assert study.last_tenth_movement(([0.0, 80.0, 100.0], [5.0, 3.1, 2.9])) == pytest.approx(0.1)
    assert study.last_tenth_movement(([100.0], [2.9])) is None


def fake_run(study_dir: Path, arm: str, seed: int, schedule: str, bound: float, warmup: int = 1) -> None:
    """A finished run folder as `run` leaves it (config, metrics, eval, study records), with made-up numbers."""
    folder = study_dir / "runs" / f"{arm}-s{seed}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        "data: {tokenizer: bpe, tokenizer_vocab_size: 64, max_length: 8, batch_size: 2}\n"
        "model: {hidden_dim: 8, num_layers: 1}\n"
        f"training: {{learning_rate: 0.001, lr_schedule: {schedule}, min_lr_ratio: 0.0, warmup_steps: {warmup}, "
        "ema_decay: 0.0, total_steps: 10}\n"
    )
    records = [{"event": "start", "step": 0, "tokens_per_step": 16}]
    records += [{"event": "val", "step": s, "val_nelbo": bound + (10 - s) * 0.1} for s in (5, 9, 10)]
    records += [{"event": "train", "step": 10, "loss": bound, "tokens_per_s": 100.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = {"nelbo": bound, "num_tokens": 100, "stderr": 0.01, "step": 10, "tokens_seen": 160, "num_t": 2,
              "config_hash": "0" * 12}
    (folder / "eval.json").write_text(json.dumps({f"x/{c}.jsonl:validation": result for c in (*study.PROSE, *study.ZERO_SHOT)}))
    (folder / "study.json").write_text(json.dumps({
        "arm": arm, "seed": seed, "device": "cpu", "torch": "x", "date": "2026-12-01", "train_seconds": 1.0,
        "train_command": "train", "eval_command": "eval",
    }))


def test_report_never_pools_settings_and_reports_a_screen_on_its_own(tmp_path, capsys):
    annealed, constant = tmp_path / "annealed", tmp_path / "constant"
    for seed in (0, 1):
        fake_run(annealed, "mdlm", seed, "cosine", 4.0 + seed / 10)
        fake_run(annealed, "atat", seed, "cosine", 4.05 + seed / 10)
        fake_run(constant, "mdlm", seed, "constant", 3.0 + seed / 10)
        fake_run(constant, "uniform_masking", seed, "constant", 2.9 + seed / 10)
    doc = tmp_path / "docs" / "results.md"
    assert study.main(["report", "--out", str(annealed), str(constant), "--doc", str(doc)]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "(cosine" in err and "(constant)" in err and not doc.exists()

    assert study.main(["report", "--out", str(annealed), "--screen", str(constant), "--doc", str(doc)]) == 0
    text = doc.read_text()
    comparison, screen = text.split("## The comparison")[1].split("## The screen")
    assert "| atat | 2 |" in comparison and "+0.0500" in comparison and "uniform_masking" not in comparison
    assert "| uniform_masking | 2 |" in screen and "-0.1000" in screen  # against the screen's own MDLM runs
    assert "no EMA" in text and "cosine to 0.0 x" in text
    assert (doc.parent / "images" / "results_screen_curves.png").is_file()


def test_report_gives_another_setting_its_own_section_and_an_arms_own_change_is_not_a_setting(tmp_path, capsys):
    main, earlier, plateau = tmp_path / "main", tmp_path / "earlier", tmp_path / "plateau"
    for seed in (0, 1):
        fake_run(main, "mdlm", seed, "cosine", 4.0 + seed / 10, warmup=10)
        fake_run(main, "atat", seed, "cosine", 3.98 + seed / 10, warmup=10)
        fake_run(earlier, "mdlm", seed, "cosine", 4.2 + seed / 10)
        fake_run(earlier, "atat", seed, "cosine", 4.25 + seed / 10)
        fake_run(plateau, "mdlm", seed, "cosine", 4.2 + seed / 10)
        fake_run(plateau, "mdlm_warmup_long", seed, "cosine", 4.0 + seed / 10, warmup=1000)  # its treatment
    doc = tmp_path / "docs" / "results.md"
    args = ["report", "--out", str(main), "--also", str(earlier), "--also", str(plateau), "--doc", str(doc)]
    assert study.main(args) == 0
    text = doc.read_text()
    head, rest = text.split("## Another setting: earlier")
    earlier_part, plateau_part = rest.split("## Another setting: plateau")
    assert "| atat | 2 |" in head and "-0.0200" in head and "after 10 warm-up steps" in head
    assert "| atat | 2 |" in earlier_part and "+0.0500" in earlier_part and "after 1 warm-up steps" in earlier_part
    assert "| mdlm_warmup_long | 2 |" in plateau_part and "-0.2000" in plateau_part.split("## Conclusion")[0]
    assert f"--also {earlier} --also {plateau}" in text  # the command that regenerates the page
    for name in ("results_curves.png", "results_earlier_curves.png", "results_plateau_curves.png"):
        assert (doc.parent / "images" / name).is_file()
    capsys.readouterr()

    fake_run(earlier, "atat", 2, "cosine", 4.0, warmup=1000)  # atat's overrides do not touch the warm-up
    assert study.main(args) == 2
    assert "different settings" in capsys.readouterr().err


@needs_shared
@pytest.mark.slow
def test_a_job_stopped_by_the_time_limit_is_resumed_later_not_scored(tmp_path, monkeypatch, capsys):
    corpora, out = small_corpora(tmp_path / "corpora"), tmp_path / "study"
    args = ["run", "--out", str(out), "--gpus", "cpu", "--arms", "mdlm", "--seeds", "0", "--num-t", "2",
            "--max-batches", "1", "--corpora", str(corpora), "--tokenizer", str(GPT2), "--train-seconds", "600",
            "--resume-later", *SMOKE]
    real = study.run_logged

    def time_limit_at_training(cmd, log, env, seconds=None):  # the first training ends as the limit would end it
        if "train" in cmd and "--max-steps" not in cmd:
            rc, spent, _ = real([*cmd, "--max-steps", "2"], log, env, seconds)
            return rc, spent, True
        return real(cmd, log, env, seconds)

    monkeypatch.setattr(study, "run_logged", time_limit_at_training)
    assert study.main(args) == 0
    run = out / "runs" / "mdlm-s0"
    assert not (run / "eval.json").exists() and "not scored" in capsys.readouterr().out
    first = json.loads((run / "train_seconds.json").read_text())["seconds"]

    monkeypatch.setattr(study, "run_logged", real)
    assert study.main(args) == 0  # the same command: resumes at step 2, trains to 4, scores
    evals = json.loads((run / "eval.json").read_text())
    assert all(r["step"] == 4 for r in evals.values())
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 4 and 3 in steps  # one continuous run, no restart from 0
    assert json.loads((run / "study.json").read_text())["train_seconds"] > first


def test_training_seconds_survive_a_failed_scoring(tmp_path, monkeypatch):
    """Each training call's seconds are kept at once: a retry after a failed evaluation adds to them."""
    scoring_fails = [True]

    def fake_run_logged(cmd, log, env, seconds=None):  # training takes 10 s; the first scoring fails
        if "train" in cmd:
            return 0, 10.0, False
        if scoring_fails.pop(0) if scoring_fails else False:
            return 1, 1.0, False
        Path(cmd[cmd.index("--output") + 1]).write_text("{}")
        return 0, 1.0, False

    monkeypatch.setattr(study, "run_logged", fake_run_logged)
    args = SimpleNamespace(out=tmp_path, steps=4, config=Path("c.yaml"), overrides=[], train_seconds=None,
                           resume_later=False, num_t=2, max_batches=1)
    job = study.Job("mdlm", 0)
    assert not study.run_job(job, "cpu", args, [], {"sotu": Path("sotu.jsonl")})
    assert study.run_job(job, "cpu", args, [], {"sotu": Path("sotu.jsonl")})  # the retry trains (resumes) again
    assert json.loads((tmp_path / "runs" / "mdlm-s0" / "study.json").read_text())["train_seconds"] == 20.0


def test_plateau_sentence_correlates_later_exits_with_higher_bounds():
    def run(arm, seed, exit_step, bound):
        curve = ([0.0, exit_step - 1.0, exit_step + 1.0, 100.0], [6.7, 6.1, 5.9, 4.0])  # crosses 6.0 at exit_step
        evals = {c: {"nelbo": bound, "num_tokens": 1} for c in study.PROSE}
        return study.Run(arm, seed, Path(f"{arm}-s{seed}"), {}, evals, curve)

    base = [run("mdlm", s, 10.0, 4.0) for s in range(4)]
    atat = [run("atat", s, 10.0 + d, 4.0 + d / 100) for s, d in enumerate((-2.0, 0.0, 3.0, 5.0))]
    text = study.plateau_sentence({"mdlm": base, "atat": atat}, base)
    assert "over 4 pairs" in text and "correlation +1.00" in text
    assert study.plateau_sentence({"mdlm": base, "atat": atat[:2]}, base) is None  # too few pairs to say anything
