"""The DiT denoiser (DESIGN 3.1): shapes, MDLM's initialisation and size, rotary, attention mask, conditioning."""

from __future__ import annotations

import pytest
import torch

from mdlm_atat.config import MODEL_SIZES, ModelConfig
from mdlm_atat.models.dit import (
    VOCAB_TENSORS, DiT, RotaryTable, apply_rotary, count_parameters, pad_vocab, padded_size, rotary_cos_sin,
    strip_vocab_padding,
)

NUM_TOKENS = 37  # small vocabulary; the last id plays MASK


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(hidden_dim=32, num_layers=2, num_heads=2, cond_dim=16, dropout=0.0)
    fields.update(overrides)
    return ModelConfig(**fields)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off MDLM's zero init, which would otherwise make every block the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def inputs(batch: int = 2, length: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randint(0, NUM_TOKENS, (batch, length), generator=gen)
    noise_level = torch.rand(batch, generator=gen)
    return x_t, noise_level


def test_shape_dtype_and_zero_logits_at_init():
    torch.manual_seed(0)
    model = DiT(tiny_cfg(), NUM_TOKENS)
    x_t, t = inputs()
    logits = model(x_t, t)
    assert logits.shape == (2, 8, NUM_TOKENS)
    assert logits.dtype == torch.float32
    # The zero-initialised output layer makes the untrained model uniform: initial loss (1 - eps) ln V.
    assert torch.equal(logits, torch.zeros_like(logits))


def test_small_preset_has_mdlm_parameter_count():
    hidden, layers, heads = MODEL_SIZES["small"]
    with torch.device("meta"):
        model = DiT(ModelConfig(hidden_dim=hidden, num_layers=layers, num_heads=heads, cond_dim=128,
                                pad_vocab_multiple=1), 50258)
        padded = DiT(ModelConfig(hidden_dim=hidden, num_layers=layers, num_heads=heads, cond_dim=128), 50258)
    # MDLM-small with untied embeddings (DESIGN 3.1): 169,627,218 by hand.
    assert count_parameters(model) == 169_627_218
    assert abs(count_parameters(model) - 169.6e6) <= 0.1e6
    # The default pads GPT-2's 50,258 rows to 50,304 (nanoGPT's size): 46 more rows of embedding, weight and bias.
    assert (padded.num_tokens, padded.padded_tokens) == (50258, 50304)
    assert count_parameters(padded) == 169_627_218 + 46 * (2 * hidden + 1)


@pytest.mark.parametrize("size", ["tiny", "medium"])
def test_other_presets_build_on_meta(size):
    hidden, layers, heads = MODEL_SIZES[size]
    with torch.device("meta"):
        model = DiT(ModelConfig(hidden_dim=hidden, num_layers=layers, num_heads=heads), 50258)
    assert len(model.blocks) == layers
    assert count_parameters(model) > 0


def test_meta_build_then_init_weights_matches_mdlm_init():
    with torch.device("meta"):
        model = DiT(tiny_cfg(), NUM_TOKENS)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.output_layer.linear.weight, torch.zeros_like(model.output_layer.linear.weight))
    assert model.vocab_embed.embedding.std() > 0
    logits = model(*inputs())
    assert torch.equal(logits, torch.zeros_like(logits))
    cos, sin = rotary_cos_sin(model.rotary.max_len, model.head_dim)
    assert torch.equal(model.rotary.cos, cos) and torch.equal(model.rotary.sin, sin)  # refilled after to_empty


def test_rotary_table_is_the_computed_angles_and_not_in_the_state_dict():
    table = RotaryTable(head_dim=16, max_len=64)
    for length in (1, 7, 64):
        got, want = table(length, torch.device("cpu")), rotary_cos_sin(length, 16)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    longer = table(100, torch.device("cpu"))  # past the table: computed on the call
    assert all(torch.equal(g, w) for g, w in zip(longer, rotary_cos_sin(100, 16)))
    cast = RotaryTable(head_dim=16, max_len=512).to(torch.bfloat16)  # a cast table is not used: positions > 256
    assert all(torch.equal(g, w) for g, w in zip(cast(300, torch.device("cpu")), rotary_cos_sin(300, 16)))
    model = DiT(tiny_cfg(), NUM_TOKENS)
    assert not any("rotary" in key for key in model.state_dict())  # MDLM's state dicts load key for key


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim, shift = 16, 37
    cos, sin = rotary_cos_sin(128, head_dim)
    q, k = torch.randn(1, 1, head_dim), torch.randn(1, 1, head_dim)  # (L=1, H=1, hd)

    def rot(x, pos):
        return apply_rotary(x, cos[pos : pos + 1], sin[pos : pos + 1])

    for m, n in [(0, 5), (3, 3), (40, 2)]:
        score = (rot(q, m) * rot(k, n)).sum()
        shifted = (rot(q, m + shift) * rot(k, n + shift)).sum()
        torch.testing.assert_close(score, shifted, rtol=1e-5, atol=1e-5)
    # ... and does depend on it (the rotation is not trivial), and it preserves norms.
    assert not torch.allclose((rot(q, 0) * rot(k, 5)).sum(), (rot(q, 0) * rot(k, 6)).sum())
    torch.testing.assert_close(rot(q, 50).norm(), q.norm())


@pytest.mark.parametrize("causal", [False, True])
def test_attention_sees_the_future_only_when_not_causal(causal):
    torch.manual_seed(0)
    model = randomise(DiT(tiny_cfg(), NUM_TOKENS, causal=causal)).eval()
    x_t, t = inputs(batch=1, length=6)
    changed = x_t.clone()
    changed[0, -1] = (changed[0, -1] + 1) % NUM_TOKENS
    first, second = model(x_t, t), model(changed, t)
    moved = not torch.allclose(first[:, 0], second[:, 0])
    assert moved == (not causal)
    assert not torch.allclose(first[:, -1], second[:, -1])


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_noise_level_is_used_only_with_time_conditioning(time_conditioning):
    torch.manual_seed(0)
    model = randomise(DiT(tiny_cfg(time_conditioning=time_conditioning), NUM_TOKENS)).eval()
    x_t, _ = inputs(batch=2)
    low, high = model(x_t, torch.full((2,), 0.1)), model(x_t, torch.full((2,), 2.0))
    assert torch.allclose(low, high) == (not time_conditioning)


def test_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = randomise(DiT(tiny_cfg(), NUM_TOKENS)).eval()
    x_t, t = inputs()
    reference = model(x_t, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x_t, t)
    assert logits.dtype == torch.bfloat16  # the caller upcasts
    assert torch.isfinite(logits.float()).all()
    relative_error = (logits.float() - reference).norm() / reference.norm()
    assert relative_error < 0.05


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    model = randomise(DiT(tiny_cfg(dropout=0.5), NUM_TOKENS))
    x_t, t = inputs()
    model.train()
    assert not torch.allclose(model(x_t, t), model(x_t, t))
    model.eval()
    assert torch.equal(model(x_t, t), model(x_t, t))


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = randomise(DiT(tiny_cfg(), NUM_TOKENS)).eval()
    explanation = torch._dynamo.explain(model)(*inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_gate_init_opens_the_blocks_and_zero_is_mdlms_identity():
    torch.manual_seed(0)
    x_t, noise = torch.randint(0, 20, (2, 8)), torch.zeros(2)
    closed = DiT(ModelConfig(hidden_dim=16, num_layers=2, num_heads=2, cond_dim=8), 21)
    opened = DiT(ModelConfig(hidden_dim=16, num_layers=2, num_heads=2, cond_dim=8, gate_init=1.0), 21)
    opened.load_state_dict(closed.state_dict() | {k: v for k, v in opened.state_dict().items() if "adaLN" in k})
    embedded = closed.vocab_embed(x_t)
    assert torch.equal(closed.trunk(x_t, noise)[0], embedded)  # adaLN-zero: every block is the identity
    assert not torch.allclose(opened.trunk(x_t, noise)[0], embedded)
    bias = opened.blocks[0].adaLN_modulation.bias.view(6, -1)
    assert torch.all(bias[[2, 5]] == 1) and torch.all(bias[[0, 1, 3, 4]] == 0)


# ----------------------------------------------------------------------------------------------------------
# Vocabulary padding (model.pad_vocab_multiple): padding rows that are never a token


def test_padded_sizes():
    assert [padded_size(n, 64) for n in (1, 37, 64, 65, 50258)] == [64, 64, 64, 128, 50304]
    assert padded_size(50258, 1) == 50258 and padded_size(37, 8) == 40


def test_padded_model_starts_as_the_unpadded_one_from_the_same_seed():
    """Only the real rows draw random numbers: the same weights, and the RNG left in the same state (what the run
    builds next, the estimator, starts alike too). The padding rows start at zero."""
    torch.manual_seed(0)
    plain = DiT(tiny_cfg(pad_vocab_multiple=1), NUM_TOKENS)
    after_plain = torch.rand(8)
    torch.manual_seed(0)
    padded = DiT(tiny_cfg(), NUM_TOKENS)  # the default multiple, 64
    after_padded = torch.rand(8)
    assert (plain.num_tokens, plain.padded_tokens, padded.num_tokens, padded.padded_tokens) == (37, 37, 37, 64)
    assert torch.equal(after_plain, after_padded)
    assert padded.vocab_embed.embedding.shape == (64, 32) and padded.output_layer.linear.weight.shape == (64, 32)
    plain_state, padded_state = plain.state_dict(), padded.state_dict()
    assert strip_vocab_padding(padded_state, NUM_TOKENS).keys() == plain_state.keys()
    for name, value in strip_vocab_padding(padded_state, NUM_TOKENS).items():
        assert torch.equal(value, plain_state[name]), name
    for name in VOCAB_TENSORS:
        assert not padded_state[name][NUM_TOKENS:].any(), name
    # and so after a meta build, to_empty and init_weights
    with torch.device("meta"):
        meta = DiT(tiny_cfg(), NUM_TOKENS)
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert not meta.vocab_embed.embedding[NUM_TOKENS:].any() and meta.vocab_embed.embedding[:NUM_TOKENS].std() > 0


def padded_copy(plain: DiT, multiple: int = 64) -> DiT:
    """`plain` (unpadded) with padding rows added, filled with garbage: random embedding and output weights and an
    output bias of 1e4, so the padding columns' logits dwarf every real one. None of it may matter."""
    cfg = tiny_cfg(pad_vocab_multiple=multiple, time_conditioning=plain.time_conditioning)
    padded = DiT(cfg, plain.num_tokens, causal=plain.causal).train(plain.training)
    padded.load_state_dict(pad_vocab(plain.state_dict(), plain.num_tokens, padded.padded_tokens))
    gen = torch.Generator().manual_seed(123)
    n = plain.num_tokens
    with torch.no_grad():
        for p in (padded.vocab_embed.embedding, padded.output_layer.linear.weight):
            p[n:] = torch.randn(p[n:].shape, generator=gen)
        padded.output_layer.linear.bias[n:] = 1e4
    return padded


def test_padded_model_computes_the_unpadded_logits():
    plain = randomise(DiT(tiny_cfg(pad_vocab_multiple=1), NUM_TOKENS)).eval()
    padded = padded_copy(plain).eval()
    x_t, t = inputs(batch=3, length=12)
    rows = torch.rand(3, 12, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        expected = plain(x_t, t)
        logits = padded(x_t, t)
        assert logits.shape == (3, 12, NUM_TOKENS)  # the real columns only
        # The same function; a GEMM with another N may round differently, so tight, not bitwise.
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(padded(x_t, t, rows=rows), expected[rows], rtol=1e-6, atol=1e-6)
        features = padded.features(x_t, t)
        torch.testing.assert_close(features, plain.features(x_t, t), rtol=0, atol=0)  # no vocabulary in between
        assert padded.project(features).shape == (3, 12, NUM_TOKENS)
        torch.testing.assert_close(padded.project(features), expected, rtol=1e-6, atol=1e-6)


def test_strip_and_pad_vocab_round_trip():
    torch.manual_seed(0)
    padded = DiT(tiny_cfg(pad_vocab_multiple=16), NUM_TOKENS)  # 48 rows, the padding zero
    state = padded.state_dict()
    stripped = strip_vocab_padding(state, NUM_TOKENS)
    assert {name: stripped[name].shape[0] for name in VOCAB_TENSORS} == dict.fromkeys(VOCAB_TENSORS, NUM_TOKENS)
    again = pad_vocab(stripped, NUM_TOKENS, padded.padded_tokens)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    # A tensor of another length (another vocabulary) is left for load_state_dict to refuse.
    wrong = pad_vocab(strip_vocab_padding(state, NUM_TOKENS - 1), NUM_TOKENS, padded.padded_tokens)
    with pytest.raises(RuntimeError, match="size mismatch"):
        padded.load_state_dict(wrong)
