"""CUDA paths: bf16 autocast against fp32, init loss on the GPU, torch.compile, `atat train` end to end.

Every test needs a CUDA device and is skipped without one, so this file is collected (and skipped) on CPU CI.
Tolerances: bf16 keeps 8 mantissa bits, about 4e-3 relative per rounding; the tiny DiT below lands near 5e-3
against fp32 (measured with CPU bf16 autocast), so 2e-2 leaves a factor of about 4.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import CONFIG_DIR

from mdlm_atat.config import ModelConfig, load_config
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective, mask_draws
from mdlm_atat.diffusion.schedule import LogLinearSchedule
from mdlm_atat.models.dit import DiT, DiTBlock, FinalLayer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB_SIZE = 1000  # real tokens; MASK is id VOCAB_SIZE
EPS = 1e-3
BF16_RTOL = 2e-2


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 on the CPU."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def make_objective() -> MaskedDiffusionObjective:
    return MaskedDiffusionObjective(LogLinearSchedule(EPS), mask_id=VOCAB_SIZE)


def tiny_dit(seed: int = 0) -> DiT:
    """A 2-layer DiT on the CPU whose zero-initialised layers (adaLN, output) are moved off zero.

    At MDLM's init the logits are exactly 0 whatever the blocks compute, which would make any comparison of
    logits vacuous; N(0, 0.1) gives logits of standard deviation about 0.8.
    """
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_dim=64, num_layers=2, num_heads=2, cond_dim=32, dropout=0.0, time_conditioning=True)
    model = DiT(cfg, VOCAB_SIZE + 1)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (DiTBlock, FinalLayer)):
                layers = [module.adaLN_modulation] + ([module.linear] if isinstance(module, FinalLayer) else [])
                for linear in layers:
                    for p in (linear.weight, linear.bias):
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def batch(num_sequences: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 (B, L), t (B,), uniform noise (B, L), drawn on the CPU so that every device sees the same batch."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, VOCAB_SIZE, (num_sequences, seq_len), generator=gen)
    t = make_objective().sample_t(num_sequences, "cpu", gen)
    noise = torch.rand(num_sequences, seq_len, generator=gen)
    return x0, t, noise


def bf16():
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def test_bf16_autocast_on_cuda_matches_fp32_on_cpu():
    objective = make_objective()
    cpu_model = tiny_dit().eval()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    x0, t, noise = batch(8, 128)
    x_t, _ = objective.corrupt(x0, t, uniform_noise=noise)
    sigma = objective.schedule.total_noise(t)

    with torch.no_grad():
        logits_ref = cpu_model(x_t, sigma)  # (B, L, V) fp32
        loss_ref = objective(cpu_model, x0, t=t, uniform_noise=noise).loss
        with bf16():
            logits = cuda_model(x_t.cuda(), sigma.cuda())
            loss = objective(cuda_model, x0.cuda(), t=t.cuda(), uniform_noise=noise.cuda()).loss

    assert logits.dtype == torch.bfloat16  # autocast did apply
    assert logits_ref.std() > 0.3  # the comparison is not between two near-zero tensors
    assert rel_error(logits, logits_ref) < BF16_RTOL
    assert math.isfinite(loss.item())
    assert rel_error(loss, loss_ref) < BF16_RTOL


def test_untrained_loss_on_cuda_is_uniform_over_the_vocabulary():
    """MDLM's zero output layer makes p uniform over the V real tokens: -log p = ln V at every masked token.

    The Monte Carlo loss then has expectation (1 - eps) ln V for any t. Its spread comes from how many tokens
    are masked at small t (weight 1 / t): simulated over 200 seeds, the relative standard deviation is 1.4% at
    256 x 128 tokens (40% of seeds miss 1%) and 0.23% at 1024 x 1024 (none missed), hence the size below.
    """
    torch.manual_seed(0)
    model = DiT(ModelConfig(hidden_dim=64, num_layers=2, num_heads=2, cond_dim=32, dropout=0.0), VOCAB_SIZE + 1)
    model = model.cuda().eval()
    objective = make_objective()
    x0, t, noise = (tensor.cuda() for tensor in batch(1024, 1024, seed=1))
    with torch.no_grad(), bf16():
        terms = objective(model, x0, t=t, uniform_noise=noise)

    ln_v = math.log(VOCAB_SIZE)
    masked = terms.token_loss > 0
    assert masked.sum() == terms.num_masked
    # Exact: each masked token costs weight * ln V, whatever precision the logits were computed in.
    per_token_nll = terms.token_loss[masked] * t[:, None].expand_as(masked)[masked]  # undo the 1 / t weight
    torch.testing.assert_close(per_token_nll, torch.full_like(per_token_nll, ln_v), rtol=1e-5, atol=0)
    # Statistical: the NELBO estimate over about a million tokens.
    assert terms.loss.item() == pytest.approx((1 - EPS) * ln_v, rel=1e-2)


def test_compiled_dit_matches_eager_forward_and_backward():
    objective = make_objective()
    eager = tiny_dit().cuda()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module)
    x0, t, noise = (tensor.cuda() for tensor in batch(8, 128, seed=2))

    def loss_logits_grads(model, params):
        with bf16():
            x_t, _ = objective.corrupt(x0, t, uniform_noise=noise)
            logits = model(x_t, objective.schedule.total_noise(t))
            loss = objective(model, x0, t=t, uniform_noise=noise).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in params])
        return loss.detach(), logits.detach(), grads

    loss_e, logits_e, grads_e = loss_logits_grads(eager, list(eager.parameters()))
    loss_c, logits_c, grads_c = loss_logits_grads(compiled, list(compiled_module.parameters()))

    assert torch.isfinite(grads_c).all()
    assert grads_e.norm() > 0
    assert rel_error(logits_c, logits_e) < BF16_RTOL
    assert rel_error(loss_c, loss_e) < BF16_RTOL
    assert rel_error(grads_c, grads_e) < BF16_RTOL


@pytest.mark.parametrize("compile_model", [False, True])
def test_atat_train_end_to_end_on_cuda(tmp_path, compile_model):
    from mdlm_atat.train.checkpoint import load_checkpoint
    from mdlm_atat.train.trainer import train

    cfg = load_config(
        CONFIG_DIR / "quickstart.yaml",
        [
            "training.device=cuda",
            "training.mixed_precision=bf16",
            "training.total_steps=20",
            "training.warmup_steps=2",
            "training.log_every_n_steps=10",
            "training.eval_every_n_steps=10",
            "training.save_every_n_steps=10",
            "training.eval_batches=2",
            f"training.compile={str(compile_model).lower()}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    run_dir = tmp_path / "run"
    summary = train(cfg, run_dir)

    assert summary["step"] == 20
    assert math.isfinite(summary["last_loss"])
    assert summary["val"] is not None and math.isfinite(summary["val"]["nelbo"])
    payload = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert not any(key.startswith("_orig_mod.") for key in payload["model"])  # the unwrapped module is saved
    if compile_model:  # `atat eval --compile` scores what the plain evaluation scores, within bf16 rounding
        from mdlm_atat.eval.run import evaluate_checkpoint

        plain, compiled = (evaluate_checkpoint(run_dir, max_batches=2, device="cuda", progress=False, compile=c)
                           for c in (False, True))
        assert abs(compiled["nelbo"] - plain["nelbo"]) < BF16_RTOL * plain["nelbo"]


def test_cuda_mask_draws_resolve_below_float32_spacing():
    """Issue D3 on CUDA's generator: float64 uniforms there must not be multiples of 2^-24 (or of 2^-32)."""
    u = mask_draws((1 << 20,), "cuda", torch.Generator("cuda").manual_seed(0)).cpu()
    assert u.dtype == torch.float64
    assert ((u * 2**32) % 1 != 0).double().mean().item() > 0.99
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
