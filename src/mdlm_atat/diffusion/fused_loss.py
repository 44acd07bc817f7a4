"""The SUBS loss fused with the output projection, chunk by chunk: the (M, V) logits never exist at once.

The plain path (`objective.masked_token_nll` on the DiT's (M, V) logits) keeps the logits for the backward and
makes several float32 (M, V) tensors around them: the upcast, the log-softmax and their gradients. For
MDLM-small at batch 32 x 1024 (M ~ 16k masked rows, V = 50,258) each is about 3 GiB. As Liger-Kernel's fused
linear cross-entropy does, we take the rows `chunk_rows` at a time, project them, take the SUBS log-sum-exp
(DESIGN 3.1: the MASK logit is -inf) and, when a gradient is wanted, that chunk's gradient at once:

    g = w_i * (softmax_i - onehot(target_i))            (C, V), the MASK column's probability exactly 0
    grad_hidden[chunk] = g @ weight,  grad_weight += g^T @ hidden[chunk],  grad_bias += g.sum(0)

so only one chunk's logits and g are ever alive, and the backward merely scales the stored gradients by the
incoming one. The price is computing the gradients in the forward, i.e. even when the caller never calls
backward; under `torch.no_grad` (evaluation) that work is skipped.

Numerics are those of `masked_token_nll`: logits in the compute dtype (bf16 under CUDA autocast), the
log-sum-exp in float32 (float64 if the inputs are float64, which the tests use to check gradients tightly).
g is kept in the logits' dtype for the two matmuls, as autograd would; grad_weight and grad_bias accumulate
over chunks in float32.

The weight may hold more rows than the vocabulary (the DiT's padding to an aligned GEMM, models/dit.py): columns
from `num_tokens` on are excluded as MASK is (-inf before the log-sum-exp: probability and gradient exactly 0), so
the matmuls keep their padded, aligned N and the loss is that of the first num_tokens columns.

On CUDA the per-chunk elementwise work (upcast, MASK column, log-sum-exp, target logit, softmax - onehot) is one
`torch.compile`d function, so it reads the chunk's logits twice and writes g once instead of making float32
copies; the last chunk is padded with weight-0 rows so that every call has one static shape and nothing
recompiles. On the CPU it runs eagerly (`compiled=False` forces that anywhere).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_ROWS = 4096  # MDLM-small: a bf16 (4096, 50258) chunk is 0.4 GiB; ~4 chunks per batch of 32 x 1024


def subs_rows(
    logits: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor, mask_id: int, with_grad: bool,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's SUBS NLL and, with `with_grad`, the gradient of sum_i w_i nll_i with respect to its logits.

    logits (C, V') in the compute dtype, targets (C,) long, token_weights (C,) -> nll (C,) float32 (float64 for
    float64 logits) and g (C, V') in the logits' dtype, or None. Columns from num_tokens (default V') on are
    padding: excluded like MASK, g exactly 0 there.
    """
    acc_dtype = torch.promote_types(logits.dtype, torch.float32)
    columns = torch.arange(logits.shape[-1], device=logits.device)  # (V',)
    excluded = columns == mask_id  # SUBS: MASK is never predicted
    if num_tokens is not None and num_tokens < logits.shape[-1]:
        excluded = excluded | (columns >= num_tokens)  # nor is a padding column
    rows = logits.to(acc_dtype).masked_fill(excluded, float("-inf"))
    lse = torch.logsumexp(rows, dim=-1)  # (C,)
    nll = lse - rows.gather(-1, targets[:, None]).squeeze(-1)  # (C,)
    if not with_grad:
        return nll, None
    probs = torch.exp(rows - lse[:, None])  # (C, V'); exp(-inf) makes the MASK and padding columns exactly 0
    onehot = (columns == targets[:, None]).to(acc_dtype)  # (C, V')
    g = (probs - onehot) * token_weights.to(acc_dtype)[:, None]
    return nll, g.to(logits.dtype)


@functools.cache
def compiled_subs_rows():
    """`subs_rows` compiled once per process, on first use (importing the compiler costs about a second)."""
    return torch.compile(subs_rows, fullgraph=True, dynamic=False)


def _chunked_subs_nll(
    hidden, weight, bias, targets, token_weights, mask_id, num_tokens, chunk_rows, needs_grad, compiled
):
    """The loop behind `FusedSubsNll.forward`; `needs_grad` = (hidden, weight, bias) flags. Returns
    loss_sum, nll (M,) and the three gradients (None where not needed), all before any outer scaling."""
    M = hidden.shape[0]
    acc_dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    nll = torch.empty(M, dtype=acc_dtype, device=hidden.device)
    loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None  # (M, D)
    grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if needs_grad[1] else None  # (V, D)
    grad_bias = torch.zeros_like(bias, dtype=acc_dtype) if needs_grad[2] else None  # (V,)
    with_grad = any(needs_grad)
    kernel = compiled_subs_rows() if compiled else subs_rows
    for start in range(0, M, chunk_rows):
        stop = min(start + chunk_rows, M)
        h, y, w = hidden[start:stop], targets[start:stop], token_weights[start:stop]  # (n, D), (n,), (n,)
        n = stop - start
        if compiled and n < chunk_rows:  # one static shape for the compiled kernel: pad with rows of weight 0
            pad = chunk_rows - n
            h, y, w = F.pad(h, (0, 0, 0, pad)), F.pad(y, (0, pad)), F.pad(w, (0, pad))
        logits = F.linear(h, weight, bias)  # (C, V) in the compute dtype (bf16 under CUDA autocast)
        chunk_nll, g = kernel(logits, y, w, mask_id, with_grad, num_tokens)
        chunk_nll, w = chunk_nll[:n], w[:n]
        nll[start:stop] = chunk_nll
        loss_sum += (w * chunk_nll).sum()
        if g is None:
            continue
        g, h = g[:n], h[:n]  # drop the padding rows
        # Under autocast these matmuls run in bf16, as autograd's backward of F.linear would.
        if grad_hidden is not None:
            grad_hidden[start:stop] = g @ weight  # (n, D)
        if grad_weight is not None:
            grad_weight += (g.T @ h).to(acc_dtype)  # (V, D)
        if grad_bias is not None:
            grad_bias += g.sum(0, dtype=acc_dtype)  # (V,)
    return loss_sum, nll, grad_hidden, grad_weight, grad_bias


class FusedSubsNll(torch.autograd.Function):
    """sum_i w_i * SUBS-NLL_i of F.linear(hidden, weight, bias), with the gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, mask_id, num_tokens, chunk_rows, compiled):
        needs_grad = tuple(ctx.needs_input_grad[:3])  # (hidden, weight, bias)
        loss_sum, nll, grad_hidden, grad_weight, grad_bias = _chunked_subs_nll(
            hidden, weight, bias, targets, token_weights, mask_id, num_tokens, chunk_rows, needs_grad, compiled
        )
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(nll)
        return loss_sum, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_nll):
        grads = tuple(
            None if grad is None else (grad * grad_loss).to(dtype) for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)
        )
        return (*grads, None, None, None, None, None, None)


def fused_subs_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    mask_id: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    compiled: bool | None = None,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted SUBS loss of the rows `hidden` under the projection (weight, bias), and each row's NLL.

    hidden (M, D), weight (V', D), bias (V',) or None, targets (M,) long, token_weights (M,) (constants: they get
    no gradient) -> loss_sum, a float32 scalar sum_i w_i * nll_i, and nll (M,) float32, detached, where
    nll_i = logsumexp_{v != mask_id, v < V} logits_iv - logits_{i, target_i}. V = `num_tokens` (default V'): the
    weight's rows from V on are vocabulary padding, and get exactly zero gradient. `compiled` None means on CUDA.

    Under FSDP2 the weight is only unsharded inside the owning module's forward: call this from there
    (models/dit.py `FinalLayer`), never on `model.output_layer.linear.weight` from outside.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    compiled = hidden.is_cuda if compiled is None else compiled
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))):
        # Evaluation: no gradient work. (Inside `apply`, needs_input_grad ignores torch.no_grad, so decide here.)
        loss_sum, nll, *_ = _chunked_subs_nll(
            hidden, weight, bias, targets, token_weights, mask_id, num_tokens, chunk_rows, (False,) * 3, compiled
        )
        return loss_sum, nll
    return FusedSubsNll.apply(hidden, weight, bias, targets, token_weights, mask_id, num_tokens, chunk_rows, compiled)
