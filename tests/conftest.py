"""Shared fixtures: a tiny config on the embedded stdlib-docs corpus, with one cache for the whole session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# One thread per process, set before torch starts and inherited by the subprocesses tests launch: the test
# models are 32 wide, so intra-op threads add only synchronisation, and on a 2-core machine with anything else
# running, two spinning OpenMP threads made a tiny training run 5-10x slower (measured: 0.6 s vs 5-11 s).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from mdlm_atat.config import Config, load_config  # noqa: E402

torch.set_num_threads(1)

# Tests never reach the HF hub (STYLE principle 7), and transformers' copies of an export's remote code go to a
# folder removed at exit rather than ~/.cache; both are read when transformers is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_HF_MODULES = tempfile.TemporaryDirectory(prefix="hf-modules-")
os.environ.setdefault("HF_MODULES_CACHE", _HF_MODULES.name)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "atat"

TINY_OVERRIDES = [
    "data.dataset_name=stdlib-docs",
    "data.tokenizer=bpe",
    "data.tokenizer_vocab_size=512",
    "data.batch_size=8",
    "data.max_length=32",
    "data.num_workers=0",
    "model.hidden_dim=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.cond_dim=16",
    "model.dropout=0.1",
    "training.total_steps=6",
    "training.warmup_steps=2",
    "training.learning_rate=3e-3",
    "training.ema_decay=0.9",
    "training.log_every_n_steps=1",
    "training.eval_every_n_steps=3",
    "training.eval_batches=2",
    "training.save_every_n_steps=3",
    "training.mixed_precision=fp32",
    "training.device=cpu",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenizer/token-store cache for the session: each tiny run reuses what the first one built."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_config(data_cache):
    """A factory: tiny_config("training.total_steps=10", ...) -> Config (2-layer, 32-wide DiT, L = 32)."""

    def make(*overrides: str) -> Config:
        return load_config(None, TINY_OVERRIDES + [f"data.cache_dir={data_cache}", *overrides])

    return make
