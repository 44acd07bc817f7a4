"""From `data:` config to what training needs: a tokenizer and the packed train / validation blocks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdlm_atat.config import DataConfig
from mdlm_atat.data.sources import load_documents
from mdlm_atat.data.store import TokenStore, prepare_split
from mdlm_atat.data.tokenizers import Tokenizer, build_tokenizer


@dataclass
class RunData:
    tokenizer: Tokenizer
    train: TokenStore
    val: TokenStore

    @property
    def train_blocks(self) -> np.ndarray:  # (N, L)
        return self.train.blocks

    @property
    def val_blocks(self) -> np.ndarray:  # (N, L)
        return self.val.blocks


def build_run_data(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> RunData:
    """Build (or reuse from the cache) the tokenizer and token stores. A resumed run passes its saved tokenizer."""
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, lambda: load_documents(cfg, cfg.train_split))
    return RunData(
        tokenizer=tokenizer,
        train=prepare_split(cfg, tokenizer, cfg.train_split),
        val=prepare_split(cfg, tokenizer, cfg.val_split),
    )
