"""Tokenizers (DESIGN sections 3 and 4): a thin wrapper over a HF `tokenizers.Tokenizer` plus our special ids.

MASK rule (DESIGN 3): the tokenizer's own mask token if it has one (BERT's [MASK] = 103), otherwise a new id
equal to the vocabulary size (GPT-2: 50257); MASK is never the padding id. BOS/EOS frame every packed block
(DESIGN 4): GPT-2 uses <|endoftext|> for both, as MDLM does; BERT uses [CLS] / [SEP].

PAD rule (issue 3): only the padded framing needs a padding id. A tokenizer with its own pad token keeps it; one
without (GPT-2, our BPE) gets a new id appended after everything else, i.e. pad_id = num_tokens before the
append (= mask_id + 1 when MASK was appended too), and num_tokens grows by one. So PAD is never MASK, never BOS /
EOS, and the packed framing (MDLM's) keeps GPT-2's 50,258 rows. See `Tokenizer.with_padding`.

`encode` never adds special tokens (no post-processor runs): packing adds BOS/EOS itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import tokenizers as hf
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from mdlm_atat.config import DataConfig
from mdlm_atat.data.sources import DataError, source_fingerprint

ENDOFTEXT = "<|endoftext|>"
_BOS_NAMES = (ENDOFTEXT, "<s>", "[CLS]", "<bos>", "<|begin_of_text|>")
_EOS_NAMES = (ENDOFTEXT, "</s>", "[SEP]", "<eos>", "<|end_of_text|>")
_MASK_NAMES = ("[MASK]", "<mask>", "<|mask|>")
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>", "<|padding|>")
_BPE_RECIPE_VERSION = 1  # bump when _train_bpe changes what it produces, so cached tokenizers are rebuilt


class Tokenizer:
    """Text <-> ids, with the special ids training needs. `num_tokens` is the embedding's row count."""

    def __init__(
        self,
        backend: hf.Tokenizer,
        name: str,
        bos_id: int,
        eos_id: int,
        mask_id: int | None = None,
        pad_id: int | None = None,
    ) -> None:
        self._tk = backend
        self.name = name
        # The backend's ids (added tokens included); a MASK we append ourselves is not counted.
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.mask_id: int = self.vocab_size if mask_id is None else mask_id
        self.pad_id = pad_id
        if self.mask_id == self.pad_id:
            raise DataError(f"data.tokenizer: {name}: MASK and padding share id {self.mask_id} (DESIGN 3 forbids)")
        # Embedding rows: the backend's ids plus any MASK / PAD id we appended after them.
        self.num_tokens: int = max(self.vocab_size, self.mask_id + 1, -1 if pad_id is None else pad_id + 1)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, num_tokens={self.num_tokens}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, mask_id={self.mask_id}, pad_id={self.pad_id})"
        )

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """HF's batch encoder, in parallel over its own (Rust) thread pool; the `_fast` variant skips the character
        offsets we never use (docs/benchmarks.md, "Tokenization (CPU)": faster than `encode_batch` and than a
        process pool on 2 cores)."""
        return [e.ids for e in self._tk.encode_batch_fast(list(texts), add_special_tokens=False)]

    def with_padding(self) -> Tokenizer:
        """This tokenizer with a padding id distinct from MASK, BOS and EOS (the PAD rule in the module doc)."""
        if self.pad_id is not None and self.pad_id not in (self.bos_id, self.eos_id, self.mask_id):
            return self
        return Tokenizer(self._tk, self.name, self.bos_id, self.eos_id, mask_id=self.mask_id, pad_id=self.num_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # Ids we appended (MASK, PAD) are outside the backend's vocabulary, which would drop them silently: show them.
        ids = [int(i) for i in ids]
        appended = {i: name for i, name in ((self.mask_id, "[MASK]"), (self.pad_id, "[PAD]"))
                    if i is not None and i >= self.vocab_size}
        if not appended.keys() & set(ids):
            return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        text, run = [], []
        for i in ids:
            if i in appended:
                text.append(self._tk.decode(run, skip_special_tokens=skip_special_tokens))
                text.append("" if skip_special_tokens else appended[i])
                run = []
            else:
                run.append(i)
        text.append(self._tk.decode(run, skip_special_tokens=skip_special_tokens))
        return "".join(text)

    def to_json(self) -> str:
        """The serialised backend plus our special ids: a checkpoint carries this, so eval needs no cache."""
        return json.dumps(
            {
                "name": self.name,
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                "mask_id": self.mask_id,
                "pad_id": self.pad_id,
                "backend": self._tk.to_str(),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        d = json.loads(text)
        backend = hf.Tokenizer.from_str(d["backend"])
        return cls(backend, d["name"], d["bos_id"], d["eos_id"], mask_id=d["mask_id"], pad_id=d["pad_id"])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _find(backend: hf.Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        idx = backend.token_to_id(name)
        if idx is not None:
            return idx
    return None


def _wrap(backend: hf.Tokenizer, name: str, specials: dict[str, int | None] | None = None) -> Tokenizer:
    """Pick BOS/EOS/MASK/PAD: from `specials` where given, else by the usual token names."""
    specials = specials or {}
    found = {
        "bos": specials.get("bos"), "eos": specials.get("eos"),
        "mask": specials.get("mask"), "pad": specials.get("pad"),
    }
    for key, names in (("bos", _BOS_NAMES), ("eos", _EOS_NAMES), ("mask", _MASK_NAMES), ("pad", _PAD_NAMES)):
        if found[key] is None:
            found[key] = _find(backend, names)
    if found["bos"] is None or found["eos"] is None:
        raise DataError(
            f"data.tokenizer: {name} has no BOS/EOS token (looked for {', '.join(_EOS_NAMES)}); "
            "packing frames every block with them"
        )
    return Tokenizer(backend, name, found["bos"], found["eos"], mask_id=found["mask"], pad_id=found["pad"])


# ----------------------------------------------------------------------------------------------------------
# Local folders: tokenizer.json, GPT-2 style vocab.json + merges.txt, or BERT style vocab.txt.


def _special_names_from_config(folder: Path) -> dict[str, str]:
    """bos/eos/mask/pad token strings from a HF tokenizer_config.json or special_tokens_map.json, if present."""
    names: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / file
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for key in ("bos", "eos", "mask", "pad"):
            value = data.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names.setdefault(key, value)
    return names


def load_local_tokenizer(folder: Path) -> Tokenizer:
    name = folder.name
    if (folder / "tokenizer.json").is_file():
        backend = hf.Tokenizer.from_file(str(folder / "tokenizer.json"))
        specials = {k: backend.token_to_id(v) for k, v in _special_names_from_config(folder).items()}
        return _wrap(backend, name, specials)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # GPT-2's byte-level BPE, exactly as GPT2TokenizerFast builds it (no prefix space).
        backend = hf.Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([ENDOFTEXT])  # already id 50256; registering it keeps it from being split
        return _wrap(backend, name)
    if (folder / "vocab.txt").is_file():
        # BERT's uncased WordPiece, as BertTokenizerFast builds it, minus the [CLS] ... [SEP] post-processor.
        backend = hf.Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        backend.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
                                    if backend.token_to_id(t) is not None])
        return _wrap(backend, name, {"bos": backend.token_to_id("[CLS]"), "eos": backend.token_to_id("[SEP]")})
    raise DataError(
        f"data.tokenizer: the folder {folder} has no tokenizer.json, vocab.json + merges.txt, or vocab.txt"
    )


# ----------------------------------------------------------------------------------------------------------
# Character level, for text8 (`data.tokenizer: char`).

# MDLM's text8 vocabulary, id for id: 8 specials, then a-z and space (35 ids). Its own [MASK] (4) is MASK and its
# [PAD] (5) is padding (DESIGN 3: the tokenizer's mask token when it has one); BOS / EOS are [BOS] / [EOS].
CHAR_SPECIALS = ("[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
CHAR_ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def char_tokenizer() -> Tokenizer:
    """One id per character of text8's alphabet; text is lower-cased (as MDLM's), anything else is [UNK]."""
    vocab = {token: i for i, token in enumerate([*CHAR_SPECIALS, *CHAR_ALPHABET])}
    # A BPE without merges maps each character of a pre-token to its id; splitting at spaces keeps the pre-tokens
    # short enough for the backend's word cache (6.4M characters/s vs 3.7M for one pre-token per character).
    backend = hf.Tokenizer(models.BPE(vocab, [], unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(" "), behavior="isolated")
    backend.decoder = decoders.Fuse()  # concatenate: no spaces between characters
    backend.add_special_tokens(list(CHAR_SPECIALS))
    ids = {name: vocab[f"[{name.upper()}]"] for name in ("bos", "eos", "mask", "pad")}
    return _wrap(backend, "char", ids)


# ----------------------------------------------------------------------------------------------------------
# HF hub names (optional dependency).


def _load_hub_tokenizer(name: str) -> Tokenizer:
    hint = "or use a local folder such as ../shared/tokenizers/gpt2, or data.tokenizer: bpe"
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(
            f"data.tokenizer: {name!r} is not a local folder and `transformers` is not installed "
            f"(pip install 'mdlm-atat[hf]'); {hint}"
        ) from None
    try:
        hf_tok = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # hub unreachable or unknown name: one clear message, no stack trace
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise DataError(
            f"data.tokenizer: could not load {name!r} from the HF hub ({type(err).__name__}: {first_line}); {hint}"
        ) from None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"data.tokenizer: {name!r} has no fast (Rust) tokenizer; {hint}")
    specials = {
        "bos": hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.cls_token_id,
        "eos": hf_tok.eos_token_id if hf_tok.eos_token_id is not None else hf_tok.sep_token_id,
        "mask": hf_tok.mask_token_id,
        "pad": hf_tok.pad_token_id,
    }
    return _wrap(backend, name, specials)


# ----------------------------------------------------------------------------------------------------------
# A byte-level BPE trained on the training split, cached.


def _train_bpe(texts: Iterable[str], vocab_size: int) -> hf.Tokenizer:
    backend = hf.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],  # id 0; BOS = EOS as GPT-2 / MDLM
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def bpe_cache_path(cfg: DataConfig) -> Path:
    """Where the BPE for this source and vocabulary size is cached; the key changes when the source does."""
    key = hashlib.sha256(
        json.dumps(
            [_BPE_RECIPE_VERSION, hf.__version__, cfg.dataset_name, cfg.dataset_config, cfg.train_split,
             cfg.tokenizer_vocab_size, source_fingerprint(cfg)]
        ).encode()
    ).hexdigest()[:16]
    return Path(cfg.cache_dir).expanduser() / "tokenizers" / f"bpe-{cfg.tokenizer_vocab_size}-{key}.json"


def build_tokenizer(cfg: DataConfig, train_texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """The tokenizer named by `data.tokenizer`, with a padding id when `data.framing` is padded (PAD rule above).

    `train_texts()` is called only to train a BPE not yet cached."""
    tok = _build_tokenizer(cfg, train_texts)
    return tok.with_padding() if cfg.padded else tok


def _build_tokenizer(cfg: DataConfig, train_texts: Callable[[], Iterable[str]]) -> Tokenizer:
    if cfg.tokenizer == "char":
        return char_tokenizer()
    if cfg.tokenizer == "bpe":
        path = bpe_cache_path(cfg)
        if path.is_file():
            return Tokenizer.from_json(path.read_text())
        # The training texts' identity is in the key through source_fingerprint, so they need not be read
        # (or hashed) on a cache hit.
        tok = _wrap(_train_bpe(train_texts(), cfg.tokenizer_vocab_size),
                    f"bpe{cfg.tokenizer_vocab_size}-{Path(cfg.dataset_name).name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(tok.to_json())
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none
        return tok
    folder = Path(cfg.tokenizer).expanduser()
    if folder.is_dir():
        return load_local_tokenizer(folder)
    if cfg.tokenizer.startswith(("/", "./", "../", "~")):
        raise DataError(f"data.tokenizer: the folder {cfg.tokenizer!r} does not exist")
    return _load_hub_tokenizer(cfg.tokenizer)
