"""MDLM's DiT denoiser: (x_t, noise level) -> logits (DESIGN 3.1).

A plain-PyTorch re-implementation of the diffusion transformer of MDLM (Sahoo et al. 2024, "Simple and
Effective Masked Diffusion Language Models", github.com/kuleshov-group/mdlm, `models/dit.py`), itself DiT
(Peebles & Xie 2023) adapted to text: bias-free LayerNorm, adaLN-zero conditioning on the noise level, rotary
position embeddings on q and k, bidirectional attention, GELU-tanh MLP, zero-initialised output layer.

Differences from MDLM's file, none of which changes the function computed:
- attention is `F.scaled_dot_product_attention` instead of flash-attn's varlen kernel;
- rotary cos and sin are a float32 table of the first ROTARY_TABLE_LEN positions kept as non-persistent buffers
  (not in the state dict; longer sequences compute theirs on the call): read from memory, where a compiled graph
  would otherwise recompute pow, sin and cos elementwise inside every block's kernels, forward and backward;
- mixed precision is the caller's `torch.autocast`; MDLM hard-codes bf16 autocast inside `forward`.

Parameter names follow MDLM's (`vocab_embed.embedding`, `sigma_map.mlp.0`, `blocks.N.attn_qkv`, ...), so its
state dicts line up key for key (MDLM's also holds the buffer `rotary_emb.inv_freq`, which this one does not).

The denoiser returns logits: SUBS masking, weighting and reduction belong to the objective. For memory, the
objective may instead hand the output layer a `project` callback (its fused, chunked SUBS loss,
diffusion/fused_loss.py), which the layer calls with the selected rows' features and its own weight and bias in
place of the projection: the (M, V) logits are never held. The call happens inside the output layer's forward
because FSDP2 only unshards the layer's weight there (the loss component owns the projection, as torchtitan's
chunked loss does; this module knows nothing of the loss).

Vocabulary padding (`model.pad_vocab_multiple`, nanoGPT's 50,304): the embedding and the output layer hold
`padded_tokens` = ceil(num_tokens / m) * m rows, so that the output GEMMs' vocabulary dimension is a multiple of m
(GPT-2's 50,258 sends them to 2-element-aligned kernels on GPUs). The padding rows are zero (initialised so, and
nothing ever gives them a gradient): the logits keep the first num_tokens columns only, and a `project` callback
is told num_tokens and excludes the rest. Only the real rows draw random numbers at init, so a padded model starts
with the same weights, and leaves the RNG in the same state, as an unpadded one built from the same seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from collections.abc import Callable

from mdlm_atat.config import ModelConfig

# (rows' features (M, D), weight (V', D), bias (V',) or None, num_tokens V) -> anything: a loss that projects rows
# itself. The weight's rows from V on (V' - V of them) are vocabulary padding: never a token, excluded from the loss.
Projection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], object]

ROTARY_BASE = 10_000
FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal width of the noise-level embedding (DiT, MDLM)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (shared ones once), vocabulary padding rows included; works on the meta device."""
    return sum(p.numel() for p in module.parameters())


def padded_size(num_tokens: int, multiple: int) -> int:
    """ceil(num_tokens / multiple) * multiple: the rows of the DiT's vocabulary tensors (50,258 -> 50,304 at 64)."""
    return -(-num_tokens // multiple) * multiple


# The state-dict tensors with one row per token id: the ones vocabulary padding lengthens.
VOCAB_TENSORS = ("vocab_embed.embedding", "output_layer.linear.weight", "output_layer.linear.bias")


def strip_vocab_padding(state: dict[str, torch.Tensor], num_tokens: int) -> dict[str, torch.Tensor]:
    """A DiT's state dict with its vocabulary tensors cut to the real rows (num_tokens): what an export holds, as an
    unpadded model's (transformers' modeling file knows no padding). A new dict; the other tensors as they are."""
    return {k: v[:num_tokens] if k in VOCAB_TENSORS else v for k, v in state.items()}


def pad_vocab(state: dict[str, torch.Tensor], num_tokens: int, num_rows: int) -> dict[str, torch.Tensor]:
    """The inverse of `strip_vocab_padding`: vocabulary tensors of num_tokens rows get zero rows up to num_rows,
    which is what the padding rows are in a model trained with them (zero at init, never a gradient). Tensors of
    any other length stay as they are, for load_state_dict to refuse."""
    if num_rows == num_tokens:  # nothing to add: no copy
        return state

    def padded(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v, v.new_zeros(num_rows - num_tokens, *v.shape[1:])])

    return {k: padded(v) if k in VOCAB_TENSORS and v.shape[0] == num_tokens else v for k, v in state.items()}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # `1 + scale` so that the zero-initialised adaLN starts as the identity (adaLN-zero, DiT).
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021), rotate-half convention on the full head width, as flash-attn's
# `apply_rotary_emb_qkv_` (interleaved=False) does in MDLM.


def rotary_cos_sin(
    seq_len: int, head_dim: int, device: torch.device | str | None = None, base: float = ROTARY_BASE
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (seq_len, head_dim), float32.

    Built with elementwise ops only: an outer product via matmul or einsum would be cast to bf16 under
    autocast, and bf16 cannot represent positions above 256 exactly.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # (L, hd / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (L, hd): the two halves share frequencies (rotate-half)
    return angles.cos(), angles.sin()


ROTARY_TABLE_LEN = 4096  # positions whose rotary cos/sin are kept (2 MiB at head width 64)


class RotaryTable(nn.Module):
    """cos and sin of the rotary angles as non-persistent float32 buffers (ROTARY_TABLE_LEN, head_dim): the same
    numbers as `rotary_cos_sin`, computed once. `(seq_len, device)` -> the first seq_len rows; a longer sequence
    (or a table cast away from float32) gets them computed on the call."""

    def __init__(self, head_dim: int, max_len: int = ROTARY_TABLE_LEN):
        super().__init__()
        self.head_dim, self.max_len = head_dim, max_len
        self.register_buffer("cos", torch.empty(max_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_len, head_dim), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill the table (also after `to_empty()` from the meta device)."""
        if self.cos.device.type == "meta":
            return
        cos, sin = rotary_cos_sin(self.max_len, self.head_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.max_len or self.cos.dtype != torch.float32:
            return rotary_cos_sin(seq_len, self.head_dim, device=device)
        return self.cos[:seq_len], self.sin[:seq_len]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., L, H, hd) by position; cos, sin (L, hd). Computed in float32, returned in x's dtype."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # (L, 1, hd): broadcast over heads
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Layers


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 (MDLM turns autocast off for it)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), (self.dim,), self.weight.float())
        return out.to(x.dtype)


class TokenEmbedding(nn.Module):
    """A raw (num_rows, D) table, initialised like nn.Linear rather than nn.Embedding's N(0, 1), as MDLM. Rows from
    num_tokens on are vocabulary padding: zero, never looked up; only the real rows draw random numbers."""

    def __init__(self, dim: int, num_tokens: int, num_rows: int | None = None):
        super().__init__()
        self.num_tokens = num_tokens
        self.embedding = nn.Parameter(torch.empty(num_rows or num_tokens, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.embedding[: self.num_tokens], a=math.sqrt(5))
        self.embedding[self.num_tokens :].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.embedding)  # (B, L, D)


class TimestepEmbedder(nn.Module):
    """Noise level (B,) -> (B, cond): sinusoidal features, then a two-layer SiLU MLP (DiT, MDLM)."""

    def __init__(self, cond_dim: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, cond_dim, bias=True),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000) -> torch.Tensor:
        """(B,) -> (B, dim) float32: [cos(t f_k), sin(t f_k)], f_k geometric from 1 to 1 / max_period."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )  # (half,)
        args = t[:, None].float() * freqs[None, :]  # (B, half)
        embedding = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
        if dim % 2:
            embedding = torch.cat((embedding, torch.zeros_like(embedding[:, :1])), dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (B, cond)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero: each branch is shifted and scaled by c, then gated."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        cond_dim: int,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        causal: bool = False,
        gate_init: float = 0.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.gate_init = gate_init

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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # adaLN-zero: every gate starts at 0, so each block starts as the identity on the residual stream
        # (gate_init = 0, MDLM); shifts and scales start at 0 in any case.
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)
        if self.gate_init:
            with torch.no_grad():
                gates = self.adaLN_modulation.bias.view(6, -1)  # shift, scale, gate (attn); shift, scale, gate (MLP)
                gates[2].fill_(self.gate_init)
                gates[5].fill_(self.gate_init)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        H = self.num_heads
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(
            6, dim=-1
        )  # each (B, 1, D)

        # attention
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, L, D)
        q, k, v = self.attn_qkv(h).view(B, L, 3, H, D // H).unbind(dim=2)  # each (B, L, H, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        h = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal
        )  # (B, H, L, hd); MDLM uses no attention dropout
        h = h.transpose(1, 2).reshape(B, L, D)
        x = x + gate_msa * self.dropout1(self.attn_out(h))

        # MLP
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * self.dropout2(h)  # (B, L, D)


class OutputLinear(nn.Linear):
    """nn.Linear(dim, num_rows) whose rows from num_tokens on are vocabulary padding. nn.Linear's default init
    (which FinalLayer then zeroes) draws for the real rows alone, as an nn.Linear(dim, num_tokens) would: the
    random numbers a model draws at init do not depend on its padding."""

    def __init__(self, dim: int, num_tokens: int, num_rows: int):
        self.num_tokens = num_tokens
        super().__init__(dim, num_rows, bias=True)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n = self.num_tokens
        nn.init.kaiming_uniform_(self.weight[:n], a=math.sqrt(5))
        nn.init.uniform_(self.bias[:n], -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        self.weight[n:].zero_()
        self.bias[n:].zero_()


class FinalLayer(nn.Module):
    """Norm, adaLN shift/scale, then the output projection; all zero-initialised but the norm. The projection has
    num_rows >= num_tokens outputs (vocabulary padding); the logits are the first num_tokens."""

    def __init__(self, dim: int, num_tokens: int, cond_dim: int, num_rows: int | None = None):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = OutputLinear(dim, num_tokens, num_rows or num_tokens)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A zero output layer makes the untrained model uniform over tokens: the initial loss is
        # (1 - eps) ln V (DESIGN 3.1), a check the objective's tests rely on.
        for linear in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def features(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D): the normalised, modulated states the projection maps to logits."""
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # each (B, 1, D)
        return modulate(self.norm_final(x), shift, scale)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rows: torch.Tensor | None = None, project: Projection | None = None
    ) -> object:
        """Logits (B, L, V), or (M, V) for the positions `rows` (B, L) bool; with `project`, whatever it returns
        for those rows' features, this layer's weight and bias and num_tokens (rows is then required)."""
        h = self.features(x, c)  # (B, L, D)
        if project is not None:
            if rows is None:
                raise ValueError("a project callback needs rows: the positions it scores")
            return project_rows(project, h, rows, self.linear.weight, self.linear.bias, self.linear.num_tokens)
        if rows is not None:
            h = h[rows]  # (M, D): project only the positions asked for
        return self.project(h)  # (B, L, num_tokens), or (M, num_tokens) with rows

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Features (..., D) -> logits (..., num_tokens): the GEMM over every row (an aligned N), then the real
        columns (a view; the padding columns are never seen)."""
        return self.linear(h)[..., : self.linear.num_tokens]  # (..., num_rows) -> (..., num_tokens)


@torch.compiler.disable
def project_rows(
    project: Projection, h: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    num_tokens: int,
) -> object:
    """project(h[rows], weight, bias, num_tokens), kept out of a compiled DiT's graph: selecting the rows has a
    data-dependent shape (a graph break anyway), and tracing a chunked loss would specialise on M and recompile
    every step. The blocks stay one graph; the loss compiles its own fixed-shape kernel on CUDA."""
    return project(h[rows], weight, bias, num_tokens)


# ----------------------------------------------------------------------------------------------------------
# The denoiser


class DiT(nn.Module):
    """MDLM's denoiser: tokens x_t (B, L) and noise level (B,) -> logits (B, L, num_tokens) (or, asked to, the
    masked rows' fused SUBS loss: see `forward`).

    `num_tokens` is the vocabulary including the MASK id (the columns of the logits); `padded_tokens` >= num_tokens,
    the rows of the embedding and the output layer (`cfg.pad_vocab_multiple`; the rest are padding, see above).
    `noise_level` is whatever the objective conditions on (MDLM feeds sigma(t) = -log(1 - (1 - eps) t)); with
    `cfg.time_conditioning` off it is replaced by zeros, as in MDLM, so the adaLN layers act as learned biases.
    `causal=True` turns the attention causal (for autoregressive baselines); MDLM itself is bidirectional.
    """

    def __init__(self, cfg: ModelConfig, num_tokens: int, causal: bool = False):
        super().__init__()
        if cfg.hidden_dim % cfg.num_heads or (cfg.hidden_dim // cfg.num_heads) % 2:
            raise ValueError(
                f"model.num_heads: hidden_dim {cfg.hidden_dim} / num_heads {cfg.num_heads} must be an even integer"
            )
        self.num_tokens = num_tokens
        self.padded_tokens = padded_size(num_tokens, cfg.pad_vocab_multiple)
        self.head_dim = cfg.hidden_dim // cfg.num_heads
        self.time_conditioning = cfg.time_conditioning
        self.causal = causal

        self.vocab_embed = TokenEmbedding(cfg.hidden_dim, num_tokens, self.padded_tokens)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.hidden_dim, cfg.num_heads, cfg.cond_dim, cfg.mlp_ratio, cfg.dropout, causal, cfg.gate_init)
            for _ in range(cfg.num_layers)
        )
        self.output_layer = FinalLayer(cfg.hidden_dim, num_tokens, cfg.cond_dim, self.padded_tokens)
        self.rotary = RotaryTable(self.head_dim)

    @torch.no_grad()
    def init_weights(self) -> None:
        """MDLM's initialisation, again: for a model built on the meta device and then `to_empty()`."""
        for module in self.modules():
            if isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, (nn.Linear, TokenEmbedding)):
                module.reset_parameters()
        # After the nn.Linear defaults, so that the zero-inits win.
        for module in self.modules():
            if isinstance(module, (DiTBlock, FinalLayer, RotaryTable)):
                module.reset_parameters()

    def forward(
        self,
        x_t: torch.Tensor,
        noise_level: torch.Tensor,
        rows: torch.Tensor | None = None,
        project: Projection | None = None,
    ) -> torch.Tensor | object:
        """Logits (B, L, num_tokens); with `rows` (B, L) bool, only those positions': (M, num_tokens).

        Under SUBS only masked positions carry loss, so the objective asks for those rows alone: the output
        projection (a third of small's matmul FLOPs) and its (B, L, V) logits shrink to the masked fraction.
        With `project` as well, the objective's loss takes the rows' features (M, D), the output layer's weight and
        bias (padded_tokens rows) and num_tokens, and projects them itself (the fused SUBS loss: no (M, V)
        logits); its result comes back.
        """
        x, c = self.trunk(x_t, noise_level)
        # (B, L, num_tokens) or (M, num_tokens) in the autocast dtype; or what `project` returns
        return self.output_layer(x, c, rows, project)

    def trunk(self, x_t: torch.Tensor, noise_level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks: (B, L) tokens, (B,) noise -> the residual stream (B, L, D) and the conditioning (B, cond)."""
        if not self.time_conditioning:
            noise_level = torch.zeros_like(noise_level)
        x = self.vocab_embed(x_t)  # (B, L, D)
        c = F.silu(self.sigma_map(noise_level))  # (B, cond)
        cos, sin = self.rotary(x_t.shape[1], x_t.device)  # each (L, hd)
        for block in self.blocks:
            x = block(x, cos, sin, c)
        return x, c

    def compile_blocks(self) -> None:
        """torch.compile the trunk (embedding and blocks) for inference, with dynamic shapes: the cached samplers
        run it on a varying number of sequences, evaluation on a last, shorter batch. Training compiles the whole
        model instead (train/distributed.py)."""
        self.trunk = torch.compile(self.trunk, dynamic=True)

    def features(self, x_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """(B, L, D): what the output projection maps to logits. Samplers keep these per sequence (100 MB for
        64 x 1024 at D = 768, against 6.6 GB of bf16 logits) and project only the positions they decode."""
        return self.output_layer.features(*self.trunk(x_t, noise_level))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Features (..., D) -> logits (..., num_tokens): the output projection alone."""
        return self.output_layer.project(h)
