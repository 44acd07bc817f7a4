"""`atat import`: MDLM's released checkpoints as an `atat export` folder, which eval, sample and transformers load.

MDLM (Sahoo et al. 2024, github.com/kuleshov-group/mdlm) releases its DiT in two layouts. Its parameter names are
ours (models/dit.py) under `backbone.`, plus one buffer we do not keep, `rotary_emb.inv_freq` (the rotary
frequencies, recomputed here; its length gives the head width):

- the hub folder (kuleshov-group/mdlm-owt): config.json with model_type `mdlm` (hidden_dim, cond_dim, n_blocks,
  n_heads, dropout, time_conditioning, model_length, vocab_size) and model.safetensors. No tokenizer: OpenWebText
  is GPT-2's, with MASK appended at 50,257 (vocab_size 50,258), which is our MASK rule too.
- the Lightning `.ckpt` its training writes: `state_dict` (raw weights, `backbone.*`), `ema` (models/ema.py's
  state: `shadow_params`, one tensor per parameter of `itertools.chain(backbone.parameters(), noise.parameters())`
  in that order; its log-linear and cosine schedules have no parameters, so the list is the backbone's parameters
  in registration order, which is the state dict's key order without the buffer), and `hyper_parameters` (the Hydra
  config and the tokenizer, pickled as omegaconf and transformers objects).

A .ckpt is a pickle: it is read with an unpickler that builds tensors and plain containers and turns every other
class into an inert placeholder (no import, no constructor runs), so neither omegaconf nor Lightning is needed
and the file's code never runs. The model's shape comes from the weights; the pickled config, where readable,
gives L, time conditioning and the schedule (log-linear or cosine, eps = 1e-3), and is checked against what we
compute (MDLM's SUBS in continuous time).
"""

from __future__ import annotations

import json
import pickle
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mdlm_atat import __version__
from mdlm_atat.config import Config, ConfigError, from_dict
from mdlm_atat.data.sources import DataError
from mdlm_atat.data.tokenizers import build_tokenizer
from mdlm_atat.export import _check_out, write_export
from mdlm_atat.run import safetensors
from mdlm_atat.train.checkpoint import CheckpointError

PREFIX = "backbone."
MDLM_BUFFERS = ("rotary_emb.inv_freq",)  # in MDLM's state dicts, not ours
MDLM_LENGTH = 1024  # MDLM's OpenWebText block (configs/model/small.yaml), when a .ckpt's config is unreadable
# MDLM's noise.type -> our diffusion.schedule: LogLinearNoise and CosineNoise, both with eps = 1e-3 (their default,
# which MDLM's get_noise uses), are diffusion/schedule.py's LogLinearSchedule and CosineSchedule.
MDLM_SCHEDULES = {"loglinear": "loglinear", "cosine": "cosine"}
TOKENIZER_HINT = ("pass the tokenizer the model was trained with, e.g. --tokenizer gpt2 for MDLM's OpenWebText "
                  "models (a HF name, or a local folder such as ../shared/tokenizers/gpt2)")


@dataclass
class MdlmCheckpoint:
    """What a release holds, in our terms."""

    weights: dict[str, torch.Tensor]  # our parameter names (no `backbone.`, no buffers)
    head_dim: int  # from rotary_emb.inv_freq
    settings: dict[str, Any]  # what MDLM's config says: schedule, length, time_conditioning, dropout, ...
    step: int | None
    kind: str  # how the model card and the summary name the weights


# ----------------------------------------------------------------------------------------------------------
# Reading the two layouts


def read_hub_folder(folder: Path, config: dict[str, Any]) -> MdlmCheckpoint:
    """`config`: the folder's config.json (model_type mdlm), already read."""
    load_file, _ = safetensors()
    state = load_file(str(folder / "model.safetensors"))
    weights, head_dim = _backbone(state, folder / "model.safetensors")
    settings = {
        "schedule": None,  # the hub's config.json does not say; MDLM's released models are log-linear
        "length": config.get("model_length"),
        "time_conditioning": config.get("time_conditioning"),
        "dropout": config.get("dropout"),
        "num_heads": config.get("n_heads"),
    }
    return MdlmCheckpoint(weights, head_dim, settings, None, "released")


def read_lightning_checkpoint(path: Path, use_ema: bool = True) -> MdlmCheckpoint:
    try:
        # mmap: the optimiser's states (twice the model) are never read from disk
        payload = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_inert_pickle, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path}: not a readable Lightning checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path}: no `state_dict` in this file; is it a .ckpt written by MDLM's training?")
    weights, head_dim = _backbone(payload["state_dict"], path)
    kind = "raw"
    if use_ema:
        ema = payload.get("ema")
        shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
        if not shadow:
            raise CheckpointError(f"{path}: no EMA (`ema.shadow_params`) in this checkpoint; pass --no-ema for the "
                                  "raw weights")
        weights = _ema_weights(shadow, weights, path)
        kind = "ema"
    config = _plain(payload.get("hyper_parameters", {})).get("config")
    config = config if isinstance(config, dict) else {}
    schedule = _schedule(config, path)
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    settings = {
        "schedule": schedule,
        "length": model.get("length"),
        "time_conditioning": config.get("time_conditioning"),
        "dropout": model.get("dropout"),
        "num_heads": model.get("n_heads"),
    }
    step = payload.get("global_step")
    # The tensors stay memory-mapped until the export copies them (export._plain): one copy, not two.
    return MdlmCheckpoint(weights, head_dim, settings, step if isinstance(step, int) else None, kind)


def _backbone(state: dict[str, torch.Tensor], source: Path) -> tuple[dict[str, torch.Tensor], int]:
    """MDLM's `backbone.*` tensors under our names, and the head width from the rotary frequencies."""
    inner = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if "vocab_embed.embedding" not in inner:
        raise CheckpointError(f"{source}: no `{PREFIX}vocab_embed.embedding`: not MDLM's DiT (backbone: dit)")
    inv_freq = inner.get(MDLM_BUFFERS[0])
    head_dim = 2 * inv_freq.numel() if inv_freq is not None else 0
    return {k: v for k, v in inner.items() if k not in MDLM_BUFFERS}, head_dim


def _ema_weights(shadow: list, raw: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Name the EMA's shadow list: it follows the backbone's parameters, i.e. its state-dict keys less buffers,
    the order `_backbone` keeps in `raw`."""
    names = list(raw)
    shapes_match = len(shadow) == len(names) and all(
        isinstance(s, torch.Tensor) and s.shape == raw[n].shape for s, n in zip(shadow, names)
    )
    if not shapes_match:
        raise CheckpointError(
            f"{source}: the EMA's {len(shadow)} shadow parameters do not line up with the backbone's {len(names)} "
            "parameters (a noise schedule with parameters, or another model); pass --no-ema for the raw weights"
        )
    return dict(zip(names, shadow))


def _schedule(config: dict[str, Any], source: Path) -> str | None:
    """Our `diffusion.schedule` for MDLM's config (None where it does not say); a CheckpointError for an objective
    `atat` does not evaluate and sample: MDLM's DiT, SUBS, continuous time, a log-linear or cosine schedule."""
    expected = {"backbone": "dit", "parameterization": "subs", "T": 0}
    found = {k: config.get(k) for k in expected}
    wrong = [f"{k}={found[k]!r}" for k in expected if found[k] is not None and found[k] != expected[k]]
    noise = config.get("noise") if isinstance(config.get("noise"), dict) else {}
    noise_type = noise.get("type")
    if noise_type is not None and noise_type not in MDLM_SCHEDULES:
        wrong.append(f"noise.type={noise_type!r}")
    if wrong:
        raise CheckpointError(
            f"{source}: {', '.join(wrong)}; atat evaluates and samples MDLM's DiT with SUBS in continuous time on the "
            "log-linear or cosine schedule (backbone=dit, parameterization=subs, T=0, noise=loglinear|cosine) only"
        )
    return MDLM_SCHEDULES.get(noise_type)


# ----------------------------------------------------------------------------------------------------------
# An unpickler that never imports: tensors and plain containers are built, anything else is an inert placeholder.


class _Inert(dict):
    """Stands in for any pickled class outside the allowlist: absorbs constructor arguments, state and items.

    A dict, so that SETITEMS on a pickled dict subclass works; set up in __new__, because pickle's NEWOBJ never
    calls __init__."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        obj = super().__new__(cls)
        obj.args, obj.state, obj.appended = args, None, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.appended.append(item)

    def extend(self, items: Any) -> None:
        self.appended.extend(items)


_BUILTINS = {"set", "frozenset", "slice", "complex", "range", "bytearray", "int", "float", "str", "bool", "dict",
             "list", "tuple"}


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name in ("OrderedDict", "defaultdict"):
            return super().find_class(module, name)
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        if module == "torch._utils" and name.startswith("_rebuild_"):
            return super().find_class(module, name)
        if module == "torch" and (name in ("Size", "device") or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return super().find_class(module, name)
        if (module, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
            return super().find_class(module, name)
        return type(name, (_Inert,), {"__module__": f"inert.{module}"})


_inert_pickle = types.ModuleType("mdlm_atat_inert_pickle")  # torch.load's pickle_module: only Unpickler is used
_inert_pickle.Unpickler = _InertUnpickler  # type: ignore[attr-defined]
_inert_pickle.load = lambda f, **kwargs: _InertUnpickler(f, **kwargs).load()  # type: ignore[attr-defined]


def _plain(value: Any) -> Any:
    """Placeholders of omegaconf's DictConfig / ListConfig / value nodes -> dicts, lists and values.

    A pickled DictConfig's state is {"_content": {key: node}, "_metadata", "_parent"}; a ListConfig's `_content` is
    a list; a leaf node's state holds "_val". `_parent` points back up and is skipped.
    """
    if isinstance(value, _Inert):
        state = value.state if isinstance(value.state, dict) else {}
        if "_content" in state:
            return _plain(state["_content"])
        if "_val" in state:
            return _plain(state["_val"])
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------
# The verb


def read_release(source: str | Path, use_ema: bool = True) -> MdlmCheckpoint:
    """Either layout, recognised by what it holds; a CheckpointError saying what was expected otherwise."""
    path = Path(source).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not (config_file.is_file() and (path / "model.safetensors").is_file()):
            raise CheckpointError(f"--mdlm {path}: expected MDLM's hub folder (config.json and model.safetensors, "
                                  "e.g. from `hf download kuleshov-group/mdlm-owt --local-dir DIR`)")
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = None
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type != "mdlm":
            raise CheckpointError(f"--mdlm {path}: config.json has model_type {model_type!r}, not 'mdlm' (MDLM's hub "
                                  "checkpoints); an atat run or export needs no import")
        return read_hub_folder(path, config)
    if path.is_file():
        return read_lightning_checkpoint(path, use_ema)
    raise CheckpointError(f"--mdlm {path}: not found; pass MDLM's hub folder or a Lightning .ckpt of its training")


def mdlm_config(release: MdlmCheckpoint, tokenizer: str, dataset: str) -> Config:
    """Our config for MDLM's model: its DiT's shape from the weights, its L and conditioning from its config."""
    w = release.weights
    hidden = w["vocab_embed.embedding"].shape[1]
    num_layers = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    settings = release.settings
    num_heads = settings["num_heads"] or (hidden // release.head_dim if release.head_dim else None)
    if not num_heads:
        raise CheckpointError(f"{hidden}-wide DiT: cannot tell its number of heads (no rotary_emb.inv_freq and no "
                              "n_heads in its config)")
    if release.head_dim and hidden != num_heads * release.head_dim:
        raise CheckpointError(f"n_heads {num_heads} in its config, but rotary_emb.inv_freq is for heads of "
                              f"{release.head_dim} in a {hidden}-wide DiT")
    return from_dict({
        "data": {"dataset_name": dataset, "tokenizer": tokenizer, "max_length": settings["length"] or MDLM_LENGTH,
                 "framing": "packed"},
        "model": {
            "name": "mdlm-dit", "hidden_dim": hidden, "num_layers": num_layers, "num_heads": num_heads,
            "cond_dim": w["sigma_map.mlp.0.weight"].shape[0],
            "mlp_ratio": w["blocks.0.mlp.0.weight"].shape[0] // hidden,
            "dropout": 0.1 if settings["dropout"] is None else settings["dropout"],
            "time_conditioning": bool(settings["time_conditioning"]),
            "pad_vocab_multiple": 1,  # MDLM's DiT as it is: 50,258 rows, the GEMMs MDLM computes
        },
        "diffusion": {"schedule": settings["schedule"] or "loglinear", "eps": 1e-3},  # MDLM's get_noise defaults
        "atat": {"enabled": False},  # MDLM: uniform masking
    })


def import_mdlm(
    source: str | Path,
    out_dir: str | Path,
    tokenizer: str | None = None,
    dataset: str = "openwebtext",
    use_ema: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert MDLM's hub folder or Lightning .ckpt into an export folder; returns a summary."""
    safetensors()  # before any work: a missing package is the first thing to say
    folder = Path(source).expanduser()
    out = _check_out(Path(out_dir), overwrite, folder)  # as atat export: never over the source or other files
    release = read_release(source, use_ema)
    if tokenizer is None:
        if not (folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json"))):
            raise ConfigError(f"--tokenizer: MDLM's checkpoints carry no tokenizer; {TOKENIZER_HINT}")
        tokenizer = str(folder)
    if tokenizer == "bpe":
        raise ConfigError(f"--tokenizer bpe: would train a new tokenizer; {TOKENIZER_HINT}")
    cfg = mdlm_config(release, tokenizer, dataset)
    try:
        tok = build_tokenizer(cfg.data, lambda: [])  # a named tokenizer: nothing to train
    except DataError as err:
        raise ConfigError(f"--tokenizer {tokenizer}: {err}") from None
    rows = release.weights["vocab_embed.embedding"].shape[0]
    if tok.num_tokens != rows:
        raise ConfigError(
            f"--tokenizer {tokenizer}: {tok.vocab_size:,} tokens + MASK at {tok.mask_id} make {tok.num_tokens:,} ids, "
            f"but the checkpoint's embedding has {rows:,} rows; {TOKENIZER_HINT}"
        )
    where = f"`{Path(source).name}`" + (f", step {release.step}" if release.step is not None else "")
    weights_text = {"ema": "its EMA weights", "raw": "its raw weights (not the EMA)", "released": "the weights"}
    origin = (
        f"MDLM's checkpoint {where} (Sahoo et al., NeurIPS 2024, github.com/kuleshov-group/mdlm): "
        f"{weights_text[release.kind]} under mdlm-atat's parameter names (the same DiT), converted by "
        f"`atat import` (mdlm-atat {__version__})."
    )
    meta = {"step": release.step, "config_hash": cfg.hash(), "weights": release.kind}
    files = write_export(out, release.weights, cfg, tok, meta, [], origin=origin)
    return {"out": str(out_dir), "source": str(source), "weights": release.kind, "step": release.step,
            "schedule": cfg.diffusion.schedule,
            "hidden_dim": cfg.model.hidden_dim, "num_layers": cfg.model.num_layers, "num_heads": cfg.model.num_heads,
            "max_length": cfg.data.max_length, "time_conditioning": cfg.model.time_conditioning,
            "tokenizer": tok.name, "mask_id": tok.mask_id, "files": files}
