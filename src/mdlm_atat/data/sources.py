"""Where documents come from (DESIGN section 4): the embedded stdlib-docs corpus, local files, or HF datasets.

`load_documents(cfg, split)` returns the documents of one split as a list of strings. Splits are named by the
source's own names; the config's `train_split` / `val_split` / `test_split` say which of them plays which role.
Local files and the embedded corpus know the names "train", "validation" and "test" (plus the common aliases
"valid", "val", "dev" for validation); a document without an explicit split is assigned one by a hash of its id
(90 / 5 / 5 per cent), so the split never changes between runs or machines.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import pkgutil
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import Any

from mdlm_atat.config import DataConfig


class DataError(ValueError):
    """A data source, split or tokenizer that cannot be used; the message names the config key and the fix."""


STDLIB_DOCS = "stdlib-docs"
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}
LOCAL_SUFFIXES = (".jsonl", ".txt")
# Documents shorter than this (characters) carry too little text to be worth a split slot.
MIN_DOC_CHARS = 200


def hash_split(doc_id: str) -> str:
    """The fixed 90 / 5 / 5 split of a document, from the sha256 of its id."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _canonical_split(split: str) -> str:
    name = _SPLIT_ALIASES.get(split.lower())
    if name is None:
        raise DataError(
            f"split {split!r}: this source has the splits {', '.join(SPLITS)}; "
            "set data.train_split / data.val_split / data.test_split to one of them"
        )
    return name


def is_local(name: str) -> bool:
    return name != STDLIB_DOCS and Path(name).expanduser().exists()


def load_documents(cfg: DataConfig, split: str) -> list[str]:
    """All documents of `split` (a split name of the source, e.g. cfg.val_split), in a fixed order."""
    name = cfg.dataset_name
    if name == STDLIB_DOCS:
        wanted = _canonical_split(split)
        return [text for doc_id, text in stdlib_documents() if hash_split(doc_id) == wanted]
    if is_local(name):
        wanted = _canonical_split(split)
        return [text for doc_split, text in _local_documents(Path(name).expanduser()) if doc_split == wanted]
    if name.endswith(LOCAL_SUFFIXES) or name.startswith(("/", "./", "../", "~")):
        raise DataError(f"data.dataset_name: local path {name!r} does not exist")
    return _hf_documents(cfg, split)


def source_fingerprint(cfg: DataConfig) -> str:
    """A short hash that changes when the source's content may have changed, computed without loading it.

    Used in cache keys (trained BPE, token stores) so that editing a local corpus or upgrading Python (which
    changes stdlib-docs) rebuilds what depends on it.
    """
    h = hashlib.sha256()
    h.update(json.dumps([cfg.dataset_name, cfg.dataset_config]).encode())
    if cfg.dataset_name == STDLIB_DOCS:
        h.update(f"{sys.version}|{_STDLIB_DOCS_VERSION}".encode())
    elif is_local(cfg.dataset_name):
        for path in _local_files(Path(cfg.dataset_name).expanduser()):
            h.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    # HF datasets: name + config. Their own revision pinning is for the later streaming/HF issue.
    return h.hexdigest()[:16]


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


# ----------------------------------------------------------------------------------------------------------
# Local files: .jsonl ({"text": ..., "split": optional}) and .txt (blank-line separated blocks), or a folder.


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"data.dataset_name: {path} is not a .jsonl or .txt file")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"data.dataset_name: the folder {path} holds no .jsonl or .txt files")
    return files


def _local_documents(path: Path) -> list[tuple[str, str]]:
    """(split, text) of every document under a local file or folder, in file order."""
    docs: list[tuple[str, str]] = []
    for file in _local_files(path):
        if file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record: dict[str, Any] = json.loads(line)
                        text = record["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(
                            f"data.dataset_name: {file}:{line_no} is not a JSON object with a 'text' field"
                        ) from None
                    split = record.get("split")
                    docs.append((_canonical_split(split) if split else hash_split(f"{file.name}:{line_no}"), text))
        else:
            blocks = [b.strip() for b in file.read_text(encoding="utf-8").split("\n\n")]
            blocks = [b for b in blocks if b]
            docs.extend((hash_split(f"{file.name}:{i}"), b) for i, b in enumerate(blocks))
    return docs


# ----------------------------------------------------------------------------------------------------------
# HuggingFace datasets (optional dependency; this minimal path loads the split into memory).


def _hf_documents(cfg: DataConfig, split: str) -> list[str]:
    name = cfg.dataset_name
    hint = f"use a local .jsonl/.txt file or folder (e.g. ../shared/corpora/sotu.jsonl) or '{STDLIB_DOCS}'"
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.dataset_name: {name!r} is not a local file or folder, and the HF `datasets` package is not "
            f"installed (pip install 'mdlm-atat[hf]'); or {hint}"
        ) from None
    try:
        ds = datasets.load_dataset(name, cfg.dataset_config, split=split)
    except Exception as err:  # hub unreachable, unknown name or split: one clear message, no stack trace
        raise DataError(
            f"data.dataset_name: could not load HF dataset {name!r} (config {cfg.dataset_config!r}, split "
            f"{split!r}): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; {hint}"
        ) from None
    if "text" not in ds.column_names:
        raise DataError(f"data.dataset_name: HF dataset {name!r} has no 'text' column ({ds.column_names})")
    return list(ds["text"])
