"""`atat prepare` (alias `atat download`): datasets -> token stores, with one summary line per split.

The stores land where training and evaluation look for them (`<data.cache_dir>/stores/<key>/`), so
`atat prepare ... --output-dir DIR` followed by `atat train ... data.cache_dir=DIR` tokenizes nothing twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from mdlm_atat.config import DataConfig
from mdlm_atat.data.sources import DataError, EmptySplitError, iter_documents, open_source, with_split_fix
from mdlm_atat.data.store import TokenStore, prepare_split
from mdlm_atat.data.tokenizers import build_tokenizer


def describe(store: TokenStore) -> str:
    """One line: what a split's store holds, and whether it was written now or reused."""
    m = store.manifest
    how = "reused" if store.reused else f"written in {m['seconds']:.1f} s ({m['tokens_per_s'] / 1e6:.2f}M tokens/s)"
    parts = [f"{m['num_documents']:,} documents", f"num_document_tokens {m['num_document_tokens']:,}",
             f"{m['num_blocks']:,} blocks of {m['max_length']} ({m['dtype']})"]
    if m.get("num_truncated_documents"):
        parts.append(f"{m['num_truncated_documents']:,} documents truncated ({m['num_truncated_tokens']:,} tokens)")
    if m["split"] != m["source_split"]:
        parts.append(f"source split {m['source_split']}")
    return f"{how}: {', '.join(parts)} -> {store.folder / m['file']}"


def prepare_datasets(
    cfg: DataConfig,
    datasets: list[str] | None = None,
    splits: list[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, dict[str, TokenStore]]:
    """Prepare `splits` (default: train, validation and test as the config names them) of each dataset (default:
    `cfg.dataset_name`) with the tokenizer, L and framing of `cfg`. Returns {dataset: {split: store}}.

    A split the dataset lacks is skipped with a note; a dataset with no split at all is an error. A dataset named
    here other than `cfg.dataset_name` is read without `cfg.dataset_config`."""
    splits = list(dict.fromkeys(splits or [cfg.train_split, cfg.val_split, cfg.test_split]))
    prepared: dict[str, dict[str, TokenStore]] = {}
    for name in datasets or [cfg.dataset_name]:
        dcfg = dataclasses.replace(
            cfg, dataset_name=name, dataset_config=cfg.dataset_config if name == cfg.dataset_name else None
        )
        source = open_source(dcfg)
        tokenizer = build_tokenizer(dcfg, lambda dcfg=dcfg: iter_documents(dcfg, dcfg.train_split))
        echo(
            f"{source.name}: tokenizer {tokenizer.name} ({tokenizer.num_tokens:,} ids incl. MASK"
            f"{' and PAD' if dcfg.padded else ''}, {tokenizer.fingerprint()}), framing {dcfg.framing}, "
            f"L = {dcfg.max_length}, stores in {Path(dcfg.cache_dir).expanduser() / 'stores'}"
        )
        stores: dict[str, TokenStore] = {}
        skipped: list[str] = []
        width = max(map(len, splits))
        for split in splits:
            try:
                store = prepare_split(dcfg, tokenizer, split, progress=progress)
            except EmptySplitError as err:
                err = with_split_fix(err, "pass --splits with them")
                echo(f"  {split:<{width}}  skipped: {err}")
                skipped.append(f"{split}: {err}")
                continue
            stores[split] = store
            echo(f"  {split:<{width}}  {describe(store)}")
            problems = store.manifest["input"]
            notes = _input_notes(problems)
            if notes and not store.reused:
                echo(f"  {'':<{width}}  input: {notes}")
        if not stores:
            raise DataError(f"data.dataset_name: {name!r}: no split could be prepared ({'; '.join(skipped)})")
        prepared[name] = stores
    return prepared


def _input_notes(report: dict) -> str:
    from mdlm_atat.data.sources import InputReport

    r = InputReport(**report)
    problems = r.problems()
    return f"{'; '.join(problems)} (first: {r.first_problem})" if problems else ""
