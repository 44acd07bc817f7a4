"""`atat eval`: load a checkpoint, prepare the dataset with the checkpoint's own tokenizer, score the bound."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from mdlm_atat.config import Config, from_dict
from mdlm_atat.data.loader import eval_batches
from mdlm_atat.data.store import prepare_split
from mdlm_atat.data.tokenizers import Tokenizer
from mdlm_atat.eval.likelihood import evaluate_bound
from mdlm_atat.models import build_model
from mdlm_atat.runtime import autocast_for, precision_name, resolve_device
from mdlm_atat.train.checkpoint import load_checkpoint, resolve_checkpoint
from mdlm_atat.train.trainer import make_objective


def load_for_inference(
    checkpoint: str | Path, use_ema: bool = True, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Config, Tokenizer, dict[str, Any]]:
    """(model in eval mode, config, tokenizer, the checkpoint's metadata) from a .pt file or a run folder."""
    payload = load_checkpoint(checkpoint)
    cfg = from_dict(payload["config"])
    tokenizer = Tokenizer.from_json(payload["tokenizer"])
    model = build_model(cfg.model, tokenizer.num_tokens)
    weights = payload["ema"] if use_ema and payload.get("ema") is not None else payload["model"]
    model.load_state_dict(weights)
    model.to(device).eval()
    meta = {
        "step": payload["state"]["step"],
        "config_hash": payload["config_hash"],
        "weights": "ema" if weights is payload.get("ema") else "raw",
    }
    return model, cfg, tokenizer, meta


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str | None = None,
    split: str | None = None,
    num_t: int | None = None,
    batch_size: int | None = None,
    max_batches: int = 0,
    seed: int = 0,
    use_ema: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """The NELBO bound (DESIGN 3.5) of a checkpoint on one dataset split, as a JSON-ready dict."""
    path = resolve_checkpoint(checkpoint)
    torch_device = resolve_device(device)
    model, cfg, tokenizer, meta = load_for_inference(path, use_ema=use_ema, device=torch_device)
    data_cfg = cfg.data if dataset is None else dataclasses.replace(cfg.data, dataset_name=dataset)
    split = split or data_cfg.val_split
    store = prepare_split(data_cfg, tokenizer, split)
    batch_size = batch_size or data_cfg.batch_size
    num_t = num_t or cfg.diffusion.eval_num_t
    result = evaluate_bound(
        model,
        make_objective(cfg, tokenizer),
        eval_batches(store.blocks, batch_size, max_batches=max_batches),
        num_t=num_t,
        seed=seed,
        device=torch_device,
        autocast=autocast_for(torch_device, cfg.training.mixed_precision),
    )
    L = data_cfg.max_length
    return {
        **result.to_dict(),
        "step": meta["step"],
        "config_hash": meta["config_hash"],
        "weights": meta["weights"],
        "checkpoint": str(path),
        "dataset": data_cfg.dataset_name,
        "split": split,
        "tokenizer": tokenizer.name,
        "framing": f"packed: documents + EOS concatenated, cut into {L - 2}-token blocks framed [BOS] ... [EOS] (L = {L})",
        "precision": precision_name(torch_device, cfg.training.mixed_precision),
        "objective": "MDLM NELBO, uniform masking, log-linear schedule, continuous time",
    }
