"""Faults (issue 8): signals, kill -9, damaged checkpoints, a full disk, non-finite steps, unusable paths."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mdlm_atat.run as run_module
from mdlm_atat.run import read_resume_checkpoint
import mdlm_atat.train.trainer as trainer_module
from mdlm_atat.cli import main
from mdlm_atat.config import ConfigError, load_config
from mdlm_atat.train.checkpoint import (
    CheckpointError, checksum_path, load_checkpoint, save_checkpoint,
)
from mdlm_atat.train.faults import GracefulStop, NonFiniteError
from mdlm_atat.train.trainer import train

from conftest import REPO, TINY_OVERRIDES


def records(run_dir, event):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def losses_by_step(run_dir) -> dict[int, float]:
    """The train loss of each step; a step logged twice (re-run after a resume) must have logged the same loss."""
    out: dict[int, float] = {}
    for r in records(run_dir, "train"):
        assert r["step"] not in out or out[r["step"]] == r["loss"], f"step {r['step']}: {out[r['step']]} != {r['loss']}"
        out[r["step"]] = r["loss"]
    return out


# ---------------------------------------------------------------------------------------------------- signals


def test_graceful_stop_sets_a_flag_and_a_second_ctrl_c_aborts():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


SIGNAL_OVERRIDES = ("training.save_every_n_steps=1000", "training.eval_every_n_steps=1000")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache) -> dict[int, float]:
    run = tmp_path_factory.mktemp("whole") / "run"
    train(load_config(None, [*TINY_OVERRIDES, f"data.cache_dir={data_cache}", *SIGNAL_OVERRIDES]), run)
    return losses_by_step(run)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_resumes_exactly(tiny_config, tmp_path, monkeypatch, uninterrupted, sig):
    """A signal that arrives during step 2 (here: while it is logged) stops the run after it, with last.pt at step 2;
    resuming gives the losses of an uninterrupted run."""
    overrides = SIGNAL_OVERRIDES
    write = trainer_module.MetricsLog.write

    def write_and_signal(self, record, console=True):
        write(self, record, console)
        if record["event"] == "train" and record["step"] == 2:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(trainer_module.MetricsLog, "write", write_and_signal)
    summary = train(tiny_config(*overrides), tmp_path / "split")
    monkeypatch.undo()
    assert summary["stopped"] == sig.name and summary["step"] == 2
    assert load_checkpoint(tmp_path / "split")["state"]["step"] == 2
    assert records(tmp_path / "split", "stopped") == [
        {"event": "stopped", "step": 2, "signal": sig.name, "time": records(tmp_path / "split", "stopped")[0]["time"]}
    ]
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)  # restored after the run
    resumed = train(tiny_config(*overrides), tmp_path / "split", resume=True)
    assert resumed["step"] == 6 and resumed["stopped"] is None
    assert losses_by_step(tmp_path / "split") == uninterrupted


def _atat_train(run_dir, data_cache, *overrides) -> subprocess.Popen:
    config = run_dir.parent / "tiny.yaml"
    config.write_text("training:\n  log_every_n_steps: 1\n")
    argv = [sys.executable, "-m", "mdlm_atat", "train", "--config", str(config), "--log-dir", str(run_dir),
            *TINY_OVERRIDES, f"data.cache_dir={data_cache}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    # A process group of its own: a signal can go to the whole job (DataLoader workers too), as a scheduler sends it.
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _wait_for_step(proc, run_dir, step, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if metrics.is_file() and any(f'"step": {step},' in line and '"train"' in line
                                     for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"step {step} not reached in {timeout} s")


def test_sigterm_to_atat_train_exits_0_with_a_checkpoint(tmp_path, data_cache):
    """SIGTERM to every process of the job, DataLoader workers included (they leave it to the trainer)."""
    run = tmp_path / "run"
    proc = _atat_train(run, data_cache, "training.total_steps=100000", "training.save_every_n_steps=100000",
                       "training.eval_every_n_steps=100000", "data.num_workers=2")
    _wait_for_step(proc, run, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = records(run, "stopped")
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
    step = stopped[0]["step"]
    assert f"stopped by SIGTERM at step {step}" in out and "--resume" in out
    assert "SIGTERM: finishing this step" in err
    assert load_checkpoint(run)["state"]["step"] == step


def test_kill_9_at_any_moment_then_resume_gives_the_same_losses(tmp_path, data_cache, tiny_config):
    """SIGKILL lands wherever the run is (a step, a checkpoint being written); the last checkpoint resumes it and
    every step logged twice logged the same loss, equal to an uninterrupted run's."""
    overrides = ("training.total_steps=20", "training.save_every_n_steps=2", "training.eval_every_n_steps=1000",
                 "training.log_every_n_steps=1")
    run = tmp_path / "killed"
    proc = _atat_train(run, data_cache, *overrides)
    _wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(r["step"] for r in records(run, "train"))
    saved_step = read_resume_checkpoint(run)[0].step
    assert saved_step <= killed_at < 20
    resumed = train(tiny_config(*overrides), run, resume=True)
    whole = train(tiny_config(*overrides), tmp_path / "whole")
    assert resumed["step"] == whole["step"] == 20
    assert losses_by_step(run) == losses_by_step(tmp_path / "whole")  # bitwise, on CPU
    assert resumed["val"] == whole["val"]


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_has_a_checksum_and_keeps_the_previous_one(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder / "last.pt", {"state": {"step": 1}, "w": torch.ones(3)})
    save_checkpoint(folder / "last.pt", {"state": {"step": 2}, "w": torch.zeros(3)})
    assert load_checkpoint(folder / "last.pt")["state"]["step"] == 2
    assert load_checkpoint(folder / "last.prev.pt")["state"]["step"] == 1
    digest, name = checksum_path(folder / "last.pt").read_text().split()
    assert name == "last.pt" and len(digest) == 64  # `sha256sum -c last.pt.sha256` checks it
    assert checksum_path(folder / "last.prev.pt").read_text().split()[1] == "last.prev.pt"
    save_checkpoint(folder / "best.pt", {"state": {"step": 2}})
    assert not (folder / "best.prev.pt").exists()  # only last.pt keeps its previous version
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.pt", "best.pt.sha256", "last.prev.pt", "last.prev.pt.sha256", "last.pt", "last.pt.sha256"]


def test_a_flipped_byte_is_a_checksum_mismatch(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"w": torch.arange(1000.0)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"best\.pt: checksum mismatch with best\.pt\.sha256"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_named_and_resume_falls_back(tiny_config, tmp_path, capsys, data_cache):
    run = tmp_path / "run"
    train(tiny_config(), run)  # saves at steps 3 and 6: last.pt (6), last.prev.pt (3)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt: checksum mismatch .* damaged or truncated"):
        load_checkpoint(last)
    assert main(["train", "--log-dir", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "last.pt: checksum mismatch" in err and "resuming from" in err and "last.prev.pt (step 3)" in err
    losses_by_step(run)  # steps 4-6, run twice, logged the same losses
    assert load_checkpoint(last)["state"]["step"] == 6  # rewritten whole
    # Both last.pt and last.prev.pt damaged: the intact best.pt is the checkpoint left (it was ignored before).
    for name in ("last.pt", "last.prev.pt"):
        (run / "checkpoints" / name).write_bytes(b"damaged")
    saved, path = read_resume_checkpoint(run)
    assert path.name == "best.pt" and saved.step in (3, 6)
    assert "resuming from" in capsys.readouterr().err


def test_no_readable_checkpoint_names_every_file(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"garbage")
    (folder / "last.prev.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        read_resume_checkpoint(tmp_path / "run")
    message = str(err.value)
    assert "last.pt: not a readable checkpoint" in message and "last.prev.pt: not a readable" in message
    assert "no readable checkpoint left" in message


def test_full_disk_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"state": {"step": 1}})

    def disk_full(payload, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        save_checkpoint(path, {"state": {"step": 2}})
    monkeypatch.undo()
    assert load_checkpoint(path)["state"]["step"] == 1  # checksum-verified
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "last.pt.sha256"]  # no leftovers


def test_unwritable_cache_or_log_dir_is_one_line(tiny_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="^data.cache_dir: cannot write"):
        train(tiny_config(f"data.cache_dir={blocker / 'cache'}"), tmp_path / "run")
    with pytest.raises(ConfigError, match="^--log-dir: cannot write"):
        train(tiny_config(), blocker / "run")


# ---------------------------------------------------------------------------------------------------- NaN guard


def poison_training_steps(monkeypatch, bad_steps):
    """Make the loss NaN in the training forwards of the given steps (1-based); evaluation stays clean."""
    make_objective = run_module.make_objective  # the run's objective (Run.build)
    calls = {"n": 0}

    def make(cfg, tokenizer):
        objective = make_objective(cfg, tokenizer)
        accum = cfg.training.gradient_accumulation_steps
        call = objective.__call__

        class Poisoned(type(objective)):
            def __call__(self, *args, **kwargs):
                terms = call(*args, **kwargs)
                if not torch.is_grad_enabled():
                    return terms
                calls["n"] += 1
                step = (calls["n"] - 1) // accum + 1
                if step in bad_steps:
                    return dataclasses.replace(terms, loss=terms.loss * math.nan)
                return terms

        objective.__class__ = Poisoned
        return objective

    monkeypatch.setattr(run_module, "make_objective", make)


def test_a_nonfinite_step_is_skipped_counted_and_logged(tiny_config, tmp_path, monkeypatch):
    poison_training_steps(monkeypatch, {2})
    summary = train(tiny_config("training.max_nonfinite_steps=2"), tmp_path / "run")
    assert summary["step"] == 6 and summary["nonfinite_steps"] == 1
    (event,) = records(tmp_path / "run", "nonfinite")
    assert event["step"] == 2 and event["action"] == "update skipped" and math.isnan(event["loss"])
    steps = {r["step"]: r for r in records(tmp_path / "run", "train")}
    assert math.isnan(steps[2]["loss"]) and all(math.isfinite(steps[s]["loss"]) for s in (1, 3, 4, 5, 6))
    assert steps[6]["nonfinite_steps"] == 1
    payload = load_checkpoint(tmp_path / "run")
    assert payload["state"]["nonfinite_steps"] == 1 and payload["state"]["nonfinite_in_a_row"] == 0
    assert int(payload["optimizer"]["state"][0]["step"]) == 5  # 6 steps, 5 updates
    assert all(torch.isfinite(v).all() for v in payload["model"].values())


def test_too_many_nonfinite_in_a_row_stop_with_a_clear_error(tiny_config, tmp_path, monkeypatch, capsys, data_cache):
    poison_training_steps(monkeypatch, {4, 5, 6})
    config = tmp_path / "tiny.yaml"
    config.write_text("training:\n  max_nonfinite_steps: 2\n")
    argv = ["train", "--config", str(config), "--log-dir", str(tmp_path / "run"), *TINY_OVERRIDES,
            f"data.cache_dir={data_cache}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("atat train: error: training.max_nonfinite_steps: the loss or gradients were NaN/inf")
    assert "steps 4-5" in err and "last.pt" in err
    assert [r["step"] for r in records(tmp_path / "run", "nonfinite")] == [4, 5]
    assert load_checkpoint(tmp_path / "run")["state"]["step"] == 3  # the last good checkpoint is untouched

    with pytest.raises(NonFiniteError):
        train(tiny_config("training.max_nonfinite_steps=1"), tmp_path / "again")


def test_a_torch_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    """B2: a bare state dict was `KeyError: 'config'` in eval, sample, export and resume; a text file printed torch's
    advice to load with weights_only=False (which runs the file's code)."""
    state_dict = tmp_path / "sd.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), state_dict)
    text = tmp_path / "README.md"
    text.write_text("# not a checkpoint\n")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(torch.nn.Linear(2, 2).state_dict(), run / "checkpoints" / "last.pt")
    commands = [
        (["eval", "--checkpoint", str(state_dict)], "not a checkpoint of atat train"),
        (["sample", "--checkpoint", str(state_dict), "--no-progress"], "not a checkpoint of atat train"),
        (["export", "--checkpoint", str(state_dict), "--out", str(tmp_path / "out")], "not a checkpoint of atat"),
        (["train", "--log-dir", str(run), "--resume"], "not a checkpoint of atat train"),
        (["eval", "--checkpoint", str(text)], "not a readable checkpoint"),
    ]
    for argv, message in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith(f"atat {argv[0]}: error: "), err
        assert "weights_only" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "run", "sd.pt"]
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "last.pt"]
