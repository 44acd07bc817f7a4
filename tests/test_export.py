"""`atat export` (issue 8): a HuggingFace-style folder that eval and sample load to the same numbers and samples."""

from __future__ import annotations

import json
import os

import pytest

from mdlm_atat.cli import main
from mdlm_atat.config import ConfigError, load_config
from mdlm_atat.eval.run import evaluate_checkpoint, load_for_inference
from mdlm_atat.export import export_checkpoint
from mdlm_atat.models.dit import VOCAB_TENSORS
from mdlm_atat.sample import sample_checkpoint
from mdlm_atat.train.checkpoint import CheckpointError, load_checkpoint
from mdlm_atat.train.trainer import train

from conftest import TINY_OVERRIDES

safetensors = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("export") / "run"
    train(load_config(None, TINY_OVERRIDES + [f"data.cache_dir={data_cache}", "logging.tensorboard=false"]), run)
    return run


def test_export_round_trips_eval_and_sample(run_dir, tmp_path):
    out = tmp_path / "tiny-atat"
    summary = export_checkpoint(run_dir, out)
    assert summary["files"] == ["README.md", "config.json", "configuration_mdlm_atat.py", "estimator.safetensors",
                                "model.safetensors", "modeling_mdlm_atat.py", "special_tokens_map.json",
                                "tokenizer.json", "tokenizer_config.json"]
    from_ckpt = evaluate_checkpoint(run_dir, max_batches=2, device="cpu")
    from_export = evaluate_checkpoint(out, max_batches=2, device="cpu")
    assert from_export.pop("checkpoint") == str(out)
    from_ckpt.pop("checkpoint")
    assert from_export == from_ckpt  # same NELBO, stderr, tokens, step, config hash, EMA weights

    options = dict(num_steps=8, num_samples=2, seed=3, device="cpu", progress=False)
    a, b = sample_checkpoint(run_dir, **options), sample_checkpoint(out, **options)
    assert a["samples"] == b["samples"]
    easy_first = dict(options, sampler="confidence", order="easy-first")  # the estimator travels with the export
    a, b = sample_checkpoint(run_dir, **easy_first), sample_checkpoint(out, **easy_first)
    assert a["samples"] == b["samples"] and b["order"] == "easy-first"

    payload = load_checkpoint(run_dir)
    weights = safetensors.load_file(str(out / "model.safetensors"))
    assert weights.keys() == payload["ema"].keys()
    # The vocabulary tensors' real rows (513: 512 + MASK); the run's padding rows (to 576) are zeros, left out.
    assert weights["vocab_embed.embedding"].shape[0] == 513 and payload["ema"]["vocab_embed.embedding"].shape[0] == 576
    assert all((weights[k] == payload["ema"][k][: len(weights[k])]).all() for k in weights)
    assert all((payload[part][k][513:] == 0).all() for part in ("model", "ema") for k in VOCAB_TENSORS)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 2 and config["mask_token_id"] == 512
    assert config["mdlm_atat"]["step"] == 6 and config["mdlm_atat"]["weights"] == "ema"
    loaded = load_for_inference(out)
    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    tokens = 6 * cfg.data.batch_size * cfg.data.max_length
    assert not loaded.model.training and loaded.estimator is None
    assert (loaded.step, loaded.config_hash, loaded.weights, loaded.tokens_seen) == (6, cfg.hash(), "ema", tokens)
    assert tokenizer.to_json() == payload["tokenizer"]


def test_model_card_shows_the_evaluation_numbers(run_dir, tmp_path):
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["event"] == "val" and r["step"] == 6][-1]
    extra = tmp_path / "brown.json"
    extra.write_text(json.dumps({"nelbo": 7.25, "stderr": 0.05, "ppl": 1408.1, "num_tokens": 4096, "step": 6,
                                 "dataset": "brown.jsonl", "split": "validation", "config_hash": "elsewhere"}))
    export_checkpoint(run_dir, tmp_path / "out", eval_files=[extra])
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mdlm-atat")
    assert f"| {val['val_nelbo']:.4f} +- {val['val_stderr']:.4f} |" in card  # the bound logged at step 6
    assert "| brown.jsonl | validation | 7.2500 +- 0.0500 | 1408.10 |" in card
    assert "atat eval --checkpoint out" in card and "total_steps: 6" in card


def test_export_cli_and_its_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 2
    assert "holds a previous export; pass --force" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out), "--force", "--no-ema"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--max-batches", "1", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "raw"
    with pytest.raises(CheckpointError, match="already an exported folder"):
        export_checkpoint(out, tmp_path / "again")
    export_checkpoint(run_dir, tmp_path / "ema")
    with pytest.raises(ConfigError, match="--no-ema"):
        load_for_inference(tmp_path / "ema", use_ema=False)
    (tmp_path / "ema" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot load"):
        load_for_inference(tmp_path / "ema")


def _files(folder):
    """Every file under `folder` with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_replaces_only_a_previous_export(run_dir, tmp_path, capsys, monkeypatch):
    """--force on the run folder itself, on a folder of other files, on `.`: one line, exit 2, nothing touched."""
    best = str(run_dir / "checkpoints" / "best.pt")
    before = _files(run_dir)
    assert main(["export", "--checkpoint", best, "--out", str(run_dir), "--force"]) == 2
    err = capsys.readouterr().err
    assert "holds the checkpoint being exported" in err and err.count("\n") == 1
    assert _files(run_dir) == before
    other_run = tmp_path / "other-run"  # a run folder (or any folder) that is not an export
    (other_run / "checkpoints").mkdir(parents=True)
    (other_run / "checkpoints" / "last.pt").write_bytes(b"weights")
    (other_run / "notes.txt").write_text("mine")
    kept = _files(other_run)
    assert main(["export", "--checkpoint", best, "--out", str(other_run), "--force"]) == 2
    err = capsys.readouterr().err
    assert "not an atat export" in err and err.count("\n") == 1
    assert _files(other_run) == kept
    monkeypatch.chdir(other_run)
    assert main(["export", "--checkpoint", best, "--out", ".", "--force"]) == 2  # was: ValueError (empty name)
    err = capsys.readouterr().err
    assert "current folder" in err and err.count("\n") == 1
    assert _files(other_run) == kept
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(["export", "--checkpoint", best, "--out", "."]) == 2
    capsys.readouterr()
    assert list(empty.iterdir()) == []


def test_exported_files_are_readable_by_others(run_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        export_checkpoint(run_dir, tmp_path / "shared")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "shared").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
