"""A golden run: eight CPU steps of ATAT (estimator, tilted masks in every curriculum stage, EMA, validation) give
exactly the losses and weights recorded in tests/golden/atat_cpu_steps.json.

It guards refactors of the training step against silent changes (STYLE: torchtitan's golden loss curve). The
inputs are fixed files (the first documents of ../shared/corpora/brown.jsonl, GPT-2's tokenizer files), so
the record does not depend on the Python that runs it. A change that is meant to change the numbers records them
again, on purpose and in its own commit: `ATAT_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py`.
Bitwise equality holds on one machine and library build; another CPU's kernels may round differently.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES

from mdlm_atat.config import load_config
from mdlm_atat.train.checkpoint import load_checkpoint
from mdlm_atat.train.trainer import train
from test_data import GPT2, SHARED, needs_shared

GOLDEN = Path(__file__).parent / "golden" / "atat_cpu_steps.json"
NUM_DOCUMENTS = {"train": 30, "validation": 4}


def corpus(path: Path) -> Path:
    kept, counts = [], dict.fromkeys(NUM_DOCUMENTS, 0)
    with open(SHARED / "corpora" / "brown.jsonl") as f:
        for line in f:
            split = json.loads(line)["split"]
            if split in NUM_DOCUMENTS and counts[split] < NUM_DOCUMENTS[split]:
                counts[split] += 1
                kept.append(line)
    path.write_text("".join(kept))
    return path


def digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name].detach().contiguous().cpu()
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(value.numpy().tobytes())
    return h.hexdigest()


@needs_shared
def test_atat_steps_match_the_golden_record(tmp_path):
    cfg = load_config(None, [
        *TINY_OVERRIDES, f"data.dataset_name={corpus(tmp_path / 'brown.jsonl')}", f"data.tokenizer={GPT2}",
        f"data.cache_dir={tmp_path / 'cache'}", "training.total_steps=9", "training.eval_every_n_steps=9",
        "training.save_every_n_steps=9", "atat.estimator_warmup_steps=1", "atat.beta0=1.0",
        "atat.estimator_hidden_dim=16", "atat.estimator_num_heads=2", "atat.estimator_cond_dim=8",
        "atat.diagnostics_batches=0",
        # Recorded before vocabulary padding existed: its tensors' shapes (hence their digests) are unpadded ones.
        # A padded run computes the same function, not the same bits (test_trainer.py compares the two).
        "model.pad_vocab_multiple=1",
    ])
    run = tmp_path / "run"
    train(cfg, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    payload = load_checkpoint(run)
    got = {
        "losses": [r["loss"] for r in records if r["event"] == "train"],
        "stages": [r["stage"] for r in records if r["event"] == "train"],
        "val_nelbo": [r["val_nelbo"] for r in records if r["event"] == "val"],
        "weights": {part: digest(payload[part]) for part in ("model", "ema", "estimator")},
    }
    if os.environ.get("ATAT_RECORD_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert {"easy", "medium", "hard"} <= set(got["stages"])  # every curriculum stage is exercised
    assert got == expected
