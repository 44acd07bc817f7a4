"""Issue 3, where documents come from: HF datasets on fake `datasets` objects (OpenWebText's split rule, names,
aliases, detokenizers), bad local input, parquet, the raw text8 file, and the char tokenizer and PAD rule.
CPU, offline, tiny data in tmp_path."""

from __future__ import annotations

import builtins
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from test_data import GPT2, _tiny_texts, needs_shared

from mdlm_atat.config import DataConfig
from mdlm_atat.data.sources import (
    HF_DATASETS,
    OPENWEBTEXT_VALIDATION_DOCS,
    DataError,
    EmptySplitError,
    InputReport,
    detokenize_wikitext,
    holdout_split,
    iter_documents,
    load_documents,
    open_source,
)
from mdlm_atat.data.tokenizers import Tokenizer, build_tokenizer


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DataConfig:
    """100 train, 10 validation, 10 test documents; a BPE of 300 ids; L = 16."""
    path = tmp_path / "tiny.jsonl"
    splits = ["train"] * 100 + ["validation"] * 10 + ["test"] * 10
    path.write_text("".join(json.dumps({"split": s, "text": t}) + "\n" for t, s in zip(_tiny_texts(120), splits)))
    return DataConfig(dataset_name=str(path), cache_dir=str(tmp_path / "cache"), tokenizer="bpe",
                      tokenizer_vocab_size=300, max_length=16)


def _tokenizer(cfg: DataConfig) -> Tokenizer:
    return build_tokenizer(cfg, lambda: load_documents(cfg, cfg.train_split))


# ----------------------------------------------------------------------------------------------------------
# HF datasets, faked: `datasets.load_dataset` returns in-memory objects with the interface we use.


class FakeDataset:
    """A `datasets.Dataset` stand-in: len, select, column_names, row iteration."""

    def __init__(self, texts: list[str], column: str = "text") -> None:
        self.texts, self.column = texts, column
        self.column_names = [column]

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: range) -> FakeDataset:
        return FakeDataset([self.texts[i] for i in indices], self.column)

    def __iter__(self):
        return iter({self.column: t} for t in self.texts)


class FakeStream:
    """A streaming `IterableDataset` stand-in: no len, skip / take, the split size in its info."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.info = types.SimpleNamespace(splits={"train": types.SimpleNamespace(num_examples=len(texts))})

    def skip(self, n: int) -> FakeStream:
        return FakeStream(self.texts[n:])

    def take(self, n: int) -> FakeStream:
        return FakeStream(self.texts[:n])

    def iter(self, batch_size: int):
        for i in range(0, len(self.texts), batch_size):
            yield {"text": self.texts[i : i + batch_size]}


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Installs a fake `datasets` module; returns the list of load_dataset calls. Datasets it knows:
    openwebtext (100,005 docs "doc i"), wikitext-2, lm1b (train / test), ptb_text_only, lambada (test only)."""
    calls: list[tuple] = []
    owt = [f"doc {i}" for i in range(OPENWEBTEXT_VALIDATION_DOCS + 5)]
    tables = {
        ("openwebtext", None, "train"): owt,
        ("wikitext", "wikitext-2-raw-v1", "train"): [" = = Valkyria = = \n", "", " 3 @,@ 000 state @-@ of art . \n"],
        ("lm1b", None, "train"): ["a sentence .", "another one ."],
        ("lm1b", None, "test"): ["held out ."],
        ("EleutherAI/lambada_openai", "default", "test"): ["“quoted” passage "],
    }

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        if (path, name, split) not in tables:
            raise ValueError(f"Unknown split {split!r} for {path}")
        texts = tables[(path, name, split)]
        return FakeStream(texts) if streaming else FakeDataset(texts)

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return calls


def test_openwebtext_validation_is_its_last_100k_documents(fake_hub: list) -> None:
    cfg = DataConfig(dataset_name="openwebtext")
    train = list(iter_documents(cfg, "train"))
    validation = list(iter_documents(cfg, "validation"))
    assert train == [f"doc {i}" for i in range(5)]
    assert len(validation) == 100_000 and validation[0] == "doc 5" and validation[-1] == "doc 100004"
    assert fake_hub == [("openwebtext", None, "train", False)] * 2  # both read the one train split
    # Streaming: the same rule through skip / take and the split size from the dataset's info.
    stream_cfg = DataConfig(dataset_name="openwebtext", streaming=True)
    assert list(iter_documents(stream_cfg, "train")) == train
    assert list(iter_documents(stream_cfg, "validation")) == validation
    with pytest.raises(EmptySplitError, match="openwebtext has no such split"):
        list(iter_documents(cfg, "test"))
    # The two halves of the one split are different stores.
    source = open_source(cfg)
    assert source.split_id("train") != source.split_id("validation")


def test_holdout_split_on_a_small_fake() -> None:
    ds = FakeDataset([str(i) for i in range(10)])
    assert [r["text"] for r in holdout_split(ds, "train", 3)] == [str(i) for i in range(7)]
    assert [r["text"] for r in holdout_split(ds, "validation", 3)] == ["7", "8", "9"]
    with pytest.raises(DataError, match="too few"):
        holdout_split(ds, "train", 10)


def test_dataset_names_aliases_and_detokenizers(fake_hub: list) -> None:
    short = open_source(DataConfig(dataset_name="wikitext2"))
    long = open_source(DataConfig(dataset_name="wikitext", dataset_config="wikitext-2-raw-v1"))
    assert short.name == long.name == "wikitext/wikitext-2-raw-v1"
    assert short.fingerprint() == long.fingerprint()
    assert open_source(DataConfig(dataset_name="wikitext103")).name == "wikitext/wikitext-103-raw-v1"
    with pytest.raises(DataError, match="data.dataset_config.*wikitext-103-raw-v1, wikitext-2-raw-v1"):
        open_source(DataConfig(dataset_name="wikitext"))
    with pytest.raises(DataError, match="data.dataset_config"):
        open_source(DataConfig(dataset_name="wikitext2", dataset_config="wikitext-103-raw-v1"))
    # Rows are documents, blank ones included (as MDLM), detokenized.
    docs = load_documents(DataConfig(dataset_name="wikitext2"), "train")
    assert docs == [" == Valkyria ==\n", "", " 3,000 state-of art.\n"]
    assert detokenize_wikitext("( a , b )") == "(a, b)"
    # LM1B validates on its test split; LAMBADA has only a test split, detokenized as MDLM.
    lm1b = DataConfig(dataset_name="lm1b")
    assert load_documents(lm1b, "validation") == ["held out."] == load_documents(lm1b, "test")
    assert open_source(lm1b).split_id("validation") == "test"
    assert load_documents(DataConfig(dataset_name="lambada"), "test") == ['\n"quoted" passage']
    with pytest.raises(EmptySplitError, match="lambada has no such split"):
        load_documents(DataConfig(dataset_name="lambada"), "train")
    assert HF_DATASETS["ptb"].text_field == "sentence"


def test_hub_unreachable_is_one_line_suggesting_local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openwebtext' on the Hub (LocalEntryNotFoundError)\nmore lines")

    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError) as err:
        load_documents(DataConfig(dataset_name="openwebtext"), "train")
    message = str(err.value)
    assert "\n" not in message and "data.dataset_name" in message and "ConnectionError" in message
    assert "unreachable" in message and "local .jsonl" in message


# ----------------------------------------------------------------------------------------------------------
# Tokenizers: char level, and the PAD rule


def test_char_tokenizer_round_trip_and_special_ids() -> None:
    tok = build_tokenizer(DataConfig(tokenizer="char"), lambda: pytest.fail("nothing to train"))
    text = " anarchism originated as a term of abuse"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert ids[:3] == [34, 8, 21]  # space, a, n: MDLM's text8 ids
    assert (tok.vocab_size, tok.num_tokens, tok.bos_id, tok.eos_id, tok.mask_id, tok.pad_id) == (35, 35, 2, 3, 4, 5)
    assert tok.encode("Hi!") == [15, 16, 7]  # lower-cased, then [UNK] for anything outside a-z and space
    back = Tokenizer.from_json(tok.to_json())
    assert back.encode_batch([text, "xyz"]) == [ids, [31, 32, 33]] and back.fingerprint() == tok.fingerprint()
    assert build_tokenizer(DataConfig(tokenizer="char", framing="padded"), list).pad_id == 5  # its own


def test_padding_id_is_appended_after_mask(tiny_cfg: DataConfig) -> None:
    packed = _tokenizer(tiny_cfg)
    padded = _tokenizer(DataConfig(**{**tiny_cfg.__dict__, "framing": "padded"}))
    assert packed.pad_id is None and packed.num_tokens == 301
    assert (padded.mask_id, padded.pad_id, padded.num_tokens) == (300, 301, 302)
    assert padded.decode([padded.bos_id, padded.mask_id, padded.pad_id]) == "<|endoftext|>[MASK][PAD]"
    assert padded.decode([padded.pad_id], skip_special_tokens=True) == ""
    again = Tokenizer.from_json(padded.to_json())
    assert (again.pad_id, again.num_tokens) == (301, 302) and again.with_padding() is again


@needs_shared
def test_gpt2_padded_gets_pad_after_mask_and_keeps_packed_size() -> None:
    packed = build_tokenizer(DataConfig(tokenizer=str(GPT2)), list)
    padded = build_tokenizer(DataConfig(tokenizer=str(GPT2), framing="padded"), list)
    assert (packed.mask_id, packed.pad_id, packed.num_tokens) == (50257, None, 50258)
    assert (padded.mask_id, padded.pad_id, padded.num_tokens) == (50257, 50258, 50259)


# ----------------------------------------------------------------------------------------------------------
# Bad input


def write_bad_corpus(folder: Path) -> Path:
    """30 good documents, then one of each kind of bad input; returns the folder."""
    folder.mkdir()
    texts = _tiny_texts(30, seed=1)
    (folder / "a_good.jsonl").write_text("".join(json.dumps({"split": "train", "text": t}) + "\n" for t in texts))
    (folder / "b_empty.txt").write_bytes(b"")
    (folder / "c_blank.txt").write_text("\n\n   \n")
    (folder / "d_binary.txt").write_bytes(b"\x7fELF\x00\x01\x02" + bytes(range(256)) * 4)
    latin1 = "caf\u00e9 na\u00efve ".encode("latin-1") * 3  # not UTF-8
    (folder / "e_mixed.jsonl").write_bytes(
        b'{"split": "train", "text": "' + latin1 + b'"}\n'
        + b"not json at all\n"
        + b'{"split": "train", "no_text": 1}\n'
        + b'{"split": "train", "text": "   "}\n'
        + b'{"split": "train", "text": "lone \\udc80 surrogate"}\n'
    )
    huge = " ".join(["word"] * 3000)  # 14,999 characters
    (folder / "f_huge.jsonl").write_text(json.dumps({"split": "train", "text": huge}) + "\n")
    return folder


def test_bad_inputs_are_skipped_or_repaired_and_counted(tmp_path: Path) -> None:
    corpus = write_bad_corpus(tmp_path / "corpus")
    report = InputReport()
    docs = list(iter_documents(DataConfig(dataset_name=str(corpus)), "train", report))
    assert len(docs) == 30 + 3
    assert docs[30] == "caf\ufffd na\ufffdve " * 3 and docs[31] == "lone \ufffd surrogate"
    assert report.to_dict() == {
        "num_documents": 33, "empty_files": 2, "binary_files": 1, "unreadable_files": 0, "invalid_records": 2,
        "empty_documents": 1, "repaired_documents": 2, "split_documents": 0,
        "first_problem": str(corpus / "b_empty.txt"),
    }
    assert report.problems()[:2] == ["2 empty files skipped", "1 binary files skipped"]
    for doc in docs:
        doc.encode("utf-8")  # every document is valid text for any tokenizer


def test_unknown_split_value_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"split": "train", "text": "fine"}) + "\n" + json.dumps({"split": "dev2", "text": "?"}))
    with pytest.raises(DataError, match=r"x.jsonl:2: split 'dev2'"):
        load_documents(DataConfig(dataset_name=str(path)), "train")


def test_parquet_without_pyarrow_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1 not really")
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args, **kwargs):
        if name.split(".")[0] == "pyarrow":
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match="data.dataset_name: .*parquet.*pip install pyarrow"):
        load_documents(DataConfig(dataset_name=str(path)), "train")


def test_parquet_files_are_read(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = _tiny_texts(40, seed=2)
    splits = ["train"] * 30 + ["test"] * 10
    pq.write_table(pa.table({"text": texts, "split": splits}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": texts[:5]}), tmp_path / "b.parquet")  # no split column: hashed
    one = DataConfig(dataset_name=str(tmp_path / "a.parquet"))
    assert load_documents(one, "train") == texts[:30] and load_documents(one, "test") == texts[30:]
    folder = DataConfig(dataset_name=str(tmp_path))
    assert sum(len(load_documents(folder, s)) for s in ("train", "validation", "test")) == 45


# ----------------------------------------------------------------------------------------------------------
# text8


def test_raw_text8_file_splits_90_5_5_at_character_level(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), size=2000))
    (tmp_path / "text8").write_text(text)
    cfg = DataConfig(dataset_name=str(tmp_path / "text8"))
    parts = {s: load_documents(cfg, s) for s in ("train", "validation", "test")}
    assert parts == {"train": [text[:1800]], "validation": [text[1800:1900]], "test": [text[1900:]]}
