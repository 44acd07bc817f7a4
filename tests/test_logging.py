"""Logging (issue 8): progress bar, metrics.jsonl, TensorBoard, Weights & Biases; missing packages are notes."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest

from mdlm_atat.config import load_config
from mdlm_atat.train.metrics import MetricsLog, build_sinks, scalars
from mdlm_atat.train.trainer import train


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.logged: list[dict] = []
        self.metrics: list[tuple] = []
        self.finished = False

    def define_metric(self, name, **kwargs):
        self.metrics.append((name, kwargs))

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        run = FakeRun(**kwargs)
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_training_logs_to_console_metrics_tensorboard_and_wandb(tiny_config, tmp_path, fake_wandb, capsys,
                                                               monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    import mdlm_atat.progress

    on_a_file = mdlm_atat.progress.interactive
    monkeypatch.setattr(mdlm_atat.progress, "interactive", lambda stream: True)  # as on a terminal
    train(tiny_config("logging.wandb_project=atat-test"), run, max_steps=3)
    captured = capsys.readouterr()
    err = captured.err
    assert "step/s" in err and "tok_s=" in err and "loss=" in err  # the progress bar: rate, ETA, loss, tokens/s
    train_lines = [line for line in captured.out.splitlines() if line.startswith("step ") and "loss" in line]
    assert len(train_lines) == 3 and all(len(line) < 130 for line in train_lines), train_lines  # were ~450 wide
    assert re.search(r"\| \w+ beta [+-]\d\.\d\d mask 0\.\d+/0\.\d+ est ", train_lines[0])  # ATAT's state, briefly
    monkeypatch.setattr(mdlm_atat.progress, "interactive", on_a_file)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("time" in r for r in lines)

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/val_nelbo", "atat_val/spearman_estimator"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]

    (first,) = fake_wandb.runs
    assert first.init["project"] == "atat-test" and first.init["resume"] == "allow" and first.finished
    assert first.init["config"]["training"]["total_steps"] == 6
    assert ("*", {"step_metric": "step"}) in first.metrics
    logged = [d for d in first.logged if "train/loss" in d]
    assert [d["step"] for d in logged] == [1, 2, 3]
    assert not any("masking_profile/t/0" in key for d in first.logged for key in d)  # tables stay in the file

    train(tiny_config("logging.wandb_project=atat-test"), run, resume=True)
    assert fake_wandb.runs[1].init["id"] == first.init["id"]  # a resumed run continues the same W&B run
    err = capsys.readouterr().err
    assert "\r" not in err and "step/s" not in err  # output to a file: no progress bar redrawn into it


def test_missing_packages_are_one_line_notes(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = load_config(None, ["logging.wandb_project=atat-test"])
    assert build_sinks(cfg, tmp_path) == []
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 2
    assert notes[0].startswith("note: TensorBoard logging is off: the tensorboard package is not installed")
    assert notes[1].startswith("note: logging.wandb_project='atat-test' but the wandb package is not installed")
    assert build_sinks(load_config(None, ["logging.tensorboard=false"]), tmp_path) == []
    assert capsys.readouterr().err == ""  # nothing asked for, nothing said


def test_wandb_that_cannot_start_is_a_note(tmp_path, fake_wandb, capsys):
    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    fake_wandb.init = refuse
    cfg = load_config(None, ["logging.wandb_project=atat-test", "logging.tensorboard=false"])
    assert build_sinks(cfg, tmp_path) == []
    assert "W&B did not start (RuntimeError: api_key not configured" in capsys.readouterr().err


def test_only_rank_0_logs(tmp_path, fake_wandb):
    cfg = load_config(None, ["logging.wandb_project=atat-test"])
    assert build_sinks(cfg, tmp_path, is_rank0=False) == []
    assert fake_wandb.runs == []


def test_a_failing_sink_is_dropped_with_a_note_and_the_file_goes_on(tmp_path, capsys):
    class Broken:
        def write(self, record):
            raise ConnectionError("service unavailable")

        def close(self):
            pass

    log = MetricsLog(tmp_path / "metrics.jsonl", [Broken()])
    log.write({"event": "train", "step": 1, "loss": 1.0}, console=False)
    log.write({"event": "train", "step": 2, "loss": 0.5}, console=False)
    log.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    err = capsys.readouterr().err
    assert err.count("Broken stopped logging (ConnectionError: service unavailable)") == 1


def test_scalars_flatten_numbers_only():
    record = {"event": "atat_val", "step": 3, "time": 1.0, "a": 1, "best": True, "stage": "easy",
              "bins": [1.0, 2.0], "table": {"x": [3.0]}, "none": None}
    assert dict(scalars(record)) == {"a": 1.0, "bins/0": 1.0, "bins/1": 2.0, "table/x/0": 3.0}


def test_real_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["logging.wandb_project=atat-test", "logging.tensorboard=false"])
    log = MetricsLog(tmp_path / "metrics.jsonl", build_sinks(cfg, tmp_path))
    assert len(log.sinks) == 1
    for step in (1, 2):
        log.write({"event": "train", "step": step, "loss": 3.0 / step}, console=False)
    log.close()
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert b"train/loss" in next(offline.glob("*.wandb")).read_bytes()
