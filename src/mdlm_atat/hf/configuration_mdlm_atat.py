"""transformers configuration of an mdlm-atat denoiser (MDLM's DiT), shipped inside every `atat export` folder.

Self-contained on purpose: transformers copies this file out of the folder and imports it with
`trust_remote_code=True`, where the mdlm_atat package may not be installed. The fields are the ones `atat export`
writes to config.json (mdlm_atat/export.py, `hf_config`).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MdlmAtatConfig(PretrainedConfig):
    model_type = "mdlm-atat-dit"

    def __init__(
        self,
        vocab_size: int = 50258,  # embedding rows: the tokenizer's ids plus an appended MASK (and PAD)
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        cond_dim: int = 128,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        time_conditioning: bool = False,  # MDLM's default: the denoiser ignores the noise level
        schedule: str = "loglinear",  # the masking rate alpha(t) trained with: loglinear (1 - eps) t, or cosine
        schedule_eps: float = 1e-3,
        is_diffusion_model: bool = True,  # False: the autoregressive baseline (causal attention)
        max_position_embeddings: int = 1024,  # L of training; rotary positions work at any length
        mask_token_id: int | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.cond_dim = cond_dim
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.schedule = schedule
        self.schedule_eps = schedule_eps
        self.is_diffusion_model = is_diffusion_model
        self.max_position_embeddings = max_position_embeddings
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)
