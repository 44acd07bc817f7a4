"""The transformers side of an export folder: remote code, auto_map, and tokenizer files with MASK and PAD.

transformers learns the special tokens from tokenizer.json and tokenizer_config.json, and an id we appended
after the tokenizer's vocabulary (GPT-2's MASK = 50257) is not in tokenizer.json. So the folder's tokenizer.json
holds the appended tokens as added special tokens at exactly their ids, and tokenizer_config.json names them;
`atat_backend` removes them again, so `atat eval` and `atat sample` read back the tokenizer the model was trained
with, byte for byte (the token stores are keyed by its fingerprint).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import tokenizers as hf

from mdlm_atat.data.tokenizers import Tokenizer

REMOTE_CODE_FILES = ("configuration_mdlm_atat.py", "modeling_mdlm_atat.py")
MODEL_CLASS = "modeling_mdlm_atat.MdlmAtatForMaskedLM"
AUTO_MAP = {
    "AutoConfig": "configuration_mdlm_atat.MdlmAtatConfig",
    "AutoModel": MODEL_CLASS,
    "AutoModelForMaskedLM": MODEL_CLASS,
}
# Names given to ids we appended after the vocabulary (tokenizers.py's MASK and PAD rules).
APPENDED_NAMES = {"mask": "[MASK]", "pad": "[PAD]"}


def copy_remote_code(folder: Path) -> None:
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(Path(__file__).with_name(name), folder / name)


def tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, str]:
    """{file name: text} for tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    PAD: the tokenizer's own or appended pad token when the model has one (padded framing); otherwise (packed
    framing: the model never saw padding) EOS, so that batching works in transformers.
    """
    backend = hf.Tokenizer.from_str(json.loads(tokenizer.to_json())["backend"])  # a copy: the caller's is unchanged
    appended = sorted((i, key) for key, i in (("mask", tokenizer.mask_id), ("pad", tokenizer.pad_id))
                      if i is not None and i >= tokenizer.vocab_size)
    for token_id, key in appended:
        backend.add_special_tokens([APPENDED_NAMES[key]])
        if backend.token_to_id(APPENDED_NAMES[key]) != token_id:  # ids are appended in order (tokenizers.py)
            raise ValueError(f"{tokenizer!r}: {APPENDED_NAMES[key]} could not take id {token_id}")
    specials = {
        "bos_token": backend.id_to_token(tokenizer.bos_id),
        "eos_token": backend.id_to_token(tokenizer.eos_id),
        "mask_token": backend.id_to_token(tokenizer.mask_id),
        "pad_token": backend.id_to_token(tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id),
    }
    info = {
        "name": tokenizer.name, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "mask_id": tokenizer.mask_id, "pad_id": tokenizer.pad_id,
        "appended_ids": [i for i, _ in appended],  # in tokenizer.json for transformers only; see atat_backend
    }
    config = {**specials, "model_max_length": max_length, "tokenizer_class": "PreTrainedTokenizerFast",
              "clean_up_tokenization_spaces": False,  # decode as atat does: the tokenizer's own decoder only
              "mdlm_atat": info}
    return {
        "tokenizer.json": backend.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(specials, indent=2),
    }


def atat_backend(tokenizer_json: str, info: dict[str, Any]) -> str:
    """The folder's tokenizer.json without the tokens `tokenizer_files` appended: the trained tokenizer's backend.
    Folders written before tokens were appended have no `appended_ids` and come back unchanged."""
    appended = set(info.get("appended_ids") or ())
    if not appended:
        return tokenizer_json
    data = json.loads(tokenizer_json)
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] not in appended]
    return hf.Tokenizer.from_str(json.dumps(data)).to_str()
