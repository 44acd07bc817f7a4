"""Denoisers by `model.name`."""

from __future__ import annotations

import torch

from mdlm_atat.config import ModelConfig
from mdlm_atat.models.ar import causal_dit
from mdlm_atat.models.dit import DiT, count_parameters

# Both names build MDLM's DiT: what makes a run ATAT is its masking, not its denoiser. "ar" is the same DiT with
# causal attention, trained with a next-token loss (models/ar.py).
MODELS = {"atat-dit": DiT, "mdlm-dit": DiT, "ar": causal_dit}


def build_model(cfg: ModelConfig, num_tokens: int) -> torch.nn.Module:
    return MODELS[cfg.name](cfg, num_tokens)


__all__ = ["MODELS", "DiT", "build_model", "count_parameters"]
