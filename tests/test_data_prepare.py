"""Issue 3, the token store and `atat prepare`: framings (packed, padded + attention_mask), the manifest, reuse
without re-tokenizing, interrupted and streamed writes, bad input and huge documents, text8 at character level,
the CLI. CPU, offline, tiny data in tmp_path."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import _tiny_texts
from test_data_sources import fake_hub, tiny_cfg, write_bad_corpus  # noqa: F401 (fixtures)

from mdlm_atat import cli
from mdlm_atat.config import ConfigError, DataConfig, load_config
from mdlm_atat.data import store as store_mod
from mdlm_atat.data.loader import attention_mask, eval_batches
from mdlm_atat.data.prepare import prepare_datasets
from mdlm_atat.data.sources import DataError, EmptySplitError, InputReport, load_documents
from mdlm_atat.data.store import encode_documents, pack_documents, prepare_split, split_text, store_key
from mdlm_atat.data.tokenizers import Tokenizer, build_tokenizer, char_tokenizer


def _tokenizer(cfg: DataConfig) -> Tokenizer:
    return build_tokenizer(cfg, lambda: load_documents(cfg, cfg.train_split))


# ----------------------------------------------------------------------------------------------------------
# Framing and the store


def test_padded_framing_rows_and_attention_mask(tiny_cfg: DataConfig) -> None:
    cfg = DataConfig(**{**tiny_cfg.__dict__, "framing": "padded", "max_length": 12})
    tok = _tokenizer(cfg)
    store = prepare_split(cfg, tok, "train", progress=False)
    docs = tok.encode_batch(load_documents(cfg, "train"))
    rows = np.asarray(store.blocks)
    m = store.manifest
    assert rows.shape == (100, 12) and m["num_blocks"] == m["num_documents"] == 100
    assert (rows[:, 0] == tok.bos_id).all()
    for row, ids in zip(rows, docs):
        k = min(len(ids), 10)
        assert row[1 : 1 + k].tolist() == ids[:k] and row[1 + k] == tok.eos_id
        assert (row[2 + k :] == tok.pad_id).all()
    assert m["num_document_tokens"] == sum(len(d) + 1 for d in docs)
    assert m["num_truncated_documents"] == sum(len(d) > 10 for d in docs) > 0
    assert m["num_truncated_tokens"] == sum(max(0, len(d) - 10) for d in docs)
    assert m["num_padding_tokens"] == int((rows == tok.pad_id).sum()) and m["pad_id"] == tok.pad_id
    counts = store.unigram_counts
    assert counts[tok.pad_id] == 0 and counts.sum() == int((rows != tok.pad_id).sum())

    batch = next(eval_batches(store.blocks, 8))
    mask = attention_mask(batch, tok, "padded")
    assert mask.dtype == torch.bool and mask.shape == batch.shape
    assert torch.equal(mask, batch != tok.pad_id) and mask[:, :2].all()
    lengths = mask.sum(1)  # BOS + kept tokens + EOS
    assert lengths.tolist() == [min(len(d), 10) + 2 for d in docs[:8]]
    assert attention_mask(batch, tok, "packed") is None
    with pytest.raises(ValueError, match="framing"):
        attention_mask(batch, tok, "ragged")


def test_padded_framing_needs_a_distinct_pad(tiny_cfg: DataConfig) -> None:
    cfg = DataConfig(**{**tiny_cfg.__dict__, "framing": "padded"})
    tok = _tokenizer(tiny_cfg)  # built for packed: no pad id
    with pytest.raises(DataError, match="data.framing: padded needs a padding id"):
        prepare_split(cfg, tok, "train", progress=False)


def test_manifest_lists_what_issue_3_asks(tiny_cfg: DataConfig) -> None:
    tok = _tokenizer(tiny_cfg)
    store = prepare_split(tiny_cfg, tok, "train", progress=False)
    m = store.manifest
    docs = tok.encode_batch(load_documents(tiny_cfg, "train"))
    assert m["source"] == tiny_cfg.dataset_name and m["split"] == "train"
    assert (m["tokenizer"], m["tokenizer_fingerprint"]) == (tok.name, tok.fingerprint())
    assert (m["framing"], m["max_length"], m["dtype"], m["num_ids"]) == ("packed", 16, "uint16", 301)
    assert "num_tokens" not in m and m["num_block_tokens"] == store.blocks.size  # was the vocabulary's size
    assert m["num_document_tokens"] == sum(len(d) + 1 for d in docs)
    assert m["num_blocks"] == m["num_document_tokens"] // 14 == len(store.blocks)
    assert m["num_dropped_tokens"] == m["num_document_tokens"] % 14
    assert len(m["unigram_counts"]) == tok.num_tokens and sum(m["unigram_counts"]) == store.blocks.size
    assert (m["bos_id"], m["eos_id"], m["mask_id"], m["pad_id"]) == (0, 0, 300, None)
    assert m["input"]["num_documents"] == 100 and m["seconds"] >= 0
    on_disk = json.loads((store.folder / "manifest.json").read_text())
    assert on_disk == m
    validation = prepare_split(tiny_cfg, tok, "validation", progress=False)
    assert validation.manifest["unigram_counts"] is None


def test_reuse_does_not_tokenize_again(tiny_cfg: DataConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = _tokenizer(tiny_cfg)
    first = prepare_split(tiny_cfg, tok, "train", progress=False)
    assert not first.reused

    def no_tokenizing(self, texts):
        raise AssertionError("re-tokenized a store that should have been reused")

    monkeypatch.setattr(Tokenizer, "encode_batch", no_tokenizing)
    start = time.perf_counter()
    again = prepare_split(tiny_cfg, tok, "train", progress=False)
    assert again.reused and time.perf_counter() - start < 1.0
    assert np.array_equal(again.blocks, first.blocks) and again.manifest == first.manifest
    # Any change of framing, L or source content is a new store.
    with pytest.raises(AssertionError, match="re-tokenized"):
        prepare_split(DataConfig(**{**tiny_cfg.__dict__, "max_length": 17}), tok, "train", progress=False)
    with open(tiny_cfg.dataset_name, "a") as f:
        f.write(json.dumps({"split": "train", "text": "one more document"}) + "\n")
    with pytest.raises(AssertionError, match="re-tokenized"):
        prepare_split(tiny_cfg, tok, "train", progress=False)


def test_interrupted_prepare_leaves_nothing_usable(tiny_cfg: DataConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = _tokenizer(tiny_cfg)
    monkeypatch.setattr(store_mod, "_ENCODE_BATCH_TEXTS", 8)  # several batches, so the interrupt lands mid-file
    real_add = store_mod.PackedFramer.add
    calls = []

    def interrupted(self, segments):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_add(self, segments)

    monkeypatch.setattr(store_mod.PackedFramer, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_split(tiny_cfg, tok, "train", progress=False)
    folder = Path(tiny_cfg.cache_dir) / "stores" / store_key(tiny_cfg, tok, "train")
    assert not (folder / "manifest.json").exists() and not list(folder.glob("*.bin*"))
    monkeypatch.setattr(store_mod.PackedFramer, "add", real_add)
    store = prepare_split(tiny_cfg, tok, "train", progress=False)
    assert not store.reused
    expected = pack_documents(tok.encode_batch(load_documents(tiny_cfg, "train")), 16, tok.bos_id, tok.eos_id, 301)
    assert np.array_equal(store.blocks, expected)


def test_streaming_batches_equal_one_pass(tiny_cfg: DataConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing across many small encode batches gives the same blocks as packing everything at once."""
    tok = _tokenizer(tiny_cfg)
    whole = prepare_split(tiny_cfg, tok, "train", progress=False)
    monkeypatch.setattr(store_mod, "_ENCODE_BATCH_TEXTS", 3)
    cfg = DataConfig(**{**tiny_cfg.__dict__, "cache_dir": str(Path(tiny_cfg.cache_dir) / "other")})
    streamed = prepare_split(cfg, tok, "train", progress=False)
    assert np.array_equal(whole.blocks, streamed.blocks) and whole.manifest["unigram_counts"] == streamed.manifest[
        "unigram_counts"]


# ----------------------------------------------------------------------------------------------------------
# Bad input and huge documents


def test_store_reports_bad_input_and_tokenizes_huge_documents_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = write_bad_corpus(tmp_path / "corpus")
    monkeypatch.setattr(store_mod, "MAX_PIECE_CHARS", 1000)
    cfg = DataConfig(dataset_name=str(corpus), cache_dir=str(tmp_path / "cache"), tokenizer="bpe",
                     tokenizer_vocab_size=300, max_length=16)
    tok = _tokenizer(cfg)
    store = prepare_split(cfg, tok, "train", progress=False)
    report = store.manifest["input"]
    assert (report["num_documents"], report["binary_files"], report["split_documents"]) == (33, 1, 1)
    # The huge document, tokenized in pieces cut before a space, gives exactly its tokens as one piece.
    huge = load_documents(cfg, "train")[-1]
    pieces = split_text(huge, 1000)
    assert len(pieces) > 14 and "".join(pieces) == huge and max(map(len, pieces)) <= 1000
    assert all(p.startswith(" word") for p in pieces[1:])
    docs = load_documents(cfg, "train")
    assert store.manifest["num_document_tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)


def test_huge_document_pieces_span_batches(monkeypatch: pytest.MonkeyPatch, tiny_cfg: DataConfig) -> None:
    tok = _tokenizer(tiny_cfg)
    monkeypatch.setattr(store_mod, "MAX_PIECE_CHARS", 50)
    monkeypatch.setattr(store_mod, "_ENCODE_BATCH_TEXTS", 4)
    docs = ["short one", " ".join(_tiny_texts(20, seed=3)), "last"]
    report = InputReport()
    segments = [seg for batch in encode_documents(tok, docs, report) for seg in batch]
    joined, current = [], []
    for ids, end in segments:
        current += ids
        if end:
            joined.append(current)
            current = []
    assert joined == [tok.encode(d) for d in docs] and report.split_documents == 1
    assert sum(end for _, end in segments) == 3 and len(segments) > 6


def test_nothing_usable_is_a_clear_error(tmp_path: Path) -> None:
    corpus = tmp_path / "bad"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"\x00\x01binary")
    (corpus / "b.jsonl").write_text("{broken\n")
    (corpus / "c.txt").write_text("")
    cfg = DataConfig(dataset_name=str(corpus), cache_dir=str(tmp_path / "cache"), tokenizer="char", max_length=8)
    with pytest.raises(EmptySplitError) as err:
        prepare_split(cfg, char_tokenizer(), "train", progress=False)
    message = str(err.value)
    assert "no usable documents" in message and "1 binary files skipped" in message
    assert "1 invalid records skipped" in message and "1 empty files skipped" in message and "\n" not in message
    assert not list((tmp_path / "cache").rglob("*.bin*"))


def test_text8_at_character_level(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), size=2000))
    (tmp_path / "text8").write_text(text)
    cfg = DataConfig(dataset_name=str(tmp_path / "text8"), tokenizer="char", cache_dir=str(tmp_path / "c"),
                     max_length=32)
    tok = build_tokenizer(cfg, list)
    store = prepare_split(cfg, tok, "train", progress=False)
    assert store.manifest["num_document_tokens"] == 1801  # one id per character, plus EOS
    assert tok.decode(np.asarray(store.blocks)[:, 1:-1].ravel()) == text[: 30 * len(store.blocks)]


# ----------------------------------------------------------------------------------------------------------
# Config and the `atat prepare` verb


def test_framing_is_validated() -> None:
    assert load_config(None, ["data.framing=padded"]).data.framing == "padded"
    with pytest.raises(ConfigError, match="data.framing: 'ragged' is not one of packed, padded"):
        load_config(None, ["data.framing=ragged"])


def test_atat_prepare_writes_then_reuses(tiny_cfg: DataConfig, tmp_path: Path, capsys) -> None:
    out = tmp_path / "stores_here"
    argv = ["prepare", "--datasets", tiny_cfg.dataset_name, "--output-dir", str(out), "--no-progress",
            "data.tokenizer=bpe", "data.tokenizer_vocab_size=300", "data.max_length=16"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert first.count("written in") == 3 and "num_document_tokens" in first and str(out) in first
    start = time.perf_counter()
    assert cli.main(["download", *argv[1:]]) == 0  # the alias
    second = capsys.readouterr().out
    assert second.count("reused") == 3 and "written" not in second and time.perf_counter() - start < 5
    manifests = sorted(out.glob("stores/*/manifest.json"))
    assert len(manifests) == 3
    # What `atat train` would open with the same data section is exactly this store: no tokenizing twice.
    cfg = DataConfig(**{**tiny_cfg.__dict__, "cache_dir": str(out)})
    assert prepare_split(cfg, _tokenizer(cfg), "train", progress=False).reused


def test_atat_prepare_skips_missing_splits_and_fails_on_none(fake_hub: list, tmp_path: Path, capsys) -> None:
    prepared = prepare_datasets(DataConfig(cache_dir=str(tmp_path), tokenizer="char", max_length=8),
                                ["lambada"], progress=False)
    out = capsys.readouterr().out
    assert re.search(r"train +skipped: split 'train': lambada has no such split", out)
    assert set(prepared["lambada"]) == {"validation", "test"}
    assert prepared["lambada"]["test"].reused  # validation is LAMBADA's test split: one store for both
    assert cli.main(["prepare", "--datasets", "lambada", "--splits", "train", "--output-dir", str(tmp_path),
                     "data.tokenizer=char"]) == 2
    assert "atat prepare: error: data.dataset_name: 'lambada': no split could be prepared" in capsys.readouterr().err


def test_prepare_help_lists_its_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    out = capsys.readouterr().out
    for flag in ("--datasets", "--output-dir", "--config", "--splits", "key=value"):
        assert flag in out
