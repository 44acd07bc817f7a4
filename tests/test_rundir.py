"""The run folder (train/rundir.py): nothing a user types overwrites a run; one `atat train` per folder at a time;
a resumed run keeps its model and logs what the uninterrupted run logs (issue 19)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mdlm_atat.cli import main
from mdlm_atat.train.checkpoint import RunDirError
from mdlm_atat.train.rundir import LOCK_NAME, STALE_S, RunLock, trim_metrics
from mdlm_atat.train.trainer import train

from conftest import TINY_OVERRIDES


def files(folder):
    """Every file under `folder` with its bytes: what a refused command must leave exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("atat train: error: "), err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache):
    """A tiny run of 4 steps (checkpoints at 3 and 4), as the CLI makes it."""
    run = tmp_path_factory.mktemp("rundir") / "run"
    argv = ["train", "--log-dir", str(run), *TINY_OVERRIDES, f"data.cache_dir={data_cache}", "training.total_steps=4",
            "logging.tensorboard=false"]
    config = run.parent / "tiny.yaml"
    config.write_text("{}\n")
    assert main(argv[:1] + ["--config", str(config)] + argv[1:]) == 0
    return run


def test_a_new_run_never_writes_into_a_folder_holding_a_run(tmp_path, data_cache, capsys):
    """B5: config.yaml and metrics.jsonl without checkpoints/ (a run that died early, or another tool's) stay."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("mine: true\n")
    (folder / "metrics.jsonl").write_text('{"event": "train", "step": 7, "loss": 1.0}\n')
    before = files(folder)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    argv = ["train", "--config", str(config), "--log-dir", str(folder), *TINY_OVERRIDES, f"data.cache_dir={data_cache}"]
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert "already holds a run (config.yaml, metrics.jsonl)" in err and "--resume" in err
    assert files(folder) == before
    # --resume with --config relaunches a run that never saved a checkpoint: it starts over there.
    assert main(argv + ["--resume", "--max-steps", "1"]) == 0
    assert "done: step 1" in capsys.readouterr().out
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] <= 1 for r in records)  # the step-7 record of the attempt that never saved is gone


@pytest.mark.parametrize("override, key", [("model.hidden_dim=64", "model.hidden_dim"), ("model.name=ar", "model.name"),
                                            ("model.size=tiny", "model.size")])
def test_resume_refuses_an_override_that_changes_the_model(finished_run, override, key, capsys):
    """B1: was a traceback after config.yaml had been rewritten with the rejected config."""
    before = files(finished_run)
    extra = ["atat.enabled=false"] if override == "model.name=ar" else []
    assert main(["train", "--log-dir", str(finished_run), "--resume", override, *extra]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"atat train: error: {key}: ") and "differs from" in err and "another --log-dir" in err
    assert files(finished_run) == before


def test_a_finished_run_relaunched_shows_its_figures(finished_run, capsys):
    """Re-running the command of a finished run prints its final figures, not only "done: step 4"."""
    checkpoints = files(finished_run / "checkpoints")
    assert main(["train", "--log-dir", str(finished_run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "done: step 4" in out and "already at training.total_steps (4)" in out
    assert "validation NELBO" in out and "(step 4" in out and "train loss" in out
    assert files(finished_run / "checkpoints") == checkpoints


HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then"}).encode())
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_second_train_on_a_locked_folder_is_one_line(finished_run, tmp_path, capsys):
    """Two `atat train` on one folder: the second refuses, naming the holder, and changes nothing."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(finished_run / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = files(finished_run)
        assert main(["train", "--log-dir", str(finished_run), "--resume", "training.total_steps=5"]) == 2
        err = one_line(capsys.readouterr().err)
        assert f"in use by another atat train (pid {holder.pid} on {socket.gethostname()}" in err
        assert files(finished_run) == before
    finally:
        holder.kill()
        holder.wait()
    # kill -9 left the lock file behind: the next command takes it over with a note, and removes it at the end.
    assert (finished_run / LOCK_NAME).is_file()
    with RunLock.acquire(finished_run):
        assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().err
        assert json.loads((finished_run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (finished_run / LOCK_NAME).exists()


def test_locks_of_other_hosts_are_stale_only_without_a_heartbeat(tmp_path, capsys):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(RunDirError, match="in use by another atat train \\(pid 1 on elsewhere since then\\)"):
        RunLock.acquire(tmp_path)
    old = time.time() - STALE_S - 60
    os.utime(lock, (old, old))  # its holder stopped refreshing it ten minutes ago
    RunLock.acquire(tmp_path).release()
    assert "taking over the lock of pid 1 on elsewhere" in capsys.readouterr().err
    with RunLock.acquire(tmp_path):  # a live holder in this very process: a second acquire is refused
        with pytest.raises(RunDirError, match="in use"):
            RunLock.acquire(tmp_path)


def test_resumed_run_logs_what_the_uninterrupted_run_logs(tiny_config, tmp_path, capsys):
    """B8: killed after a checkpoint, resumed: the first loss logged after the resume is the uninterrupted run's
    (the log window is part of the checkpoint), and metrics.jsonl holds each step once."""
    overrides = ("training.total_steps=8", "training.log_every_n_steps=4", "training.save_every_n_steps=3",
                 "training.eval_every_n_steps=100", "logging.tensorboard=false", "atat.enabled=false")
    whole = tmp_path / "whole"
    train(tiny_config(*overrides), whole)
    run = tmp_path / "run"
    train(tiny_config(*overrides), run, max_steps=5)  # checkpoints at steps 3 and 5; logs at 1, 4, 5
    checkpoints = run / "checkpoints"
    for name in ("last.pt", "last.pt.sha256"):  # kill -9 between the two saves: last.pt is the step-3 one
        os.replace(checkpoints / name.replace("last", "last.prev"), checkpoints / name)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "st')  # a line the kill cut short
    capsys.readouterr()
    train(tiny_config(*overrides), run, resume=True)
    assert "records after step 3 (the checkpoint) removed" in capsys.readouterr().err

    def losses(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["event"] == "train"]

    assert losses(run) == losses(whole)  # steps 1, 4, 8 once each, bit for bit; was 6.4824 vs 6.6017 at step 4
    split = tmp_path / "split"  # --max-steps: a log at the end of an invocation leaves the window open
    train(tiny_config(*overrides), split, max_steps=6)
    train(tiny_config(*overrides), split, resume=True)
    assert [x for x in losses(split) if x[0] != 6] == losses(whole)


def test_trim_metrics_keeps_the_checkpoints_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start", "step": 0}\n{"event": "train", "step": 3}\n{"event": "train", "step": 4}\n'
                    '{"event": "tr')
    assert trim_metrics(path, 3) == 2
    assert path.read_text() == '{"event": "start", "step": 0}\n{"event": "train", "step": 3}\n'
    assert trim_metrics(path, 3) == 0 and trim_metrics(tmp_path / "none.jsonl", 3) == 0
