"""Text -> packed blocks of token ids in a memory-mapped store with a manifest (DESIGN section 4).

Framing as MDLM on OpenWebText ("wrap"): every document + EOS, concatenated into one stream, cut into chunks of
L - 2, each framed [BOS] chunk [EOS]; the final partial chunk is dropped. A store is written once per
(source, split, tokenizer, L) and reused while its manifest matches.

    <cache_dir>/stores/<key>/<split>.bin      raw (num_blocks, L) array, dtype from the manifest
    <cache_dir>/stores/<key>/manifest.json    written last: a store without it is incomplete and never used
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mdlm_atat.config import DataConfig
from mdlm_atat.data.sources import DataError, load_documents, source_fingerprint
from mdlm_atat.data.tokenizers import Tokenizer

STORE_VERSION = 1  # bump when the layout or the framing code changes, so old stores are rebuilt
_ENCODE_CHUNK_DOCS = 256  # documents per encode_batch call: enough to keep HF's thread pool busy


def token_dtype(num_tokens: int) -> np.dtype:
    # uint16 holds every id of a vocabulary up to 65,536 (GPT-2's 50,258 with MASK included): half the disk and
    # page cache of uint32, and blocks are widened to int64 only per batch, in the loader.
    return np.dtype(np.uint16) if num_tokens <= 1 << 16 else np.dtype(np.uint32)


def iter_blocks(
    docs_ids: Iterable[list[int]], max_length: int, bos_id: int, eos_id: int, dtype: np.dtype
) -> Iterator[np.ndarray]:
    """Yield (n, L) arrays of framed blocks as the docs + EOS stream fills them; the partial tail is dropped."""
    if max_length < 3:
        raise DataError(f"data.max_length: must leave room for BOS, EOS and content, got {max_length}")
    chunk = max_length - 2
    pending = np.empty(0, dtype=dtype)  # stream tokens not yet in a block (< chunk of them between groups)
    group: list[np.ndarray] = []
    group_len = 0

    def flush() -> Iterator[np.ndarray]:
        nonlocal pending, group, group_len
        stream = np.concatenate([pending, *group])
        group, group_len = [], 0
        n = len(stream) // chunk
        pending = stream[n * chunk :].copy()
        if n:
            blocks = np.empty((n, max_length), dtype=dtype)
            blocks[:, 0] = bos_id
            blocks[:, -1] = eos_id
            blocks[:, 1:-1] = stream[: n * chunk].reshape(n, chunk)
            yield blocks

    for ids in docs_ids:
        doc = np.empty(len(ids) + 1, dtype=dtype)
        doc[:-1] = ids
        doc[-1] = eos_id
        group.append(doc)
        group_len += len(doc)
        if group_len >= 64 * chunk:  # amortise the concatenation over many documents
            yield from flush()
    yield from flush()


def pack_documents(
    docs_ids: Iterable[list[int]], max_length: int, bos_id: int, eos_id: int, num_tokens: int | None = None
) -> np.ndarray:
    """(num_blocks, L) blocks [BOS] chunk [EOS] of the docs + EOS stream. dtype from num_tokens (default: the
    largest id present)."""
    docs_ids = [list(d) for d in docs_ids]
    if num_tokens is None:
        num_tokens = 1 + max([bos_id, eos_id, *(max(d) for d in docs_ids if d)])
    dtype = token_dtype(num_tokens)
    blocks = list(iter_blocks(docs_ids, max_length, bos_id, eos_id, dtype))
    return np.concatenate(blocks) if blocks else np.empty((0, max_length), dtype=dtype)


@dataclass
class TokenStore:
    blocks: np.ndarray  # (num_blocks, L), read-only np.memmap
    manifest: dict[str, Any]

    @property
    def unigram_counts(self) -> np.ndarray | None:
        """(num_tokens,) int64 counts over the train split's blocks (DESIGN 3.2), None for other splits."""
        counts = self.manifest.get("unigram_counts")
        return None if counts is None else np.asarray(counts, dtype=np.int64)


def store_key(cfg: DataConfig, tokenizer: Tokenizer, split: str) -> str:
    """Hash of everything that determines a store's content."""
    parts = [STORE_VERSION, source_fingerprint(cfg), cfg.dataset_name, cfg.dataset_config, split,
             tokenizer.fingerprint(), cfg.framing, cfg.max_length, split == cfg.train_split]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _open_blocks(path: Path, manifest: dict[str, Any]) -> np.ndarray:
    return np.memmap(path, dtype=manifest["dtype"], mode="r", shape=(manifest["num_blocks"], manifest["max_length"]))


def _usable(folder: Path, split: str, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished store matching `expected`, or None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if any(manifest.get(k) != v for k, v in expected.items()):
        return None
    size = manifest["num_blocks"] * manifest["max_length"] * np.dtype(manifest["dtype"]).itemsize
    bin_path = folder / f"{split}.bin"
    return manifest if bin_path.is_file() and bin_path.stat().st_size == size else None


def prepare_split(cfg: DataConfig, tokenizer: Tokenizer, split: str, progress: bool = True) -> TokenStore:
    """Tokenize and pack `split` (a source split name, e.g. cfg.val_split) once; reuse it afterwards."""
    key = store_key(cfg, tokenizer, split)
    folder = Path(cfg.cache_dir).expanduser() / "stores" / key
    is_train = split == cfg.train_split
    expected = {
        "version": STORE_VERSION, "key": key, "source": cfg.dataset_name, "dataset_config": cfg.dataset_config,
        "split": split, "tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint(),
        "framing": cfg.framing, "max_length": cfg.max_length,
    }
    manifest = _usable(folder, split, expected)
    if manifest is not None:
        return TokenStore(_open_blocks(folder / f"{split}.bin", manifest), manifest)

    docs = load_documents(cfg, split)
    dtype = token_dtype(tokenizer.num_tokens)
    counts = np.zeros(tokenizer.num_tokens, dtype=np.int64) if is_train else None
    num_document_tokens = 0  # document tokens + one EOS per document, before framing

    def encoded() -> Iterator[list[int]]:
        nonlocal num_document_tokens
        with tqdm(total=len(docs), desc=f"tokenizing {split}", unit="doc", disable=not progress) as bar:
            for start in range(0, len(docs), _ENCODE_CHUNK_DOCS):
                batch = docs[start : start + _ENCODE_CHUNK_DOCS]
                for ids in tokenizer.encode_batch(batch):
                    num_document_tokens += len(ids) + 1
                    yield ids
                bar.update(len(batch))

    folder.mkdir(parents=True, exist_ok=True)
    # Temporary names carry the pid: concurrent ranks preparing the same store never write the same file, and a
    # leftover from an interrupted run is never mistaken for a store (only manifest.json marks one finished).
    tmp_bin = folder / f"{split}.bin.tmp-{os.getpid()}"
    num_blocks = 0
    try:
        with open(tmp_bin, "wb") as f:
            for blocks in iter_blocks(encoded(), cfg.max_length, tokenizer.bos_id, tokenizer.eos_id, dtype):
                f.write(blocks.tobytes())
                num_blocks += len(blocks)
                if counts is not None:
                    counts += np.bincount(blocks.ravel(), minlength=tokenizer.num_tokens)
        if num_blocks == 0:
            raise DataError(
                f"split {split!r} of {cfg.dataset_name!r} has {num_document_tokens} tokens, too few for one block "
                f"of data.max_length={cfg.max_length}; lower data.max_length or use more text"
            )
        os.replace(tmp_bin, folder / f"{split}.bin")
    finally:
        tmp_bin.unlink(missing_ok=True)

    manifest = {
        **expected,
        "dtype": dtype.name,
        "num_documents": len(docs),
        "num_document_tokens": num_document_tokens,
        "num_blocks": num_blocks,
        "num_tokens": tokenizer.num_tokens,
        # Counts over the stored blocks (framing BOS/EOS included): the tokens the model is trained on.
        "unigram_counts": None if counts is None else counts.tolist(),
    }
    tmp_manifest = folder / f"manifest.json.tmp-{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest))
    os.replace(tmp_manifest, folder / "manifest.json")
    return TokenStore(_open_blocks(folder / f"{split}.bin", manifest), manifest)
