"""Text -> framed blocks of token ids in a memory-mapped store with a manifest (DESIGN section 4, issue 3).

Framings (`data.framing`):
- "packed", MDLM's on OpenWebText: every document + EOS, concatenated into one stream, cut into chunks of L - 2,
  each framed [BOS] chunk [EOS]; the final partial chunk is dropped (counted as `num_dropped_tokens`).
- "padded", unpacked, for sentence-level data such as LM1B (MDLM's `wrap: false`): one row per document,
  [BOS] document [EOS] then PAD up to L; a document longer than L - 2 is truncated (counted). The PAD id is
  never MASK, BOS or EOS (tokenizers.py), so `loader.attention_mask` recovers the real tokens from the ids alone.

Documents stream through: read lazily from the source, tokenized in batches of about 2M characters (in parallel
on the tokenizer's own thread pool), framed and appended to the .bin, so a split never has to fit in memory.
A document longer than `MAX_PIECE_CHARS` is tokenized in pieces cut at a single space between two words, which
gives the same tokens as one call for GPT-2-style pre-tokenizers, and joined again (one EOS).

A store is written once per (source, split, tokenizer, framing, L) and reused while its manifest matches:

    <cache_dir>/stores/<key>/<split>.bin      raw (num_blocks, L) array, dtype from the manifest
    <cache_dir>/stores/<key>/manifest.json    written last: a store without it is incomplete and never used
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdlm_atat.config import DataConfig
from mdlm_atat.data.sources import DataError, EmptySplitError, InputReport, Source, open_source
from mdlm_atat.data.tokenizers import Tokenizer
from mdlm_atat.progress import progress_bar

STORE_VERSION = 2  # bump when the layout or the framing code changes, so old stores are rebuilt
FRAMINGS = ("packed", "padded")
# Characters per encode_batch call: enough texts to keep every thread of the tokenizer busy, few enough that
# the ids of one batch (as Python lists) stay a few tens of MB.
_ENCODE_BATCH_CHARS = 1 << 21
_ENCODE_BATCH_TEXTS = 4096
MAX_PIECE_CHARS = 1 << 20  # longer documents are tokenized in pieces (text8's 90M-character train split: 90)

# One tokenized piece of a document, and whether the document ends with it.
Segment = tuple[list[int], bool]


def token_dtype(num_tokens: int) -> np.dtype:
    # uint16 holds every id of a vocabulary up to 65,536 (GPT-2's 50,258 with MASK included): half the disk and
    # page cache of uint32, and blocks are widened to int64 only per batch, in the loader.
    return np.dtype(np.uint16) if num_tokens <= 1 << 16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------------------
# Tokenization


def split_text(text: str, max_chars: int) -> list[str]:
    """`text` cut into pieces of at most `max_chars` characters, where possible just before a single space
    between two non-space characters (GPT-2's pre-tokenizer then sees the same words: " word" stays whole)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut, floor = start + max_chars, start + max_chars // 2
        p = text.rfind(" ", floor, cut)
        while p > floor and (text[p - 1].isspace() or text[p + 1].isspace()):
            p = text.rfind(" ", floor, p)
        if p > floor:
            cut = p
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def text_batches(docs: Iterable[str], report: InputReport | None = None) -> Iterator[tuple[list[str], list[bool]]]:
    """(texts, ends_document) batches of about _ENCODE_BATCH_CHARS characters, in document order; a document
    longer than MAX_PIECE_CHARS comes as several texts (possibly across batches), the last with ends = True."""
    texts: list[str] = []
    ends: list[bool] = []
    num_chars = 0
    for text in docs:
        pieces = split_text(text, MAX_PIECE_CHARS) if len(text) > MAX_PIECE_CHARS else [text]
        if len(pieces) > 1 and report is not None:
            report.split_documents += 1
        for j, piece in enumerate(pieces):
            texts.append(piece)
            ends.append(j == len(pieces) - 1)
            num_chars += len(piece)
            if num_chars >= _ENCODE_BATCH_CHARS or len(texts) >= _ENCODE_BATCH_TEXTS:
                yield texts, ends
                texts, ends, num_chars = [], [], 0
    if texts:
        yield texts, ends


def encode_documents(
    tokenizer: Tokenizer, docs: Iterable[str], report: InputReport | None = None
) -> Iterator[list[Segment]]:
    """Batches of (ids, ends_document) segments, in document order (see text_batches), each batch encoded in
    parallel on the tokenizer's thread pool."""
    for texts, ends in text_batches(docs, report):
        yield list(zip(tokenizer.encode_batch(texts), ends))


# ----------------------------------------------------------------------------------------------------------
# Framing: one object per framing, fed batches of segments, returning the finished (n, L) rows.


class PackedFramer:
    """MDLM: the docs + EOS stream cut into [BOS] chunk [EOS] blocks of L; the partial tail is dropped."""

    def __init__(self, max_length: int, tokenizer: Tokenizer, dtype: np.dtype) -> None:
        if max_length < 3:
            raise DataError(f"data.max_length: must leave room for BOS, EOS and content, got {max_length}")
        self.L, self.chunk, self.dtype = max_length, max_length - 2, dtype
        self.bos, self.eos = tokenizer.bos_id, tokenizer.eos_id
        self.pending = np.empty(0, dtype=dtype)  # stream tokens not yet in a block (< chunk of them)
        self.stats = {"num_dropped_tokens": 0}

    def add(self, segments: list[Segment]) -> np.ndarray:
        """The blocks completed by `segments` (whose id lists it consumes: EOS is appended in place)."""
        for ids, end in segments:
            if end:
                ids.append(self.eos)
        # The stream of this batch: each document's ids and its EOS (itertools' chain runs at C speed).
        total = sum(len(ids) for ids, _ in segments)
        flat = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in segments), self.dtype, count=total)
        stream = np.concatenate([self.pending, flat])
        n = len(stream) // self.chunk
        self.pending = stream[n * self.chunk :].copy()
        self.stats["num_dropped_tokens"] = len(self.pending)
        blocks = np.empty((n, self.L), dtype=self.dtype)
        blocks[:, 0] = self.bos
        blocks[:, -1] = self.eos
        blocks[:, 1:-1] = stream[: n * self.chunk].reshape(n, self.chunk)
        return blocks


class PaddedFramer:
    """Unpacked: one [BOS] document [EOS] PAD... row per document, truncated to L - 2 document tokens."""

    def __init__(self, max_length: int, tokenizer: Tokenizer, dtype: np.dtype) -> None:
        pad = tokenizer.pad_id
        if pad is None or pad in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id):
            raise DataError(
                f"data.framing: padded needs a padding id distinct from BOS, EOS and MASK; {tokenizer!r} has none "
                "(build the tokenizer with build_tokenizer, which appends one for this framing)"
            )
        if max_length < 2:
            raise DataError(f"data.max_length: must leave room for BOS and EOS, got {max_length}")
        self.L, self.dtype = max_length, dtype
        self.bos, self.eos, self.pad = tokenizer.bos_id, tokenizer.eos_id, pad
        self.current: list[int] = []  # ids of a document still arriving in pieces (at most L - 2 kept)
        self.stats = {"num_truncated_documents": 0, "num_truncated_tokens": 0, "num_padding_tokens": 0}

    def add(self, segments: list[Segment]) -> np.ndarray:
        content = self.L - 2
        docs: list[list[int]] = []
        for ids, end in segments:
            self.current += ids
            if end:
                docs.append(self.current)
                self.current = []
            elif len(self.current) > content:  # a huge document: keep what a row can hold, count the rest
                self.stats["num_truncated_tokens"] += len(self.current) - content - 1
                self.current = self.current[: content + 1]
        rows = np.full((len(docs), self.L), self.pad, dtype=self.dtype)
        rows[:, 0] = self.bos
        for i, ids in enumerate(docs):
            k = min(len(ids), content)
            if len(ids) > content:
                self.stats["num_truncated_documents"] += 1
                self.stats["num_truncated_tokens"] += len(ids) - content
            rows[i, 1 : 1 + k] = ids[:k]
            rows[i, 1 + k] = self.eos
            self.stats["num_padding_tokens"] += content - k
        return rows


FRAMERS = {"packed": PackedFramer, "padded": PaddedFramer}


@dataclass
class _Ids:  # the special ids a framer reads, for callers without a Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int | None = None
    mask_id: int | None = None


def pack_documents(
    docs_ids: Iterable[list[int]], max_length: int, bos_id: int, eos_id: int, num_tokens: int | None = None
) -> np.ndarray:
    """(num_blocks, L) blocks [BOS] chunk [EOS] of the docs + EOS stream, in memory (tests, small data). dtype
    from num_tokens (default: the largest id present)."""
    docs_ids = [list(d) for d in docs_ids]
    if num_tokens is None:
        num_tokens = 1 + max([bos_id, eos_id, *(max(d) for d in docs_ids if d)])
    framer = PackedFramer(max_length, _Ids(bos_id, eos_id), token_dtype(num_tokens))
    return framer.add([(d, True) for d in docs_ids])


# ----------------------------------------------------------------------------------------------------------
# The store


@dataclass
class TokenStore:
    blocks: np.ndarray  # (num_blocks, L), read-only np.memmap
    manifest: dict[str, Any]
    reused: bool = False  # True when an existing store was opened instead of written

    @property
    def folder(self) -> Path:
        return Path(self.blocks.filename).parent

    @property
    def unigram_counts(self) -> np.ndarray | None:
        """(num_tokens,) int64 counts over the train split's blocks (DESIGN 3.2), None for other splits."""
        counts = self.manifest.get("unigram_counts")
        return None if counts is None else np.asarray(counts, dtype=np.int64)


def store_key(cfg: DataConfig, tokenizer: Tokenizer, split: str, source: Source | None = None) -> str:
    """Hash of everything that determines a store's content (`split` a name of the source's split)."""
    source = source or open_source(cfg)
    parts = [STORE_VERSION, source.fingerprint(), source.name, source.split_id(split), tokenizer.fingerprint(),
             cfg.framing, cfg.max_length, split == cfg.train_split]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _open_blocks(path: Path, manifest: dict[str, Any]) -> np.ndarray:
    return np.memmap(path, dtype=manifest["dtype"], mode="r", shape=(manifest["num_blocks"], manifest["max_length"]))


def _usable(folder: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished store matching `expected`, or None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if any(manifest.get(k) != v for k, v in expected.items()):
        return None
    size = manifest["num_blocks"] * manifest["max_length"] * np.dtype(manifest["dtype"]).itemsize
    bin_path = folder / manifest["file"]
    return manifest if bin_path.is_file() and bin_path.stat().st_size == size else None


def prepare_split(cfg: DataConfig, tokenizer: Tokenizer, split: str, progress: bool = True) -> TokenStore:
    """Tokenize and frame `split` (a source split name, e.g. cfg.val_split) once; reuse it afterwards.

    Raises EmptySplitError when the split has no usable document (absent from the source, or all skipped)."""
    if cfg.framing not in FRAMERS:
        raise DataError(f"data.framing: {cfg.framing!r} is not one of {', '.join(FRAMERS)}")
    source = open_source(cfg)
    split_id = source.split_id(split)
    key = store_key(cfg, tokenizer, split, source)
    folder = Path(cfg.cache_dir).expanduser() / "stores" / key
    is_train = split == cfg.train_split
    file_name = re.sub(r"[^\w.-]", "_", split) + ".bin"  # names of one store's split differ only in this
    expected = {
        "version": STORE_VERSION, "key": key, "source": source.name, "dataset_config": cfg.dataset_config,
        "source_split": split_id, "tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint(),
        "framing": cfg.framing, "max_length": cfg.max_length,
    }
    manifest = _usable(folder, expected)
    if manifest is not None:
        return TokenStore(_open_blocks(folder / manifest["file"], manifest), manifest, reused=True)

    start = time.perf_counter()
    dtype = token_dtype(tokenizer.num_tokens)
    framer = FRAMERS[cfg.framing](cfg.max_length, tokenizer, dtype)
    counts = np.zeros(tokenizer.num_tokens, dtype=np.int64) if is_train else None
    report = InputReport()
    num_document_tokens = 0  # document tokens + one EOS per document, before framing
    num_blocks = 0
    folder.mkdir(parents=True, exist_ok=True)
    # Temporary names carry the pid: concurrent ranks preparing the same store never write the same file, and a
    # leftover from an interrupted run is never mistaken for a store (only manifest.json marks one finished).
    tmp_bin = folder / f"{file_name}.tmp-{os.getpid()}"
    bar = progress_bar(desc=f"tokenizing {split}", unit="tok", unit_scale=True, disable=not progress, leave=False)
    try:
        with open(tmp_bin, "wb") as f, bar:
            for segments in encode_documents(tokenizer, source.documents(split, report), report):
                batch_tokens = sum(len(ids) + end for ids, end in segments)
                num_document_tokens += batch_tokens
                blocks = framer.add(segments)
                f.write(blocks.tobytes())
                num_blocks += len(blocks)
                if counts is not None:
                    counts += np.bincount(blocks.ravel(), minlength=tokenizer.num_tokens)
                bar.update(batch_tokens)
        if report.num_documents == 0:
            problems = report.problems()
            detail = f": {'; '.join(problems)} (first: {report.first_problem})" if problems else ""
            raise EmptySplitError(f"split {split!r} of {source.name!r} has no usable documents{detail}")
        if num_blocks == 0:
            raise DataError(
                f"split {split!r} of {source.name!r} has {num_document_tokens} tokens, too few for one block "
                f"of data.max_length={cfg.max_length}; lower data.max_length or use more text"
            )
        os.replace(tmp_bin, folder / file_name)
    finally:
        tmp_bin.unlink(missing_ok=True)

    if counts is not None and cfg.padded:
        counts[tokenizer.pad_id] = 0  # padding is not a token the model learns
    seconds = time.perf_counter() - start
    manifest = {
        **expected,
        "file": file_name,
        "dataset_name": cfg.dataset_name,
        "split": split,
        "dtype": dtype.name,
        "num_ids": tokenizer.num_tokens,  # the ids a block may hold: the vocabulary plus an appended MASK / PAD
        "num_block_tokens": num_blocks * cfg.max_length,  # tokens stored, framing and padding included
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "mask_id": tokenizer.mask_id,
        "pad_id": tokenizer.pad_id,
        "num_documents": report.num_documents,
        "num_document_tokens": num_document_tokens,
        "num_blocks": num_blocks,
        **framer.stats,
        "input": report.to_dict(),
        "prepared_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(num_document_tokens / seconds) if seconds > 0 else None,
        # Counts over the stored blocks (framing BOS/EOS included, padding not): the tokens the model is
        # trained on; the importance estimator's frequency prior (DESIGN 3.2).
        "unigram_counts": None if counts is None else counts.tolist(),
    }
    tmp_manifest = folder / f"manifest.json.tmp-{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest))
    os.replace(tmp_manifest, folder / "manifest.json")
    return TokenStore(_open_blocks(folder / file_name, manifest), manifest)
