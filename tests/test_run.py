"""The run object's checkpoint schema: one writer, one reader, versioned; checkpoints from before the version
was recorded, and from before vocabulary padding, still load and resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mdlm_atat.cli import main
from mdlm_atat.eval.run import evaluate_checkpoint
from mdlm_atat.export import export_checkpoint
from mdlm_atat.run import CHECKPOINT_FORMAT, RunCheckpoint, load_for_inference, read_checkpoint
from mdlm_atat.train.checkpoint import CheckpointError, checksum_path, load_checkpoint
from mdlm_atat.train.trainer import train


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


def test_the_written_payload_is_the_schema_and_round_trips(tiny_config, tmp_path):
    train(tiny_config(), tmp_path / "run")
    payload = load_checkpoint(tmp_path / "run")
    assert payload["format_version"] == CHECKPOINT_FORMAT
    saved = RunCheckpoint.from_dict(payload, "last.pt")
    again = saved.to_dict()
    assert list(again) == list(payload)  # the same keys, in the order files have
    assert again["state"] == payload["state"] and saved.step == 6 and saved.cfg.hash() == saved.config_hash


def test_a_checkpoint_without_format_version_still_loads_and_resumes(tiny_config, tmp_path):
    """Checkpoints written before format_version was recorded: read as format 1."""
    cfg = tiny_config("training.total_steps=9")
    train(cfg, tmp_path / "run", max_steps=6)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "run", old)
    last = old / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    del payload["format_version"]
    torch.save(payload, last)  # as older versions wrote it
    checksum_path(last).unlink()
    assert read_checkpoint(last).format_version == 1
    loaded, fresh = load_for_inference(last), load_for_inference(tmp_path / "run")
    assert loaded.step == fresh.step == 6 and loaded.weights == "ema"
    for a, b in zip(loaded.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    train(cfg, old, resume=True)
    train(cfg, tmp_path / "run", resume=True)
    assert _losses(old) == _losses(tmp_path / "run")  # bitwise, on CPU


def test_a_newer_format_or_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    with pytest.raises(CheckpointError, match="newer than this mdlm-atat reads"):
        RunCheckpoint.from_dict({"format_version": CHECKPOINT_FORMAT + 1, "config": {}, "tokenizer": "", "state": {},
                                 "model": {}}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint of atat train"):
        RunCheckpoint.from_dict({"weight": torch.ones(2)}, path)


def test_a_run_from_before_vocabulary_padding_loads_resumes_and_exports(tiny_config, tmp_path, capsys):
    """Checkpoints (format 1) and exports written before model.pad_vocab_multiple hold unpadded tensors and no such
    key: their configs read as 1 (no padding), so they resume, evaluate and export bit for bit as before."""
    cfg = tiny_config("training.total_steps=9", "model.pad_vocab_multiple=1", "logging.tensorboard=false")
    train(cfg, tmp_path / "run", max_steps=6)  # unpadded: what older versions computed (test_golden.py)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "run", old)
    for path in (old / "checkpoints").glob("*.pt"):
        payload = load_checkpoint(path)
        del payload["format_version"], payload["config"]["model"]["pad_vocab_multiple"]
        torch.save(payload, path)  # as older versions wrote it
        checksum_path(path).unlink()
    saved = read_checkpoint(old)
    assert saved.format_version == 1 and saved.config["model"]["pad_vocab_multiple"] == 1
    loaded, fresh = load_for_inference(old), load_for_inference(tmp_path / "run")
    assert loaded.model.num_tokens == loaded.model.padded_tokens == 513
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), fresh.model.state_dict().values()))

    # Exported as before, and an export from before (config.json without the key) loads as before.
    export_checkpoint(old, tmp_path / "export")
    config_json = tmp_path / "export" / "config.json"
    info = json.loads(config_json.read_text())
    del info["mdlm_atat"]["config"]["model"]["pad_vocab_multiple"]
    config_json.write_text(json.dumps(info))
    exported = load_for_inference(tmp_path / "export")
    assert exported.cfg.model.pad_vocab_multiple == 1
    assert all(torch.equal(a, b) for a, b in zip(exported.model.state_dict().values(), fresh.model.state_dict().values()))
    before = evaluate_checkpoint(tmp_path / "run", max_batches=1, device="cpu")
    assert evaluate_checkpoint(old, max_batches=1, device="cpu")["nelbo"] == before["nelbo"]
    assert evaluate_checkpoint(tmp_path / "export", max_batches=1, device="cpu")["nelbo"] == before["nelbo"]

    # A resume keeps the tensors' shape: padding cannot be switched on; with the saved config it continues.
    assert main(["train", "--log-dir", str(old), "--resume", "model.pad_vocab_multiple=64"]) == 2
    assert "model.pad_vocab_multiple: 64 differs from 1" in capsys.readouterr().err
    assert main(["train", "--log-dir", str(old), "--resume"]) == 0
    train(cfg, tmp_path / "run", resume=True)
    assert _losses(old) == _losses(tmp_path / "run")  # bitwise, on CPU
    assert read_checkpoint(old).format_version == CHECKPOINT_FORMAT  # written anew, with the key
