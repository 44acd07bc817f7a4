"""The training loop: exact resume, learning, checkpoints, run-folder safety."""

import json
import math

import pytest
import torch

from mdlm_atat.config import ConfigError, load_config
from mdlm_atat.eval.run import evaluate_checkpoint, load_for_inference
from mdlm_atat.models.dit import VOCAB_TENSORS
from mdlm_atat.train.checkpoint import CheckpointError, RunDirError, load_checkpoint
from mdlm_atat.train.trainer import train


def records(run_dir, event):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


@pytest.mark.parametrize("accum", [1, 2])
def test_train_2n_equals_train_n_then_resume_n(tiny_config, tmp_path, accum):
    cfg = tiny_config(f"training.gradient_accumulation_steps={accum}")
    whole = train(cfg, tmp_path / "whole")
    train(tiny_config(f"training.gradient_accumulation_steps={accum}"), tmp_path / "split", max_steps=3)
    resumed = train(tiny_config(f"training.gradient_accumulation_steps={accum}"), tmp_path / "split", resume=True)
    assert whole["step"] == resumed["step"] == 6

    def losses(run):
        return {r["step"]: r["loss"] for r in records(tmp_path / run, "train")}

    assert losses("whole") == losses("split")  # identical, not merely close, on CPU
    assert whole["val"] == resumed["val"]
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["state"]["samples_seen"] == b["state"]["samples_seen"] == 6 * 8 * accum
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_a_run_with_vocabulary_padding_trains_as_one_without(tiny_config, tmp_path):
    """model.pad_vocab_multiple changes the GEMMs' shapes, not the function: from the same seed the padded run (513
    ids -> 576 rows) starts from the same weights (the estimator too: the init draws the same numbers), logs the
    same losses and ends with the same real rows, its padding rows still exactly zero."""
    overrides = ("atat.estimator_warmup_steps=1", "logging.tensorboard=false")  # tilted masks from step 2
    for multiple in (1, 64):
        train(tiny_config(f"model.pad_vocab_multiple={multiple}", *overrides), tmp_path / f"pad{multiple}")
    plain, padded = (records(tmp_path / run, "train") for run in ("pad1", "pad64"))
    # A GEMM of another N may round its last bits differently (at GPT-2's 50,258 vs 50,304 the golden run's
    # validation bound moved by 3e-9 relative); here the tiny run is usually bitwise equal.
    assert [r["loss"] for r in padded] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert [r["val_nelbo"] for r in records(tmp_path / "pad64", "val")] == pytest.approx(
        [r["val_nelbo"] for r in records(tmp_path / "pad1", "val")], rel=1e-5)
    a, b = load_checkpoint(tmp_path / "pad1"), load_checkpoint(tmp_path / "pad64")
    assert a["model"]["vocab_embed.embedding"].shape[0] == 513 and b["model"]["vocab_embed.embedding"].shape[0] == 576
    for part in ("model", "ema", "estimator"):
        for key, value in a[part].items():
            real = b[part][key][: len(value)] if key in VOCAB_TENSORS else b[part][key]
            torch.testing.assert_close(real, value, rtol=1e-5, atol=1e-6, msg=f"{part} {key}")
    for part, key in ((part, key) for part in ("model", "ema") for key in VOCAB_TENSORS):
        assert not b[part][key][513:].any(), f"{part} {key}"


def test_short_training_lowers_the_validation_bound(tiny_config, tmp_path):
    cfg = tiny_config(
        "training.total_steps=60", "training.eval_every_n_steps=1000", "training.save_every_n_steps=1000",
        "training.log_every_n_steps=20", "training.eval_batches=4", "model.dropout=0.0",
    )
    summary = train(cfg, tmp_path / "run")
    vocab_size = load_config(tmp_path / "run" / "config.yaml").model.vocab_size  # the run takes the tokenizer's
    initial = (1 - cfg.diffusion.eps) * math.log(vocab_size)  # the untrained model's bound
    assert summary["val"]["nelbo"] < initial - 0.5
    assert summary["last_loss"] < summary["first_loss"] - 0.5


def test_checkpoint_holds_everything_to_resume(tiny_config, tmp_path):
    train(tiny_config(), tmp_path / "run")
    payload = load_checkpoint(tmp_path / "run")  # a run folder resolves to its last.pt
    for key in ("model", "ema", "optimizer", "scheduler", "rng", "state", "config", "config_hash", "tokenizer"):
        assert payload[key] is not None, key
    assert not any(k.startswith("_orig_mod.") for k in payload["model"])
    assert payload["state"]["step"] == 6
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    # The saved config records the tokenizer's vocabulary, resolved from model.vocab_size: null.
    assert payload["config"]["model"]["vocab_size"] == 512


def test_existing_run_folder_needs_resume(tiny_config, tmp_path):
    train(tiny_config("training.total_steps=3"), tmp_path / "run")
    with pytest.raises(RunDirError, match="--resume"):
        train(tiny_config(), tmp_path / "run")


def test_resume_without_checkpoint_is_a_clear_error(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints/last.pt"):
        train(tiny_config(), tmp_path / "empty", resume=True)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(bad)


def test_vocab_size_must_match_the_tokenizer(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="^model.vocab_size"):
        train(tiny_config("model.vocab_size=50257"), tmp_path / "run")


def test_evaluate_checkpoint_uses_ema_and_reports_provenance(tiny_config, tmp_path):
    train(tiny_config(), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    result = evaluate_checkpoint(ckpt, max_batches=2, device="cpu")
    assert result["weights"] == "ema" and result["step"] == 6
    assert result["num_tokens"] == 2 * 8 * 32
    assert result == evaluate_checkpoint(ckpt, max_batches=2, device="cpu")  # deterministic
    raw = evaluate_checkpoint(ckpt, max_batches=2, device="cpu", use_ema=False)
    assert raw["weights"] == "raw" and raw["nelbo"] != result["nelbo"]
    loaded = load_for_inference(ckpt)
    assert not loaded.model.training and loaded.config_hash == loaded.cfg.hash()


def test_padded_framing_trains_and_never_counts_padding(tiny_config, tmp_path):
    import random

    rng = random.Random(0)
    words = "the a model token mask noise time step loss data text sample".split()
    corpus = tmp_path / "sentences.jsonl"
    with open(corpus, "w") as f:
        for i in range(400):
            split = "train" if i < 320 else "validation" if i < 360 else "test"
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
            f.write(json.dumps({"text": text, "split": split}) + "\n")
    cfg = tiny_config(f"data.dataset_name={corpus}", "data.framing=padded", "data.max_length=32",
                      "training.total_steps=3", "data.tokenizer_vocab_size=300")
    summary = train(cfg, tmp_path / "run")
    assert math.isfinite(summary["last_loss"])
    result = evaluate_checkpoint(tmp_path / "run", max_batches=2, device="cpu")
    assert 0 < result["num_tokens"] < 2 * 8 * 32 / 2  # short sentences: most positions are padding, not counted


def test_a_large_model_on_the_cpu_says_what_it_costs(tiny_config, capsys):
    """model.size=tiny (31M parameters, 15x the quickstart's) started on a CPU without a word."""
    from mdlm_atat.train.trainer import _note_cpu_cost

    _note_cpu_cost(torch.nn.Linear(4096, 4096), torch.device("cpu"), tiny_config())  # 16.8M parameters
    err = capsys.readouterr().err
    assert err.startswith("note: a 16.8M-parameter denoiser on the CPU (8x the quickstart's 2.1M)")
    assert "s per step" in err
    _note_cpu_cost(torch.nn.Linear(64, 64), torch.device("cpu"), tiny_config())
    assert capsys.readouterr().err == ""
