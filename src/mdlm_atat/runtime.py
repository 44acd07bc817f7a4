"""Where and in which precision the work runs."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from mdlm_atat.config import ConfigError

        raise ConfigError(f"training.device: {name!r} asked for, but no CUDA device is visible; use auto or cpu")
    return device


def autocast_for(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; CPU always runs in fp32 (bf16 matmuls on CPU are slow and add nothing here)."""
    if device.type == "cuda" and mixed_precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_name(device: torch.device, mixed_precision: str) -> str:
    return "bf16" if device.type == "cuda" and mixed_precision == "bf16" else "fp32"
