"""transformers model of an mdlm-atat denoiser (MDLM's DiT), shipped inside every `atat export` folder.

    model = AutoModelForMaskedLM.from_pretrained(FOLDER, trust_remote_code=True)
    logits = model(input_ids).logits  # (B, L, vocab_size)

Self-contained on purpose (torch and transformers only): transformers copies this file out of the folder, where
the mdlm_atat package may not be installed. It restates the forward of mdlm_atat/models/dit.py, with the same
parameter names, so an export's model.safetensors loads as it is. tests/test_hf.py holds the two to the same
logits, bit for bit in float32, across random configurations: change both together.

The logits are the DiT's raw output. MDLM's SUBS parameterisation turns them into p(x0 | x_t): the MASK logit
is -inf, a log-softmax over the rest, and a position that is not MASK in x_t keeps its token.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_mdlm_atat import MdlmAtatConfig

ROTARY_BASE = 10_000
FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal width of the noise-level embedding (DiT, MDLM)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rotary_cos_sin(seq_len: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, hd), float32, rotate-half convention; elementwise ops only (exact positions under autocast)."""
    inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # (L, hd / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (L, hd)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, hd) rotated by position in float32, returned in x's dtype."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # (L, 1, hd)
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class LayerNorm(nn.Module):
    """Weight, no bias, computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), (self.dim,), self.weight.float())
        return out.to(x.dtype)


class TokenEmbedding(nn.Module):
    def __init__(self, dim: int, num_tokens: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(num_tokens, dim))

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.embedding)  # (B, L, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, cond_dim, bias=True),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None, :]  # (B, half)
        embedding = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
        if dim % 2:
            embedding = torch.cat((embedding, torch.zeros_like(embedding[:, :1])), dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE))  # (B, cond)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: int, dropout: float, causal: bool):
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim, bias=True),
        )
        self.dropout2 = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        self.adaLN_modulation.zero_init = True  # adaLN-zero: the block starts as the identity

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        H = self.num_heads
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(
            6, dim=-1
        )  # each (B, 1, D)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        q, k, v = self.attn_qkv(h).view(B, L, 3, H, D // H).unbind(dim=2)  # each (B, L, H, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        h = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal
        )  # (B, H, L, hd)
        h = h.transpose(1, 2).reshape(B, L, D)
        x = x + gate_msa * self.dropout1(self.attn_out(h))
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * self.dropout2(h)  # (B, L, D)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, num_tokens: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, num_tokens, bias=True)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim, bias=True)
        self.linear.zero_init = self.adaLN_modulation.zero_init = True  # uniform start: loss (1 - eps) ln V

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # each (B, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, V)


class MdlmAtatForMaskedLM(PreTrainedModel):
    """MDLM's DiT: input_ids x_t (B, L) and an optional noise level (B,) -> logits (B, L, vocab_size).

    `noise_level` is sigma(t) = -log(1 - alpha(t)), alpha(t) the masking rate of the schedule trained with
    (`config.schedule`: log-linear (1 - eps) t, MDLM's default, or cosine); a model without time conditioning
    (MDLM's default) ignores it, as in training, and it may be left out.
    """

    config_class = MdlmAtatConfig
    base_model_prefix = "dit"
    main_input_name = "input_ids"
    _no_split_modules = ["DiTBlock"]

    def __init__(self, config: MdlmAtatConfig):
        super().__init__(config)
        D, H = config.hidden_size, config.num_attention_heads
        if D % H or (D // H) % 2:
            raise ValueError(f"hidden_size {D} / num_attention_heads {H} must be an even integer")
        self.head_dim = D // H
        causal = not config.is_diffusion_model
        self.vocab_embed = TokenEmbedding(D, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(D, H, config.cond_dim, config.mlp_ratio, config.dropout, causal)
            for _ in range(config.num_hidden_layers)
        )
        self.output_layer = FinalLayer(D, config.vocab_size, config.cond_dim)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # MDLM's initialisation, for a model built from a config rather than loaded. Decided on the leaf modules:
        # transformers (5) skips a custom module without parameters of its own, such as a block.
        if isinstance(module, LayerNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, TokenEmbedding):
            module.reset_parameters()
        elif isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()

    def get_input_embeddings(self) -> TokenEmbedding:
        return self.vocab_embed

    def forward(
        self,
        input_ids: torch.Tensor,
        noise_level: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple[torch.Tensor]:
        # The DiT attends to every position (MDLM has no padding mask): refuse a mask it would silently ignore.
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: this denoiser attends to every position; pass unpadded input_ids")
        B, L = input_ids.shape
        if noise_level is None or not self.config.time_conditioning:
            noise_level = torch.zeros(B, device=input_ids.device)
        x = self.vocab_embed(input_ids)  # (B, L, D)
        c = F.silu(self.sigma_map(noise_level))  # (B, cond)
        cos, sin = rotary_cos_sin(L, self.head_dim, input_ids.device)  # each (L, hd)
        for block in self.blocks:
            x = block(x, cos, sin, c)
        logits = self.output_layer(x, c)  # (B, L, vocab_size)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return MaskedLMOutput(logits=logits) if return_dict else (logits,)
