"""The fused, chunked SUBS loss (diffusion/fused_loss.py) against the plain path: values and gradients, the DiT and
the objective on both paths, the compiled DiT's graph, and on CUDA the compiled kernel and its peak memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdlm_atat.config import ModelConfig
from mdlm_atat.diffusion import fused_loss
from mdlm_atat.diffusion.fused_loss import fused_subs_nll, subs_rows
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective, masked_token_nll
from mdlm_atat.diffusion.schedule import LogLinearSchedule
from mdlm_atat.models.dit import VOCAB_TENSORS, DiT

from test_dit import padded_copy

EPS = 1e-3
M, D, V = 23, 8, 31  # rows, width, vocabulary including MASK
MASK_ID = 5  # not the last id: nothing may assume where MASK sits


def problem(num_rows=M, dtype=torch.float64, bias=True, dims=(D, V), mask_id=MASK_ID, device="cpu", seed=0):
    """(hidden, weight, bias) requiring grad, then targets (never MASK) and token weights of the size of 1/t."""
    (d, v), gen = dims, torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, d, generator=gen, dtype=dtype).to(device).requires_grad_()
    weight = (torch.randn(v, d, generator=gen, dtype=dtype) / d**0.5).to(device).requires_grad_()
    b = torch.randn(v, generator=gen, dtype=dtype).to(device).requires_grad_() if bias else None
    targets = torch.randint(0, v - 1, (num_rows,), generator=gen)
    targets = (targets + (targets >= mask_id).long()).to(device)  # skip the MASK id
    token_weights = (1 / torch.rand(num_rows, generator=gen).clamp_min(0.05)).to(device)
    return (hidden, weight, b), targets, token_weights


def plain_subs_nll(hidden, weight, bias, targets, token_weights, mask_id=MASK_ID):
    """`masked_token_nll`'s formula on the whole (M, V) logits, in at least float32 (float64 stays float64)."""
    logits = F.linear(hidden, weight, bias)  # (M, V)
    rows = logits.to(torch.promote_types(logits.dtype, torch.float32)).clone()
    rows[:, mask_id] = float("-inf")
    nll = torch.logsumexp(rows, -1) - rows.gather(-1, targets[:, None]).squeeze(-1)  # (M,)
    return (token_weights * nll).sum(), nll


def grads_of(loss, params):
    """d loss / d each of params (None stays None)."""
    present = [p for p in params if p is not None]
    found = iter(torch.autograd.grad(loss, present))
    return [None if p is None else next(found) for p in params]


def assert_all_close(actual, expected, **tolerance):
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, **tolerance)


# ----------------------------------------------------------------------------------------------------------
# The function


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 4096])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_autograd_of_the_plain_formula_float64(chunk_rows, bias):
    params, targets, w = problem(bias=bias)
    loss, nll = fused_subs_nll(*params, targets, w, MASK_ID, chunk_rows=chunk_rows)
    ref_loss, ref_nll = plain_subs_nll(*params, targets, w)
    assert loss.dtype == nll.dtype == torch.float64 and nll.shape == (M,)
    assert not nll.requires_grad  # detached: only loss_sum carries a graph
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
    # A non-unit incoming gradient, as loss_sum / num_tokens sends.
    assert_all_close(grads_of(loss / 7.0, params), grads_of(ref_loss / 7.0, params), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_rows", [1, 7, 4096])
def test_float32_matches_masked_token_nll(chunk_rows):
    """The objective's own function on the (M, V) logits, weighted and summed, is what the fused loss computes."""
    params, targets, w = problem(dtype=torch.float32)
    loss, nll = fused_subs_nll(*params, targets, w, MASK_ID, chunk_rows=chunk_rows)
    masked = torch.ones(1, M, dtype=torch.bool)
    ref_nll = masked_token_nll(F.linear(*params), targets[None], masked, MASK_ID)[0]  # (M,)
    ref_loss = (w * ref_nll).sum()
    assert loss.dtype == nll.dtype == torch.float32
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert_all_close(grads_of(loss, params), grads_of(ref_loss, params), rtol=1e-5, atol=1e-5)


def test_no_rows_give_zero_loss_and_zero_gradients():
    params, targets, w = problem(num_rows=0)
    loss, nll = fused_subs_nll(*params, targets, w, MASK_ID)
    assert loss.item() == 0.0 and nll.shape == (0,)
    hidden_grad, weight_grad, bias_grad = grads_of(loss, params)
    assert hidden_grad.shape == (0, D)
    assert torch.all(weight_grad == 0) and torch.all(bias_grad == 0)


def test_mask_column_never_gets_probability():
    """SUBS: even when MASK has by far the largest logit, it takes no probability and receives no gradient."""
    params, targets, w = problem(dtype=torch.float32)
    with torch.no_grad():
        params[2][MASK_ID] = 100.0  # the MASK logit dominates every row
    nll, g = subs_rows(F.linear(*params), targets, w, MASK_ID, with_grad=True)
    assert torch.all(g[:, MASK_ID] == 0)
    assert torch.isfinite(nll).all() and nll.max() < 20  # as if the MASK column were not there
    loss, _ = fused_subs_nll(*params, targets, w, MASK_ID, chunk_rows=4)
    _, weight_grad, bias_grad = grads_of(loss, params)
    assert torch.all(weight_grad[MASK_ID] == 0) and bias_grad[MASK_ID] == 0
    # Each row's gradient w (softmax - onehot) sums to 0 over the real tokens.
    torch.testing.assert_close(g.sum(-1), torch.zeros(M), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [5, 4096])
@pytest.mark.parametrize("compiled", [False, True])
def test_padding_columns_are_excluded_and_get_no_gradient(monkeypatch, chunk_rows, compiled):
    """The DiT's output layer may hold padding rows past num_tokens (models/dit.py): with num_tokens given, the loss
    is the unpadded one, however large the padding logits, and the padding rows' gradient is exactly 0."""
    monkeypatch.setattr(fused_loss, "compiled_subs_rows", lambda: subs_rows)  # the compiled path, eager kernel
    (hidden, weight, bias), targets, w = problem()
    gen, extra = torch.Generator().manual_seed(7), 64 - V
    padded_weight = torch.cat([weight.detach(), torch.randn(extra, D, generator=gen, dtype=weight.dtype)])
    padded_bias = torch.cat([bias.detach(), torch.full((extra,), 1e4, dtype=bias.dtype)])  # dominating logits
    padded = [hidden, padded_weight.requires_grad_(), padded_bias.requires_grad_()]
    loss, nll = fused_subs_nll(*padded, targets, w, MASK_ID, chunk_rows=chunk_rows, compiled=compiled, num_tokens=V)
    ref_loss, ref_nll = plain_subs_nll(hidden, weight, bias, targets, w)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
    (hidden_grad, weight_grad, bias_grad), ref_grads = grads_of(loss, padded), grads_of(ref_loss, [hidden, weight, bias])
    assert_all_close([hidden_grad, weight_grad[:V], bias_grad[:V]], ref_grads, rtol=1e-10, atol=1e-12)
    assert not weight_grad[V:].any() and not bias_grad[V:].any()
    # Without num_tokens the padding columns would take every row's probability: the test's padding is not inert.
    assert fused_subs_nll(*padded, targets, w, MASK_ID, chunk_rows=chunk_rows)[1].min() > 1e3


def test_no_grad_returns_the_same_values_without_a_graph():
    params, targets, w = problem()
    loss, nll = fused_subs_nll(*params, targets, w, MASK_ID, chunk_rows=5)
    with torch.no_grad():
        loss_eval, nll_eval = fused_subs_nll(*params, targets, w, MASK_ID, chunk_rows=5)
    assert not loss_eval.requires_grad
    assert torch.equal(loss_eval, loss.detach()) and torch.equal(nll_eval, nll)
    frozen = [p.detach() for p in params]  # grad on but nothing requires it: the same no-gradient path
    assert not fused_subs_nll(*frozen, targets, w, MASK_ID)[0].requires_grad


def test_only_the_gradients_asked_for_are_computed():
    (hidden, weight, bias), targets, w = problem()
    weight.requires_grad_(False)
    loss, _ = fused_subs_nll(hidden, weight, bias, targets, w, MASK_ID, chunk_rows=5)
    loss.backward()
    ref_hidden, ref_bias = grads_of(plain_subs_nll(hidden, weight, bias, targets, w)[0], [hidden, bias])
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, ref_hidden, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bias.grad, ref_bias, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask_id", [0, MASK_ID])
def test_padded_last_chunk_of_the_compiled_path(monkeypatch, mask_id):
    """The compiled path pads the last chunk with weight-0 rows (target 0, which may be MASK) so that the kernel
    sees one shape; checked here with the eager kernel standing in for the compiled one."""
    calls = []

    def eager_kernel(logits, *args):
        calls.append(logits.shape[0])
        return subs_rows(logits, *args)

    monkeypatch.setattr(fused_loss, "compiled_subs_rows", lambda: eager_kernel)
    params, targets, w = problem(mask_id=mask_id)
    loss, nll = fused_subs_nll(*params, targets, w, mask_id, chunk_rows=10, compiled=True)
    assert calls == [10, 10, 10]  # 23 rows: 10 + 10 + 3 padded to 10
    ref_loss, ref_nll = plain_subs_nll(*params, targets, w, mask_id)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
    assert_all_close(grads_of(loss, params), grads_of(ref_loss, params), rtol=1e-10, atol=1e-12)


def test_bf16_autocast_matches_the_plain_path_within_bf16_tolerance():
    """Under autocast the logits and g are bf16 (as autograd's would be); the log-sum-exp stays float32."""
    params, targets, w = problem(num_rows=64, dtype=torch.float32, dims=(32, 300))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, nll = fused_subs_nll(*params, targets, w, MASK_ID, chunk_rows=16)
        ref_loss, ref_nll = plain_subs_nll(*params, targets, w)
        fused_grads, ref_grads = grads_of(loss, params), grads_of(ref_loss, params)
    assert loss.dtype == nll.dtype == torch.float32
    assert [g.dtype for g in fused_grads] == [torch.float32] * 3  # each parameter's own dtype
    # A chunk's bf16 logits may round differently from the whole matrix's (another kernel): 1 ulp is ~4e-3.
    torch.testing.assert_close(nll, ref_nll, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=0)
    for fused, ref in zip(fused_grads, ref_grads):
        assert ((fused - ref).norm() / ref.norm()).item() < 1e-2  # bf16: ~4e-3 per rounding


# ----------------------------------------------------------------------------------------------------------
# The DiT and the objective


def tiny_dit(num_tokens: int, pad_vocab_multiple: int = 64) -> DiT:
    """A 2-layer DiT with every parameter moved off MDLM's zero init (else the logits are all 0); the default
    padding (64 rows) filled with random numbers too, which the loss must ignore."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_dim=32, num_layers=2, num_heads=2, cond_dim=16, dropout=0.0,
                      pad_vocab_multiple=pad_vocab_multiple)
    model = DiT(cfg, num_tokens)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("adaptive", [False, True])
def test_objective_fused_equals_unfused(adaptive):
    """Loss, per-token terms and every parameter's gradient agree; with adaptive masking the weight is (B, L)."""
    V = 40
    model = tiny_dit(V + 1)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, V, (4, 24), generator=gen)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    noise = torch.rand(4, 24, generator=gen)
    real = torch.ones(4, 24, dtype=torch.bool)
    real[1, 20:] = False  # padding: never masked, not counted
    mask_probs = (t[:, None] * torch.exp(0.3 * torch.randn(4, 24, generator=gen))).clamp(0.01, 1) if adaptive else None
    results = {}
    for name, kwargs in {"rows": dict(rows_only=True), "fused": dict(fused=True)}.items():
        objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V, **kwargs)
        terms = objective(model, x0, t=t, attention_mask=real, uniform_noise=noise, mask_probs=mask_probs)
        results[name] = terms, torch.autograd.grad(terms.loss, list(model.parameters()))
    (rows, rows_grads), (fused, fused_grads) = results["rows"], results["fused"]
    assert fused.weight.shape == ((4, 24) if adaptive else (4, 1))
    assert rows.num_masked == fused.num_masked > 0 and torch.equal(rows.masked, fused.masked)
    for field in ("loss", "nll_sum", "token_loss", "token_nll"):
        torch.testing.assert_close(getattr(fused, field), getattr(rows, field).detach(), rtol=1e-5, atol=1e-6)
    assert not fused.token_loss.requires_grad and not fused.token_nll.requires_grad
    assert torch.all(fused.token_loss[~fused.masked] == 0)
    torch.testing.assert_close(fused.sequence_loss, rows.sequence_loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, _), a, e in zip(model.named_parameters(), fused_grads, rows_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("path", ["logits", "rows", "fused"])
def test_padded_dit_gives_the_unpadded_loss_and_gradients(path):
    """The same weights with and without padding rows (garbage in them, the padding logits 1e4): the same loss and
    per-token terms, the same gradients on every real row, and exactly zero gradient on the padding rows of the
    embedding and the output layer, on each of the objective's three paths."""
    V = 40
    plain = tiny_dit(V + 1, pad_vocab_multiple=1)
    padded = padded_copy(plain)  # 64 rows
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, V, (4, 24), generator=gen)
    t, noise = torch.tensor([0.1, 0.4, 0.7, 1.0]), torch.rand(4, 24, generator=gen)
    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=V, rows_only=path == "rows",
                                         fused=path == "fused")

    def loss_and_grads(model):
        terms = objective(model, x0, t=t, uniform_noise=noise)
        names, params = zip(*model.named_parameters())
        return terms, dict(zip(names, torch.autograd.grad(terms.loss, params)))

    (plain_terms, plain_grads), (padded_terms, padded_grads) = loss_and_grads(plain), loss_and_grads(padded)
    assert torch.equal(plain_terms.masked, padded_terms.masked) and plain_terms.num_masked > 0
    for field in ("loss", "token_nll", "token_loss"):
        torch.testing.assert_close(getattr(padded_terms, field), getattr(plain_terms, field), rtol=1e-6, atol=1e-6)
    for name, grad in padded_grads.items():
        real = grad[: V + 1] if name in VOCAB_TENSORS else grad
        torch.testing.assert_close(real, plain_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        if name in VOCAB_TENSORS:
            assert not grad[V + 1 :].any(), name


def test_dit_project_callback_gets_the_rows_and_the_output_layer():
    model = tiny_dit(11)
    x_t, noise = torch.randint(0, 10, (2, 8)), torch.rand(2)
    rows = torch.zeros(2, 8, dtype=torch.bool)
    rows[0, :3] = rows[1, 5] = True
    seen = model(x_t, noise, rows=rows, project=lambda h, w, b, n: (h, w, b, n))
    assert seen[0].shape == (4, 32) and seen[1] is model.output_layer.linear.weight
    assert seen[2] is model.output_layer.linear.bias
    assert seen[3] == 11 and seen[1].shape[0] == model.padded_tokens == 64  # the real columns, and the padded rows
    logits = torch.nn.functional.linear(*seen[:3])  # (4, 64): the callback projects the padding rows too
    torch.testing.assert_close(logits[:, :11], model(x_t, noise, rows=rows))
    with pytest.raises(ValueError, match="needs rows"):
        model(x_t, noise, project=lambda h, w, b, n: None)


def test_compiled_dit_keeps_the_blocks_in_one_graph_with_one_break():
    """The fused call is `torch.compiler.disable`d: one graph break, at the output layer; the blocks are one graph."""
    torch._dynamo.reset()
    model = tiny_dit(11).eval()
    gen = torch.Generator().manual_seed(0)
    x_t, noise = torch.randint(0, 10, (2, 8), generator=gen), torch.rand(2, generator=gen)
    rows = torch.rand(2, 8, generator=gen) < 0.5
    num_rows = int(rows.sum())
    targets, weights = torch.randint(0, 10, (num_rows,), generator=gen), torch.ones(num_rows)
    explanation = torch._dynamo.explain(model)(
        x_t, noise, rows, project=lambda h, w, b, n: fused_subs_nll(h, w, b, targets, weights, 10, num_tokens=n)
    )
    assert explanation.graph_break_count == 1, explanation.break_reasons
    assert all("disable" in reason.reason for reason in explanation.break_reasons)
    # The DiT's graph holds every block; the output layer's norm and adaLN make at most a second, small one.
    blocks_graph, *rest = explanation.graphs
    attention = [node for node in blocks_graph.graph.nodes if "scaled_dot_product_attention" in str(node.target)]
    assert len(attention) == len(model.blocks)
    assert len(rest) <= 1 and all(len(graph.graph.nodes) < 30 for graph in rest)


# ----------------------------------------------------------------------------------------------------------
# CUDA: the compiled kernel and its memory


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_compiled_cuda_kernel_matches_the_eager_plain_path(precision):
    """GPT-2's vocabulary, a ragged last chunk: the compiled kernel against autograd on the whole (M, V) logits."""
    params, targets, w = problem(num_rows=2500, dtype=torch.float32, dims=(256, 50258), device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        loss, nll = fused_subs_nll(*params, targets, w, MASK_ID, chunk_rows=1024)  # compiled: on CUDA
        fused_grads = grads_of(loss, params)
        ref_loss, ref_nll = plain_subs_nll(*params, targets, w)
        ref_grads = grads_of(ref_loss, params)
    # bf16 logits of one chunk and of the whole matrix may round differently (other cuBLAS kernels).
    tolerance = 2e-2 if precision == "bf16" else 1e-5
    assert rel_error(loss, ref_loss) < tolerance / 10
    assert rel_error(nll, ref_nll) < tolerance
    for fused, ref in zip(fused_grads, ref_grads):
        assert fused.dtype == torch.float32 and rel_error(fused, ref) < tolerance


@pytest.mark.gpu
@requires_cuda
def test_fused_peak_memory_is_below_the_plain_paths():
    """MDLM-small's masked rows at batch 32 x 1024: M = 16384, V = 50258, D = 768, bf16 autocast, forward+backward."""
    params, targets, w = problem(num_rows=16384, dtype=torch.float32, dims=(768, 50258), device="cuda")

    def peak_extra_gib(loss_fn) -> float:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_fn(*params, targets, w)
        loss.backward()
        torch.cuda.synchronize()
        for p in params:
            p.grad = None
        return (torch.cuda.max_memory_allocated() - base) / 2**30

    def fused(*args):
        return fused_subs_nll(*args, MASK_ID)

    peak_extra_gib(fused)  # compile first
    fused_gib, plain_gib = peak_extra_gib(fused), peak_extra_gib(plain_subs_nll)
    print(f"peak above inputs: fused {fused_gib:.2f} GiB, plain {plain_gib:.2f} GiB")
    assert fused_gib < plain_gib / 3
