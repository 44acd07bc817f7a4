"""Pieces the benchmark scripts share (they run as `python benchmarks/NAME.py`, so this imports as `common`)."""

from __future__ import annotations

import argparse

import torch

from mdlm_atat.config import MODEL_SIZES, ModelConfig
from mdlm_atat.models.dit import DiT, DiTBlock, FinalLayer


def model_config(args: argparse.Namespace, dropout: float) -> tuple[ModelConfig, str]:
    """The preset (default small), with any explicit dimension taking precedence; returns (config, label)."""
    preset = args.size or "small"
    default = MODEL_SIZES[preset]
    explicit = (args.hidden_dim, args.num_layers, args.num_heads)
    hidden, layers, heads = (e if e is not None else d for e, d in zip(explicit, default))
    label = preset if (hidden, layers, heads) == default else "custom"
    if hidden % heads or (hidden // heads) % 2:
        raise SystemExit(f"--num-heads: hidden_dim {hidden} / num_heads {heads} must be an even integer (rotary)")
    cfg = ModelConfig(hidden_dim=hidden, num_layers=layers, num_heads=heads, cond_dim=args.cond_dim, dropout=dropout)
    return cfg, label


@torch.no_grad()
def move_zero_init_off_zero(model: DiT, generator: torch.Generator, std: float = 0.02) -> None:
    """Give adaLN and the output layer small random weights, so the loss depends on every layer."""
    for module in model.modules():
        if isinstance(module, (DiTBlock, FinalLayer)):
            layers = [module.adaLN_modulation] + ([module.linear] if isinstance(module, FinalLayer) else [])
            for linear in layers:
                for p in (linear.weight, linear.bias):
                    p.copy_(torch.randn(p.shape, generator=generator) * std)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
