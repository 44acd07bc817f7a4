"""Where documents come from (DESIGN section 4, issue 3): the embedded stdlib-docs corpus, local files and
folders, the raw text8 file, or HF `datasets` by name.

`iter_documents(cfg, split, report)` yields the documents of one split lazily, in a fixed order, so that a corpus
larger than memory streams through tokenization; `load_documents` is the same as a list, for small corpora.
Splits are named by the source's own names; the config's `train_split` / `val_split` / `test_split` say which of
them plays which role. Local files and the embedded corpus know the names "train", "validation" and "test" (plus
the aliases "valid", "val", "dev" for validation); a document without an explicit split is assigned one by a hash
of its id (90 / 5 / 5 per cent), so the split never changes between runs or machines.

Bad input is skipped or repaired, never fatal on its own, and counted in an `InputReport` (stored in the token
store's manifest): empty files, binary files (a NUL byte in the first 8 KiB, as git decides), non-UTF-8 bytes
(replaced by U+FFFD), JSONL lines that are not an object with a string "text", blank documents. A split left
with no document at all raises `EmptySplitError`, which names what was skipped.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import itertools
import json
import pkgutil
import re
import sys
import sysconfig
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdlm_atat.config import DataConfig


class DataError(ValueError):
    """A data source, split or tokenizer that cannot be used; the message names the config key and the fix."""


class EmptySplitError(DataError):
    """A split with no usable document: the source has no such split, or everything in it was skipped."""


# How a split the source lacks is fixed in a config; a verb that takes the split another way says its own fix.
SPLIT_FIX = "set data.train_split / data.val_split / data.test_split to one of them"


def with_split_fix(err: DataError, fix: str) -> DataError:
    """`err` with `fix` (e.g. "pass --split with one of them") instead of the config keys, same class."""
    return type(err)(str(err).replace(SPLIT_FIX, fix))


STDLIB_DOCS = "stdlib-docs"
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}
LOCAL_SUFFIXES = (".jsonl", ".txt", ".parquet")
TEXT8_FILE = "text8"  # the raw 100M-character file of mattmahoney.net/dc/text8.zip, read as text8 (below)
# Documents shorter than this (characters) carry too little text to be worth a split slot (stdlib-docs only).
MIN_DOC_CHARS = 200
_BINARY_SNIFF_BYTES = 8192
# Local corpora up to this size are fingerprinted by their full content; larger ones (OpenWebText-scale dumps)
# by size, mtime and the first and last MiB of every file, so that checking a cached store stays a matter of
# seconds.
_FULL_HASH_BYTES = 1 << 30


def hash_split(doc_id: str) -> str:
    """The fixed 90 / 5 / 5 split of a document, from the sha256 of its id."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _canonical_split(split: str) -> str:
    name = _SPLIT_ALIASES.get(split.lower())
    if name is None:
        raise EmptySplitError(
            f"split {split!r}: this source has the splits {', '.join(SPLITS)}; {SPLIT_FIX}"
        )
    return name


# ----------------------------------------------------------------------------------------------------------
# What reading skipped or repaired.


_REPORT_LABELS = {
    "empty_files": "empty files skipped",
    "binary_files": "binary files skipped",
    "unreadable_files": "unreadable files skipped",
    "invalid_records": "invalid records skipped",
    "empty_documents": "blank documents skipped",
    "repaired_documents": "documents with non-UTF-8 bytes repaired (U+FFFD)",
    "split_documents": "huge documents tokenized in pieces",
}


@dataclass
class InputReport:
    """Counts of one pass over a split's input (stored in its manifest and printed by `atat prepare`)."""

    num_documents: int = 0  # documents yielded
    empty_files: int = 0  # no bytes, or no document in them
    binary_files: int = 0  # skipped: NUL bytes in the first 8 KiB
    unreadable_files: int = 0  # skipped: a parquet file pyarrow cannot open
    invalid_records: int = 0  # skipped: JSONL lines that are not a JSON object with a string "text"
    empty_documents: int = 0  # skipped: blank text
    repaired_documents: int = 0  # kept: non-UTF-8 bytes (or lone surrogates) replaced by U+FFFD
    split_documents: int = 0  # kept: longer than the store's piece size, tokenized in pieces (store.py)
    first_problem: str = ""  # where the first skipped file or record is

    def skip(self, counter: str, where: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        if not self.first_problem:
            self.first_problem = where

    def problems(self) -> list[str]:
        """'2 binary files skipped', ... for every non-zero count."""
        return [f"{getattr(self, key):,} {label}" for key, label in _REPORT_LABELS.items() if getattr(self, key)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs: what is left is unpaired


def _repair(text: str) -> str | None:
    """`text` with lone surrogates (from JSON escapes such as \\udc80) replaced by U+FFFD, or None if it has none."""
    fixed, n = _LONE_SURROGATE.subn("\ufffd", text)
    return fixed if n else None


def _decode(raw: bytes) -> tuple[str, bool]:
    """(text, repaired): UTF-8, with undecodable bytes replaced by U+FFFD."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), True


# ----------------------------------------------------------------------------------------------------------
# Sources: one object per kind, built by `open_source`; every caller dispatches through it.


class Source:
    """Documents of named splits. `name` is shown in manifests and messages."""

    name: str

    def documents(self, split: str, report: InputReport) -> Iterator[str]:
        raise NotImplementedError

    def split_id(self, split: str) -> str:
        """The source's identity of `split` (store key): two names of the same data share one store."""
        return _canonical_split(split)

    def fingerprint(self) -> str:
        """A short hash that changes when the content may have changed, computed without reading it all."""
        raise NotImplementedError


def open_source(cfg: DataConfig) -> Source:
    """The source named by `data.dataset_name` (and `data.dataset_config`). Never touches the network."""
    name = cfg.dataset_name
    if name == STDLIB_DOCS:
        return StdlibDocs()
    path = Path(name).expanduser()
    if path.exists():
        return Text8File(path) if path.is_file() and path.name == TEXT8_FILE else LocalFiles(path)
    if name.endswith(LOCAL_SUFFIXES) or name.startswith(("/", "./", "../", "~")):
        raise DataError(f"data.dataset_name: local path {name!r} does not exist")
    return HFSource(cfg)


def iter_documents(cfg: DataConfig, split: str, report: InputReport | None = None) -> Iterator[str]:
    """The documents of `split` (a split name of the source, e.g. cfg.val_split), lazily, in a fixed order."""
    return open_source(cfg).documents(split, report if report is not None else InputReport())


def load_documents(cfg: DataConfig, split: str) -> list[str]:
    """All documents of `split`, in memory: for small corpora (tests, BPE training on local files)."""
    return list(iter_documents(cfg, split))


def source_fingerprint(cfg: DataConfig) -> str:
    """A short hash that changes when the source's content may have changed, computed without loading it.

    Used in cache keys (trained BPE, token stores) so that editing a local corpus or upgrading Python (which
    changes stdlib-docs) rebuilds what depends on it.
    """
    return open_source(cfg).fingerprint()


# ----------------------------------------------------------------------------------------------------------
# stdlib-docs: the pydoc topics plus the docstrings of the standard library, read with `ast` (no imports, so
# no side effects and no dependence on which optional C extensions are built).

_STDLIB_DOCS_VERSION = 1  # bump when the extraction below changes what the corpus contains
_SKIP_PACKAGES = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "this",
                  "antigravity", "__phello__"}


def _public_docstrings(tree: ast.Module, module: str) -> list[str]:
    """Module, class and function docstrings of one parsed module, each headed by its qualified name."""
    parts: list[str] = []
    doc = ast.get_docstring(tree)  # cleaned like inspect.getdoc
    if doc:
        parts.append(f"{module}\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_"):
                    continue
                qualname = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(f"{qualname}\n\n{doc}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, qualname)

    visit(tree.body, module)
    return parts


def _stdlib_sources() -> list[tuple[str, Path]]:
    """(dotted module name, source file) for the public pure-Python modules of the standard library, sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):  # lists files; never imports
            if info.name.startswith("_") or (not prefix and info.name in _SKIP_PACKAGES):
                continue
            if not prefix and info.name not in sys.stdlib_module_names:
                continue  # site-packages and other non-stdlib entries of the folder
            dotted = prefix + info.name
            if info.ispkg:
                init = path / info.name / "__init__.py"
                if init.is_file():
                    found.append((dotted, init))
                walk(path / info.name, dotted + ".")
            elif (path / f"{info.name}.py").is_file():
                found.append((dotted, path / f"{info.name}.py"))

    walk(stdlib, "")
    return sorted(found)


@functools.lru_cache(maxsize=1)  # ~2 s to build; fixed for the life of the interpreter
def stdlib_documents() -> tuple[tuple[str, str], ...]:
    """(id, text) of every stdlib-docs document, sorted by id: one per pydoc topic, one per module."""
    from pydoc_data.topics import topics

    docs = [(f"topic:{name}", text.strip()) for name, text in topics.items()]
    for module, path in _stdlib_sources():
        try:
            with tokenize.open(path) as f:  # honours the file's encoding cookie
                tree = ast.parse(f.read(), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        docs.append((f"module:{module}", "\n\n".join(_public_docstrings(tree, module))))
    return tuple(sorted((doc_id, text) for doc_id, text in docs if len(text) >= MIN_DOC_CHARS))


class StdlibDocs(Source):
    name = STDLIB_DOCS

    def documents(self, split: str, report: InputReport) -> Iterator[str]:
        wanted = _canonical_split(split)
        for doc_id, text in stdlib_documents():
            if hash_split(doc_id) == wanted:
                report.num_documents += 1
                yield text

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([STDLIB_DOCS, None]).encode())
        h.update(f"{sys.version}|{_STDLIB_DOCS_VERSION}".encode())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Local files: .jsonl ({"text": ..., "split": optional}), .txt (blank-line separated blocks) and .parquet (a
# "text" column, an optional "split" column), or a folder of them (other files in it are ignored). Files are
# read line by line or batch by batch, never whole.


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(_BINARY_SNIFF_BYTES)


class LocalFiles(Source):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        self._fingerprint: str | None = None

    def files(self) -> list[Path]:
        path = self.path
        if path.is_file():
            if path.suffix not in LOCAL_SUFFIXES:
                raise DataError(f"data.dataset_name: {path} is not a .jsonl, .txt or .parquet file")
            return [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"data.dataset_name: the folder {path} holds no .jsonl, .txt or .parquet files")
        return files

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._hash_files()
        return self._fingerprint

    def _hash_files(self) -> str:
        h = hashlib.sha256(json.dumps([self.name, None]).encode())
        files = self.files()
        full = sum(f.stat().st_size for f in files) <= _FULL_HASH_BYTES
        for path in files:
            stat = path.stat()
            h.update(f"{path.relative_to(self.path) if path != self.path else path.name}|{stat.st_size}".encode())
            with open(path, "rb") as f:
                if full:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                else:
                    h.update(f"{stat.st_mtime_ns}".encode())
                    h.update(f.read(1 << 20))
                    f.seek(max(0, stat.st_size - (1 << 20)))
                    h.update(f.read(1 << 20))
        return h.hexdigest()[:16]

    def documents(self, split: str, report: InputReport) -> Iterator[str]:
        wanted = _canonical_split(split)
        for file in self.files():
            if file.stat().st_size == 0:
                report.skip("empty_files", str(file))
                continue
            if file.suffix != ".parquet" and _is_binary(file):
                report.skip("binary_files", str(file))
                continue
            reader = {".jsonl": _jsonl_records, ".txt": _txt_records, ".parquet": _parquet_records}[file.suffix]
            num_records, num_skipped = 0, report.invalid_records + report.unreadable_files
            for doc_split, text, repaired, where in reader(file, report):
                num_records += 1
                if doc_split != wanted:
                    continue
                if not text.strip():
                    report.skip("empty_documents", where)
                    continue
                if repaired:
                    report.skip("repaired_documents", where)
                report.num_documents += 1
                yield text
            if num_records == 0 and report.invalid_records + report.unreadable_files == num_skipped:
                report.skip("empty_files", str(file))  # only blank lines


# Each reader yields (split, text, repaired, "file:line") for every record, whatever its split.
Record = tuple[str, str, bool, str]


def _split_of(value: Any, default_id: str, where: str) -> str:
    if value is None or value == "":
        return hash_split(default_id)
    if not isinstance(value, str) or value.lower() not in _SPLIT_ALIASES:
        raise DataError(f"data.dataset_name: {where}: split {value!r} is not one of {', '.join(SPLITS)}")
    return _SPLIT_ALIASES[value.lower()]


def _jsonl_records(file: Path, report: InputReport) -> Iterator[Record]:
    with open(file, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            line, repaired = _decode(raw)
            if not line.strip():
                continue
            where = f"{file}:{line_no}"
            try:
                record = json.loads(line)
                text = record["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                report.skip("invalid_records", where)
                continue
            if "\\ud" in line or "\\uD" in line:  # JSON can escape lone surrogates, which no tokenizer takes
                fixed = _repair(text)
                if fixed is not None:
                    text, repaired = fixed, True
            yield _split_of(record.get("split"), f"{file.name}:{line_no}", where), text, repaired, where


def _txt_records(file: Path, report: InputReport) -> Iterator[Record]:
    block: list[str] = []
    repaired = False
    index = 0  # of the non-blank block: its id for the hash split
    start_line = 1
    with open(file, "rb") as f:
        for line_no, raw in enumerate(itertools.chain(f, [b""]), 1):  # the final b"" flushes the last block
            line, bad = _decode(raw)
            line = line.rstrip("\r\n")
            if line.strip():
                if not block:
                    start_line = line_no
                block.append(line)
                repaired |= bad
                continue
            if block:
                text = "\n".join(block).strip()
                yield hash_split(f"{file.name}:{index}"), text, repaired, f"{file}:{start_line}"
                index += 1
                block, repaired = [], False


def _parquet_records(file: Path, report: InputReport) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"data.dataset_name: {file} is a parquet file, and reading it needs pyarrow (pip install pyarrow); "
            "or convert it to .jsonl"
        ) from None
    try:
        parquet = pq.ParquetFile(file)
    except Exception:  # pyarrow's ArrowInvalid and friends: not a parquet file after all
        report.skip("unreadable_files", str(file))
        return
    names = parquet.schema_arrow.names
    if "text" not in names:
        raise DataError(f"data.dataset_name: {file} has no 'text' column (columns: {', '.join(names)})")
    columns = ["text", "split"] if "split" in names else ["text"]
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        texts = batch.column("text").to_pylist()
        splits = batch.column("split").to_pylist() if "split" in columns else [None] * len(texts)
        for text, doc_split in zip(texts, splits):
            where = f"{file}:row {row}"
            if isinstance(text, str):
                yield _split_of(doc_split, f"{file.name}:{row}", where), text, False, where
            else:
                report.skip("invalid_records", where)
            row += 1


TEXT8_FRACTIONS = {"train": (0.0, 0.9), "validation": (0.9, 0.95), "test": (0.95, 1.0)}


class Text8File(LocalFiles):
    """The raw text8 file (one line of 100,000,000 characters, a-z and space): train / validation / test are its
    first 90 per cent / next 5 / last 5 (90M / 5M / 5M characters, the split of D3PM and MDLM). One document per
    split, framed like any other; use it with `data.tokenizer: char`."""

    def files(self) -> list[Path]:
        return [self.path]

    def documents(self, split: str, report: InputReport) -> Iterator[str]:
        lo, hi = TEXT8_FRACTIONS[_canonical_split(split)]
        text, repaired = _decode(self.path.read_bytes())
        part = text[round(lo * len(text)) : round(hi * len(text))]
        if not part.strip():
            report.skip("empty_documents", f"{self.path} ({split})")
            return
        if repaired:
            report.skip("repaired_documents", str(self.path))
        report.num_documents += 1
        yield part


# ----------------------------------------------------------------------------------------------------------
# HuggingFace datasets (optional dependency), read lazily: a downloaded dataset is a memory-mapped Arrow table
# iterated in batches, and `data.streaming: true` reads it from the hub without a local copy.
#
# The named datasets reproduce MDLM's preprocessing (its dataloader.py), so that perplexities compare with the
# paper: each row is a document (WikiText's blank rows included, as MDLM keeps them), a detokenizer undoes the
# tokenised spacing of WikiText, PTB, LM1B and LAMBADA, OpenWebText's validation is its last 100,000 documents,
# LM1B and LAMBADA validate on their test split (they have no other held-out split).

_HF_RECIPE_VERSION = 1  # bump when a detokenizer or a split rule below changes what a dataset yields
OPENWEBTEXT_VALIDATION_DOCS = 100_000


def _rewrite(rules: tuple[tuple[str, str], ...]) -> Callable[[str], str]:
    """A detokenizer from (regex, replacement) rules applied in order."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def detokenize(text: str) -> str:
        for pattern, repl in compiled:
            text = pattern.sub(repl, text)
        return text

    return detokenize


# WikiText writes "3 @,@ 000", "state @-@ of", "word ." and "= = Heading = =": join them up again. (MDLM's version
# also has a rule for the literal "/' [0-9]/", which never occurs in WikiText: left out.)
detokenize_wikitext = _rewrite((
    (r"s '", "s'"),
    (r" @([-,.])@ ", r"\1"),
    (r" : ", ": "),
    (r" ; ", "; "),
    (r" \. ", ". "),
    (r" ! ", "! "),
    (r" \? ", "? "),
    (r" , ", ", "),
    (r"\(\s*([^)]*?)\s*\)", r"(\1)"),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (r"{\s*([^}]*?)\s*}", r"{\1}"),
    (r'"\s*([^"]*?)\s*"', r'"\1"'),
    (r"'\s*([^']*?)\s*'", r"'\1'"),
    (r"= = = =", "===="),
    (r"= = =", "==="),
    (r"= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (r" \n", "\n"),
    (r"\n ", "\n"),
    (r" N ", " 1 "),
    (r" 's", "'s"),
))

# PTB: split contractions, "N" for numbers, escaped slashes, <unk>.
_ptb_rules = _rewrite((
    (r" 's", "'s"),
    (r"s ' ", "s' "),
    (r" n't", "n't"),
    (r" \n ", "\n"),
    (r"\\/", "/"),
))
_ptb_after = _rewrite(((r"\$ 1", "$1"), (r"# 1", "#1"), (r"<unk>", "?")))


def detokenize_ptb(text: str) -> str:
    text = _ptb_rules(text)
    for _ in range(10):  # " N N " needs repeated passes: each match consumes the space the next one needs
        text = text.replace(" N ", " 1 ")
    return _ptb_after(text)


detokenize_lm1b = _rewrite((
    (r"http : / / ", "http://"),
    (r"https : / / ", "https://"),
    (r" '(\w+)", r"'\1"),
    (r" (\w+) \. ", r" \1. "),
    (r" (\w+) \.$", r" \1."),
    (r" \? ", "? "),
    (r" \?$", "?"),
    (r" ! ", "! "),
    (r" !$", "!"),
    (r" , ", ", "),
    (r" : ", ": "),
    (r" ; ", "; "),
    (r" / ", "/"),
    (r'" ([^"]+) "', r'"\1"'),
    (r"' ([^']+) '", r"'\1'"),
    (r"\( ([^()]+) \)", r"(\1)"),
    (r"\[ ([^\[\]]+) \]", r"[\1]"),
    (r"\$ ", "$"),
    (r"£ ", "£"),
))


def detokenize_lambada(text: str) -> str:
    return "\n" + text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace(
        "\N{RIGHT DOUBLE QUOTATION MARK}", '"').strip()


@dataclass(frozen=True)
class HFDataset:
    """How one HF dataset becomes documents."""

    path: str  # the hub id
    config: str | None = None
    text_field: str = "text"
    # our split name -> the dataset's split; empty: the names are passed through as given
    splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"}
    )
    # > 0: "train" is all but the last `holdout_last` documents of the dataset's train split, "validation" those
    # last documents (OpenWebText as MDLM: it ships one split).
    holdout_last: int = 0
    detokenizer: Callable[[str], str] | None = None


_TRAIN_ONLY = {"train": "train", "validation": "train"}
HF_DATASETS: dict[str, HFDataset] = {
    "openwebtext": HFDataset("openwebtext", splits=_TRAIN_ONLY, holdout_last=OPENWEBTEXT_VALIDATION_DOCS),
    "wikitext103": HFDataset("wikitext", "wikitext-103-raw-v1", detokenizer=detokenize_wikitext),
    "wikitext2": HFDataset("wikitext", "wikitext-2-raw-v1", detokenizer=detokenize_wikitext),
    "lm1b": HFDataset("lm1b", splits={"train": "train", "validation": "test", "test": "test"},
                      detokenizer=detokenize_lm1b),
    # 90M / 5M / 5M characters, one row per split: the split of MDLM's text8 (use data.tokenizer: char).
    "text8": HFDataset("afmck/text8"),
    "ptb": HFDataset("ptb_text_only", text_field="sentence", detokenizer=detokenize_ptb),
    # OpenAI's LAMBADA test set (5,153 passages), which MDLM downloads from OpenAI; the hub holds the same file.
    "lambada": HFDataset("EleutherAI/lambada_openai", "default", splits={"validation": "test", "test": "test"},
                         detokenizer=detokenize_lambada),
}
# Other spellings of the same datasets: hub ids, and the short names `wikitext-103` / `wikitext-2`.
_HF_ALIASES = {
    "Skylion007/openwebtext": "openwebtext",
    "wikitext-103": "wikitext103",
    "wikitext-2": "wikitext2",
    "ptb_text_only": "ptb",
    "ptb-text-only/ptb_text_only": "ptb",
    "EleutherAI/lambada_openai": "lambada",
    "afmck/text8": "text8",
}


def resolve_hf(name: str, config: str | None) -> tuple[str, HFDataset]:
    """(short name or hub id, how to read it) for `data.dataset_name` / `data.dataset_config`."""
    key = _HF_ALIASES.get(name, name)
    if key in HF_DATASETS:
        spec = HF_DATASETS[key]
        if config is not None and config != spec.config:
            raise DataError(
                f"data.dataset_config: {name!r} is {spec.path} {spec.config or '(no config)'}; leave "
                f"data.dataset_config null (got {config!r})"
            )
        if name != key and "/" in name:
            spec = dataclasses.replace(spec, path=name)  # a mirror's hub id: read that one
        return key, spec
    # The long spelling of a named dataset (dataset_name: wikitext, dataset_config: wikitext-103-raw-v1).
    matches = {k: s for k, s in HF_DATASETS.items() if s.path == name}
    for key, spec in matches.items():
        if spec.config == config:
            return key, spec
    if matches and config is None:
        configs = ", ".join(str(s.config) for s in matches.values())
        raise DataError(
            f"data.dataset_config: {name!r} needs a config ({configs}), or use data.dataset_name: "
            f"{' / '.join(matches)}"
        )
    return name, HFDataset(name, config, splits={})  # any other hub id: its own split names, as given


def holdout_split(ds: Any, split: str, num_holdout: int) -> Any:
    """OpenWebText as MDLM (`train[:-100000]` / `train[-100000:]`): "validation" = the last `num_holdout`
    documents of `ds`, "train" = the rest. `ds` is a `datasets.Dataset` (or anything with len and select), or a
    streaming `IterableDataset` (skip / take, its length from the dataset's info)."""
    try:
        n = len(ds)
    except TypeError:  # streaming
        n = ds.info.splits["train"].num_examples
    if n <= num_holdout:
        raise DataError(f"data.dataset_name: {n} documents, too few to hold out the last {num_holdout:,}")
    start, stop = (0, n - num_holdout) if split == "train" else (n - num_holdout, n)
    if hasattr(ds, "select"):
        return ds.select(range(start, stop))
    return ds.skip(start).take(stop - start)


class HFSource(Source):
    def __init__(self, cfg: DataConfig) -> None:
        self.key, self.spec = resolve_hf(cfg.dataset_name, cfg.dataset_config)
        self.streaming = cfg.streaming
        self.name = self.spec.path + (f"/{self.spec.config}" if self.spec.config else "")

    def _splits(self, split: str) -> tuple[str, str]:
        """(our name, the dataset's split) of `split`."""
        ours = _SPLIT_ALIASES.get(split.lower(), split)
        theirs = self.spec.splits.get(ours) if self.spec.splits else split
        if theirs is None:
            raise EmptySplitError(
                f"split {split!r}: {self.key} has no such split (it has {', '.join(self.spec.splits)}); {SPLIT_FIX}"
            )
        return ours, theirs

    def split_id(self, split: str) -> str:
        ours, theirs = self._splits(split)
        # OpenWebText's two parts of its one split are different data: keep them apart in the store key.
        return f"{theirs}[{ours}]" if self.spec.holdout_last else theirs

    def fingerprint(self) -> str:
        # Name, config and our recipe. (The hub's revision is not pinned: a changed upstream dataset needs a new
        # cache_dir or the store deleted.)
        blob = [self.spec.path, self.spec.config, self.spec.text_field, _HF_RECIPE_VERSION, self.spec.holdout_last]
        return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:16]

    def _load(self, hf_split: str) -> Any:
        name = self.spec.path
        hint = f"use a local .jsonl/.txt/.parquet file or folder (e.g. ../shared/corpora/sotu.jsonl) or '{STDLIB_DOCS}'"
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"data.dataset_name: {name!r} is not a local file or folder, and the HF `datasets` package is not "
                f"installed (pip install 'mdlm-atat[hf]'); or {hint}"
            ) from None
        try:
            return datasets.load_dataset(name, self.spec.config, split=hf_split, streaming=self.streaming)
        except Exception as err:  # hub unreachable, unknown name or split: one clear message, no stack trace
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise DataError(
                f"data.dataset_name: could not load HF dataset {name!r} (config {self.spec.config!r}, split "
                f"{hf_split!r}): {type(err).__name__}: {first_line}; the hub may be unreachable: {hint}"
            ) from None

    def documents(self, split: str, report: InputReport) -> Iterator[str]:
        ours, theirs = self._splits(split)
        ds = self._load(theirs)
        if self.spec.holdout_last:
            ds = holdout_split(ds, ours, self.spec.holdout_last)
        column = self.spec.text_field
        names = getattr(ds, "column_names", None)
        if names is not None and column not in names:
            raise DataError(f"data.dataset_name: HF dataset {self.spec.path!r} has no {column!r} column ({names})")
        detokenize = self.spec.detokenizer
        for text in _column(ds, column):
            if not isinstance(text, str):
                report.skip("invalid_records", f"{self.name} {split}")
                continue
            report.num_documents += 1
            yield detokenize(text) if detokenize else text


def _column(ds: Any, column: str) -> Iterator[Any]:
    """The values of one column, in order: in batches where the dataset offers them (much faster), else by row."""
    if hasattr(ds, "iter"):
        for batch in ds.iter(batch_size=1000):
            yield from batch[column]
    else:
        for row in ds:
            yield row[column]
