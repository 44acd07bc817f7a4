"""A run: what a config builds (objective, estimator) and what inference loads from a checkpoint or an export.

The layer between the parts (models/, diffusion/, train/'s building blocks) and what uses them (eval/, the
training loop in train/trainer.py, sample, export, the benchmarks): importing it never imports the loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mdlm_atat.config import Config, ConfigError, from_dict
from mdlm_atat.data.tokenizers import Tokenizer
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective, NextTokenObjective
from mdlm_atat.diffusion.schedule import build_schedule
from mdlm_atat.models import build_model
from mdlm_atat.models.importance import ImportanceEstimator, unigram_surprisal
from mdlm_atat.train.checkpoint import CheckpointError, is_export_dir, load_run_checkpoint
from mdlm_atat.train.checkpoint import resolve_checkpoint  # noqa: F401 (the layers above eval/ resolve through here)


def make_objective(cfg: Config, tokenizer: Tokenizer) -> MaskedDiffusionObjective:
    if cfg.model.name == "ar":  # the AR baseline: same loop, next-token NLL (models/ar.py)
        return NextTokenObjective(tokenizer.mask_id)
    schedule = build_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    # The DiT fuses its output projection with the SUBS loss: no (M, V) logits (diffusion/fused_loss.py).
    return MaskedDiffusionObjective(
        schedule, tokenizer.mask_id, cfg.diffusion.antithetic, fused=True, mask_padding=cfg.diffusion.mask_padding
    )


def method_name(cfg: Config) -> str:
    """What the run trains, as metrics.jsonl, the report and the console name it."""
    if cfg.model.name == "ar":
        return "ar (autoregressive baseline: causal DiT, next-token loss)"
    return f"atat ({cfg.atat.importance_mode}, {cfg.atat.masking})" if cfg.atat.enabled else "mdlm"


def build_estimator(cfg: Config, num_tokens: int, unigram_counts) -> ImportanceEstimator | None:
    """ATAT's importance estimator with the training split's unigram surprisal, or None for the MDLM baseline."""
    if not cfg.atat.enabled:
        return None
    surprisal = unigram_surprisal(unigram_counts, num_tokens) if unigram_counts is not None else None
    return ImportanceEstimator(cfg.atat, num_tokens, surprisal)


# ----------------------------------------------------------------------------------------------------------
# Inference: a model (EMA weights by default) from a .pt checkpoint, a run folder or an `atat export` folder.


def load_for_inference(
    checkpoint: str | Path, use_ema: bool = True, device: torch.device | str = "cpu", with_estimator: bool = False
) -> tuple[torch.nn.Module, Config, Tokenizer, dict[str, Any]]:
    """(model in eval mode, config, tokenizer, the checkpoint's metadata) from a .pt file, a run folder or an
    `atat export` folder. With `with_estimator`, the metadata's "estimator" is ATAT's importance estimator saved
    with the weights, in eval mode, or None for a run without one (the MDLM baseline)."""
    if is_export_dir(checkpoint):
        model, cfg, tokenizer, meta = load_export(checkpoint, use_ema=use_ema, device=device)
        if with_estimator:
            load_file, _ = safetensors()
            file = Path(checkpoint) / "estimator.safetensors"
            meta["estimator"] = _estimator(cfg, tokenizer, load_file(str(file)) if file.is_file() else None, device)
        return model, cfg, tokenizer, meta
    payload = load_run_checkpoint(checkpoint)
    cfg = from_dict(payload["config"])
    tokenizer = Tokenizer.from_json(payload["tokenizer"])
    model = build_model(cfg.model, tokenizer.num_tokens)
    weights = payload["ema"] if use_ema and payload.get("ema") is not None else payload["model"]
    model.load_state_dict(weights)
    model.to(device).eval()
    meta = {
        "step": payload["state"]["step"],
        "tokens_seen": payload["state"]["samples_seen"] * cfg.data.max_length,
        "config_hash": payload["config_hash"],
        "weights": "ema" if weights is payload.get("ema") else "raw",
    }
    if with_estimator:  # from the payload already read: a checkpoint with its optimiser is GBs at real sizes
        meta["estimator"] = _estimator(cfg, tokenizer, payload.get("estimator"), device)
    return model, cfg, tokenizer, meta


def _estimator(cfg: Config, tokenizer: Tokenizer, state: dict | None, device: torch.device | str):
    """The importance estimator from its saved state (buffers included), in eval mode; None without one."""
    estimator = build_estimator(cfg, tokenizer.num_tokens, None) if state else None
    if estimator is None:
        return None
    estimator.load_state_dict(state)
    return estimator.to(device).eval()


def safetensors():
    """(load_file, save_file) of safetensors, which exported folders use; a CheckpointError without it."""
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        raise CheckpointError("exported folders use safetensors: pip install safetensors") from None
    return load_file, save_file


def load_export(
    folder: str | Path, use_ema: bool = True, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Config, Tokenizer, dict[str, Any]]:
    """(model in eval mode, config, tokenizer, metadata) from an exported folder, as `load_for_inference` returns."""
    load_file, _ = safetensors()
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        info = config["mdlm_atat"]
        tok_info = json.loads((folder / "tokenizer_config.json").read_text())["mdlm_atat"]
        backend = (folder / "tokenizer.json").read_text()
    except (OSError, KeyError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{folder}: not a complete atat export folder ({type(err).__name__}: {err})") from None
    if not use_ema and info["weights"] == "ema":
        raise ConfigError(f"--no-ema: {folder} holds the EMA weights only; export with --no-ema for the raw ones")
    cfg = from_dict(info["config"])
    tokenizer = Tokenizer.from_json(json.dumps({**tok_info, "backend": backend}))
    model = build_model(cfg.model, tokenizer.num_tokens)
    try:
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except Exception as err:  # noqa: BLE001 - a damaged or mismatched file means the same to the user
        raise CheckpointError(f"{folder / 'model.safetensors'}: cannot load ({type(err).__name__}: {err})") from None
    model.to(device).eval()
    meta = {"step": info["step"], "config_hash": info["config_hash"], "weights": info["weights"]}
    if "tokens_seen" in info:  # folders exported before it was recorded lack it
        meta["tokens_seen"] = info["tokens_seen"]
    return model, cfg, tokenizer, meta
