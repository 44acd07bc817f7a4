"""The data path: sources, tokenizers, packing + token store, and the resumable loader. CPU, offline, fast."""

from __future__ import annotations

import builtins
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mdlm_atat.config import DataConfig
from mdlm_atat.data import tokenizers as tokenizers_mod
from mdlm_atat.data.loader import eval_batches, train_batches
from mdlm_atat.data.sources import DataError, load_documents, stdlib_documents
from mdlm_atat.data.store import pack_documents, prepare_split
from mdlm_atat.data.tokenizers import Tokenizer, build_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout, as the README says
GPT2 = SHARED / "tokenizers" / "gpt2"
BERT = SHARED / "tokenizers" / "bert-base-uncased"
needs_shared = pytest.mark.skipif(not GPT2.is_dir(), reason="../shared/tokenizers not present")

WORDS = "the cat sat on a mat while diffusion models learned to unmask tokens one step at a time".split()


def _tiny_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for _ in range(n)]


@pytest.fixture
def tiny_jsonl(tmp_path: Path) -> Path:
    """120 documents with explicit splits (100 train, 10 validation, 10 test)."""
    path = tmp_path / "tiny.jsonl"
    splits = ["train"] * 100 + ["validation"] * 10 + ["test"] * 10
    with open(path, "w") as f:
        for i, (text, split) in enumerate(zip(_tiny_texts(120), splits)):
            f.write(json.dumps({"id": i, "split": split, "text": text}) + "\n")
    return path


@pytest.fixture
def tiny_cfg(tiny_jsonl: Path, tmp_path: Path) -> DataConfig:
    return DataConfig(dataset_name=str(tiny_jsonl), cache_dir=str(tmp_path / "cache"), tokenizer="bpe",
                      tokenizer_vocab_size=300, max_length=16)


# ----------------------------------------------------------------------------------------------------------
# Sources


def test_jsonl_splits_follow_the_split_field(tiny_cfg: DataConfig) -> None:
    assert len(load_documents(tiny_cfg, "train")) == 100
    assert len(load_documents(tiny_cfg, "validation")) == 10
    assert load_documents(tiny_cfg, "valid") == load_documents(tiny_cfg, "validation")
    with pytest.raises(DataError, match="split 'dev2'"):
        load_documents(tiny_cfg, "dev2")


def test_files_without_split_are_split_by_hash(tmp_path: Path) -> None:
    texts = _tiny_texts(400)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "b.txt").write_text("\n\n".join(texts[:50]) + "\n")
    both = DataConfig(dataset_name=str(tmp_path))
    parts = {s: load_documents(both, s) for s in ("train", "validation", "test")}
    assert sum(map(len, parts.values())) == 450
    assert 0.8 < len(parts["train"]) / 450 < 0.97 and parts["validation"] and parts["test"]
    assert parts == {s: load_documents(both, s) for s in parts}  # fixed
    only_txt = DataConfig(dataset_name=str(tmp_path / "b.txt"))
    assert sum(len(load_documents(only_txt, s)) for s in parts) == 50


def test_hf_name_without_datasets_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_hf(name: str, *args, **kwargs):
        if name.split(".")[0] in ("datasets", "transformers"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hf)
    with pytest.raises(DataError, match="data.dataset_name.*stdlib-docs"):
        load_documents(DataConfig(dataset_name="openwebtext"), "train")
    with pytest.raises(DataError, match="data.tokenizer.*shared/tokenizers/gpt2"):
        build_tokenizer(DataConfig(tokenizer="gpt2"), lambda: [])


def test_hf_name_with_unreachable_hub_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if `datasets` were installed but offline: its error becomes one DataError."""
    import sys
    import types

    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openwebtext' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match="data.dataset_name.*openwebtext.*ConnectionError"):
        load_documents(DataConfig(dataset_name="openwebtext"), "train")


def test_stdlib_docs_is_large_fixed_and_split() -> None:
    stdlib_docs = stdlib_documents()  # ~2 s once; cached for the process
    cfg = DataConfig(dataset_name="stdlib-docs")
    train = load_documents(cfg, "train")
    validation = load_documents(cfg, "validation")
    assert sum(map(len, train)) > 1_000_000
    assert validation and validation == load_documents(cfg, "validation")
    assert not set(validation) & set(train)
    ids = [doc_id for doc_id, _ in stdlib_docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert "topic:assert" in ids and "module:json" in ids
    assert all(len(text) >= 200 for _, text in stdlib_docs)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers


@needs_shared
def test_gpt2_local_folder() -> None:
    tok = build_tokenizer(DataConfig(tokenizer=str(GPT2)), lambda: pytest.fail("no training for a folder"))
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (50257, 50256, 50256, None)
    assert tok.mask_id == 50257 and tok.num_tokens == 50258  # MASK appended: a new id = vocab size
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


@needs_shared
def test_bert_local_folder() -> None:
    tok = build_tokenizer(DataConfig(tokenizer=str(BERT)), lambda: pytest.fail("no training for a folder"))
    ids = tok.encode("Hello, my dog is cute")
    assert [tok.bos_id, *ids, tok.eos_id] == [101, 7592, 1010, 2026, 3899, 2003, 10140, 102]
    assert (tok.mask_id, tok.pad_id, tok.vocab_size, tok.num_tokens) == (103, 0, 30522, 30522)


def test_bpe_is_trained_once_then_cached(tiny_cfg: DataConfig) -> None:
    calls = []

    def texts():
        calls.append(1)
        return load_documents(tiny_cfg, "train")

    tok = build_tokenizer(tiny_cfg, texts)
    assert calls == [1]
    assert (tok.vocab_size, tok.mask_id, tok.num_tokens, tok.bos_id, tok.eos_id) == (300, 300, 301, 0, 0)
    start = time.perf_counter()
    again = build_tokenizer(tiny_cfg, texts)
    assert time.perf_counter() - start < 0.5
    assert calls == [1] and again.fingerprint() == tok.fingerprint()
    other = DataConfig(**{**tiny_cfg.__dict__, "tokenizer_vocab_size": 280})
    assert build_tokenizer(other, texts).vocab_size == 280 and calls == [1, 1]  # a different key retrains


def test_json_round_trip_encodes_identically(tiny_cfg: DataConfig) -> None:
    tok = build_tokenizer(tiny_cfg, lambda: load_documents(tiny_cfg, "train"))
    back = Tokenizer.from_json(tok.to_json())
    texts = load_documents(tiny_cfg, "validation") + ["unseen wörds ✓ <|endoftext|>"]
    assert back.encode_batch(texts) == tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert (back.mask_id, back.bos_id, back.num_tokens, back.fingerprint()) == (
        tok.mask_id, tok.bos_id, tok.num_tokens, tok.fingerprint())
    assert back.decode(back.encode(texts[-1])) == texts[-1]  # byte-level: lossless


def test_hf_hub_tokenizer_offline_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    fake = types.ModuleType("transformers")

    class AutoTokenizer:
        @staticmethod
        def from_pretrained(name: str):
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    fake.AutoTokenizer = AutoTokenizer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", fake)
    with pytest.raises(DataError, match="data.tokenizer.*'gpt2'.*OSError"):
        tokenizers_mod.build_tokenizer(DataConfig(tokenizer="gpt2"), lambda: [])


# ----------------------------------------------------------------------------------------------------------
# Packing and the store


def test_packing_invariants() -> None:
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 1000, size=int(rng.integers(0, 40)))) for _ in range(200)]
    bos, eos, L = 1001, 1002, 16
    blocks = pack_documents(docs, L, bos, eos)
    stream = [t for d in docs for t in [*d, eos]]
    assert blocks.dtype == np.uint16 and blocks.shape == (len(stream) // (L - 2), L)
    assert (blocks[:, 0] == bos).all() and (blocks[:, -1] == eos).all()
    # The interiors are exactly the docs + EOS stream, in order, truncated to whole blocks: nothing lost or doubled.
    assert blocks[:, 1:-1].ravel().tolist() == stream[: blocks.shape[0] * (L - 2)]
    assert len(stream) - blocks.shape[0] * (L - 2) < L - 2
    assert pack_documents(docs, L, bos, eos, num_tokens=70_000).dtype == np.uint32


def test_prepare_split_writes_then_reuses(tiny_cfg: DataConfig) -> None:
    tok = build_tokenizer(tiny_cfg, lambda: load_documents(tiny_cfg, "train"))
    store = prepare_split(tiny_cfg, tok, "train", progress=False)
    m = store.manifest
    docs_ids = tok.encode_batch(load_documents(tiny_cfg, "train"))
    expected = pack_documents(docs_ids, tiny_cfg.max_length, tok.bos_id, tok.eos_id, tok.num_tokens)
    assert isinstance(store.blocks, np.memmap) and not store.blocks.flags.writeable
    assert np.array_equal(store.blocks, expected)
    assert (m["num_documents"], m["num_blocks"], m["max_length"], m["dtype"]) == (100, len(expected), 16, "uint16")
    assert m["num_document_tokens"] == sum(len(d) + 1 for d in docs_ids)
    assert m["tokenizer_fingerprint"] == tok.fingerprint() and m["framing"] == "packed"
    counts = store.unigram_counts
    assert counts is not None and counts.shape == (tok.num_tokens,) and counts.sum() == expected.size
    assert np.array_equal(counts, np.bincount(expected.ravel(), minlength=tok.num_tokens))

    folder = Path(store.blocks.filename).parent
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    again = prepare_split(tiny_cfg, tok, "train", progress=False)
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    assert np.array_equal(again.blocks, expected)

    validation = prepare_split(tiny_cfg, tok, "validation", progress=False)
    assert validation.unigram_counts is None and Path(validation.blocks.filename).parent != folder


def test_interrupted_prepare_is_not_used(tiny_cfg: DataConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = build_tokenizer(tiny_cfg, lambda: load_documents(tiny_cfg, "train"))
    folder = Path(prepare_split(tiny_cfg, tok, "train", progress=False).blocks.filename).parent
    expected = np.array(np.memmap(folder / "train.bin", dtype=np.uint16, mode="r"))
    # Simulate a run killed mid-write: no manifest, a truncated .bin and a leftover temporary file.
    (folder / "manifest.json").unlink()
    (folder / "train.bin").write_bytes(b"\x00" * 10)
    (folder / "train.bin.tmp-999999").write_bytes(b"\xff" * 64)
    store = prepare_split(tiny_cfg, tok, "train", progress=False)
    assert np.array_equal(np.asarray(store.blocks).ravel(), expected)
    # A manifest whose .bin was truncated afterwards is not trusted either.
    (folder / "train.bin").write_bytes(b"\x00" * 10)
    store = prepare_split(tiny_cfg, tok, "train", progress=False)
    assert np.array_equal(np.asarray(store.blocks).ravel(), expected)


def test_too_few_tokens_names_split_and_max_length(tiny_cfg: DataConfig) -> None:
    tok = build_tokenizer(tiny_cfg, lambda: load_documents(tiny_cfg, "train"))
    cfg = DataConfig(**{**tiny_cfg.__dict__, "max_length": 100_000})
    with pytest.raises(DataError, match=r"'validation'.* \d+ tokens.*data.max_length=100000"):
        prepare_split(cfg, tok, "validation", progress=False)
    assert not list(Path(cfg.cache_dir, "stores").rglob("*.bin*"))


# ----------------------------------------------------------------------------------------------------------
# Loader


def _blocks(n: int = 10, L: int = 4) -> np.ndarray:
    return np.arange(n * L, dtype=np.uint16).reshape(n, L)  # row i starts with i * L: rows are recognisable


def test_resume_equals_uninterrupted_across_epochs() -> None:
    blocks, B = _blocks(10), 3  # 10 blocks, batches of 3: batches straddle epoch boundaries
    full = list(itertools.islice(train_batches(blocks, B, seed=7), 12))
    assert all(b.dtype == torch.int64 and b.shape == (3, 4) for b in full)
    first_epoch = torch.cat(full)[:10, 0] // 4
    assert sorted(first_epoch.tolist()) == list(range(10))  # an epoch visits every block once
    for k in (1, 3, 4, 7):
        resumed = list(itertools.islice(train_batches(blocks, B, seed=7, start_sample=k * B), 12 - k))
        assert all(torch.equal(a, b) for a, b in zip(full[k:], resumed))
    other_seed = list(itertools.islice(train_batches(blocks, B, seed=8), 4))
    assert not all(torch.equal(a, b) for a, b in zip(full, other_seed))


def test_ranks_are_disjoint_slices_of_the_global_batch() -> None:
    blocks, B, W = _blocks(24), 2, 3
    global_batches = list(itertools.islice(train_batches(blocks, B * W, seed=1), 8))
    per_rank = [list(itertools.islice(train_batches(blocks, B, seed=1, rank=r, world_size=W), 8)) for r in range(W)]
    for k, g in enumerate(global_batches):
        parts = [per_rank[r][k] for r in range(W)]
        assert torch.equal(torch.cat(parts), g)
        rows = torch.cat(parts)[:, 0].tolist()
        assert len(set(rows)) == len(rows)  # disjoint (24 blocks, 6 per global batch: within one epoch)
    resumed = list(itertools.islice(train_batches(blocks, B, seed=1, start_sample=3 * B * W, rank=2, world_size=W), 5))
    assert all(torch.equal(a, b) for a, b in zip(per_rank[2][3:], resumed))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_leaves_global_rngs_alone(tiny_cfg: DataConfig, num_workers: int) -> None:
    tok = build_tokenizer(tiny_cfg, lambda: load_documents(tiny_cfg, "train"))
    blocks = prepare_split(tiny_cfg, tok, "train", progress=False).blocks
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    got = list(itertools.islice(train_batches(blocks, 4, seed=3, num_workers=num_workers), 5))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    in_process = list(itertools.islice(train_batches(blocks, 4, seed=3), 5))
    assert all(torch.equal(a, b) for a, b in zip(got, in_process))


def test_eval_batches_in_order_with_partial_last() -> None:
    blocks = _blocks(10)
    batches = list(eval_batches(blocks, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), torch.from_numpy(blocks.astype(np.int64)))
    assert [len(b) for b in eval_batches(blocks, 4, max_batches=2)] == [4, 4]

