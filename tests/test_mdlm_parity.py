"""Parity with MDLM's own code (issue 14): the DiT, the loss, the sampler's step, the EMA and the validation bound.

The oracle is kuleshov-group/mdlm at c112c52, in ../shared/reference/mdlm (tests/mdlm_reference.py loads it:
`dit.py`, `noise_schedule.py` and `ema.py` imported as they are, `diffusion.py`'s methods lifted with `ast`).
CPU, fp32 (float64 for the sampler's probabilities), tiny sizes.

Tolerances: bit equality where both sides do the same arithmetic in the same order (EMA, masks, noise levels,
parameter counts). Elsewhere the two sides compute the same function with different fp32 kernels: LayerNorm with
its weight fused vs applied after (dit.py:134-136), a MASK logit of -inf vs + -1e6 (diffusion.py:263), the
weight 1/t vs dsigma / expm1(sigma) (diffusion.py:893-894). Those agree to a few float32 ulps: rtol 1e-5 with a
small atol, which a real difference (a wrong weight, mask, or layer) exceeds by orders of magnitude.
"""

from __future__ import annotations

import math

import pytest
import torch

import mdlm_reference as ref

if (_why := ref.missing()) is not None:
    pytest.skip(_why, allow_module_level=True)

from mdlm_atat.config import MODEL_SIZES, ModelConfig  # noqa: E402
from mdlm_atat.data.store import pack_documents  # noqa: E402
from mdlm_atat.diffusion import samplers  # noqa: E402
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective  # noqa: E402
from mdlm_atat.diffusion.schedule import LogLinearSchedule  # noqa: E402
from mdlm_atat.eval.likelihood import evaluate_bound  # noqa: E402
from mdlm_atat.models.dit import DiT, count_parameters  # noqa: E402
from mdlm_atat.train.optim import build_ema  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*autocast.*", "ignore:.*CUDA is not available.*")

EPS = 1e-3  # MDLM's LogLinearNoise default (noise_schedule.py:134) and ours (DiffusionConfig.eps)
NUM_REAL = 29  # real token ids 0 .. 28
MASK = NUM_REAL  # MDLM appends MASK after the vocabulary when the tokenizer has none (diffusion.py:85-88)
NUM_TOKENS = NUM_REAL + 1
BOS, EOS, PAD = 0, 1, 2  # framing ids for the bound tests (PAD only in the padded framing)
HIDDEN, COND, HEADS, LAYERS, LENGTH = 32, 16, 2, 2, 16

# fp32, same function, different kernels (see the module docstring)
FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: intra-op threads only add synchronisation (on a busy 2-core runner a (128, 32) x
    (32, 96) matmul took 8 ms with 2 threads, 0.02 ms with 1). Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# The two DiTs with the same random weights


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, the zero-initialised adaLN and output layers included: with MDLM's init every
    block is the identity and the logits are 0, which would make the comparison vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def mdlm_dit(seed: int = 0) -> torch.nn.Module:
    dit = ref.dit_module()
    model = dit.DIT(ref.dit_config(HIDDEN, COND, HEADS, LAYERS, LENGTH), vocab_size=NUM_TOKENS)
    randomise(model, seed)
    return model.eval()


def our_dit(reference: torch.nn.Module, time_conditioning: bool) -> DiT:
    # pad_vocab_multiple=1: MDLM's DiT has no vocabulary padding, so its state dict loads as it is and both sides
    # run the same GEMMs (a padded DiT computes the same function, not always the same bits: test_dit.py).
    cfg = ModelConfig(hidden_dim=HIDDEN, num_layers=LAYERS, num_heads=HEADS, cond_dim=COND, dropout=0.0,
                      time_conditioning=time_conditioning, pad_vocab_multiple=1)
    model = DiT(cfg, NUM_TOKENS)
    state = {k: v for k, v in reference.state_dict().items() if k != "rotary_emb.inv_freq"}
    model.load_state_dict(state, strict=True)
    return model.eval()


class Recorder(torch.nn.Module):
    """Passes calls through to `model`, keeping (x_t, noise level) of each."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, noise_level, **kwargs):
        self.calls.append((x_t.clone(), noise_level.clone()))
        return self.model(x_t, noise_level, **kwargs)


def tokens(batch: int, seed: int, low: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, NUM_REAL, (batch, LENGTH), generator=gen)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ----------------------------------------------------------------------------------------------------------
# 1. The DiT


def test_state_dict_names_map_one_to_one():
    theirs = mdlm_dit().state_dict()
    ours = our_dit(mdlm_dit(), time_conditioning=False).state_dict()
    assert set(theirs) - set(ours) == {"rotary_emb.inv_freq"}  # MDLM's cached rotary frequencies, a buffer
    assert set(ours) <= set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_dit_logits_equal_mdlm(time_conditioning):
    reference = mdlm_dit(seed=1)
    ours = our_dit(reference, time_conditioning)
    schedule = LogLinearSchedule(EPS)
    x_t = tokens(3, seed=2)
    x_t[:, ::3] = MASK
    sigma = schedule.total_noise(torch.tensor([0.9, 0.5, 0.05]))
    # MDLM zeroes sigma before its backbone when time conditioning is off (diffusion.py:301-310, 312-316);
    # ours zeroes it inside the DiT.
    mdlm = ref.reference_diffusion(reference, MASK, time_conditioning, LENGTH)
    with torch.no_grad(), ref.quiet():
        expected = reference(x_t, mdlm._process_sigma(sigma))
        logits = ours(x_t, sigma)
        rows = x_t == MASK
        row_logits = ours(x_t, sigma, rows=rows)
    assert expected.std() > 1.0  # randomised weights: the logits are far from MDLM's all-zero init
    # Observed bit-equal on torch 2.13 CPU; a tolerance because nothing promises the kernels round alike.
    torch.testing.assert_close(logits, expected, **FP32)
    torch.testing.assert_close(row_logits, expected[rows], **FP32)
    with torch.no_grad():
        other_sigma = ours(x_t, sigma.flip(0))
    # The conditioning is live exactly when it should be.
    assert torch.equal(other_sigma, logits) != time_conditioning


def test_small_parameter_count_matches_mdlm():
    hidden, layers, heads = MODEL_SIZES["small"]
    with torch.device("meta"):
        theirs = ref.dit_module().DIT(ref.dit_config(hidden, 128, heads, layers, 1024), vocab_size=50258)
        # unpadded, as MDLM's (the default pads 50,258 rows to 50,304: test_dit.py counts those)
        ours = DiT(ModelConfig(hidden_dim=hidden, num_layers=layers, num_heads=heads, cond_dim=128,
                               pad_vocab_multiple=1), 50258)
    assert sum(p.numel() for p in theirs.parameters()) == 169_627_218
    assert count_parameters(ours) == 169_627_218


# ----------------------------------------------------------------------------------------------------------
# 2. The per-token loss on the same x0, t and mask


def test_log_linear_schedule_matches_mdlm():
    noise = ref.noise_schedule_module().LogLinearNoise(EPS)
    ours = LogLinearSchedule(EPS)
    t = torch.linspace(EPS, 1.0, 257)
    sigma, dsigma = noise(t)  # total and rate (noise_schedule.py:140-144)
    assert torch.equal(ours.total_noise(t), sigma)  # the noise level both feed their DiT: same formula
    # move chance 1 - exp(-sigma) (diffusion.py:864) and weight dsigma / expm1(sigma) (:893-894), against
    # (1 - eps) t and 1 / t: equal up to float32 rounding.
    torch.testing.assert_close(ours.mask_prob(t), 1 - torch.exp(-sigma), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.loss_weight(t), dsigma / torch.expm1(sigma), rtol=1e-5, atol=0)


def _loss_pair(
    path: str, time_conditioning: bool, attention_mask: torch.Tensor | None, seed: int = 3, mask_padding: bool = False
):
    """MDLM's `_loss` and our objective on the same x0, t and uniform draws; returns what both computed."""
    reference = mdlm_dit(seed=seed)
    ours = our_dit(reference, time_conditioning)
    reference.train()  # the training-time path (MDLM's jit-scripted dropout-add); dropout is 0 in both
    ours.train()
    theirs = Recorder(reference)
    mine = Recorder(ours)
    mdlm = ref.reference_diffusion(theirs, MASK, time_conditioning, LENGTH)
    x0 = tokens(8, seed=seed + 1, low=3)
    x0[:, 0], x0[:, -1] = BOS, EOS
    mask_arg = torch.ones_like(x0) if attention_mask is None else attention_mask
    if attention_mask is not None:
        x0 = torch.where(attention_mask.bool(), x0, torch.full_like(x0, PAD))
    # MDLM draws t (diffusion.py:801, antithetic) and then the masking noise (:583) from the global RNG:
    # replaying the seed hands us the same draws for our objective.
    torch.manual_seed(seed)
    with ref.quiet():
        loss = mdlm._loss(x0, mask_arg)  # diffusion.py:896-916 -> _forward_pass_diffusion :847-894
    torch.manual_seed(seed)
    t = mdlm._sample_t(x0.shape[0], x0.device)
    uniform = torch.rand(x0.shape)
    objective = MaskedDiffusionObjective(LogLinearSchedule(EPS), MASK, rows_only=path == "rows",
                                         fused=path == "fused", mask_padding=mask_padding)
    terms = objective(mine, x0, t=t, uniform_noise=uniform, attention_mask=attention_mask)
    return dict(mdlm=mdlm, loss=loss, terms=terms, theirs=theirs, mine=mine, reference=reference, ours=ours, x0=x0)


@pytest.mark.parametrize("time_conditioning", [False, True])
@pytest.mark.parametrize("path", ["plain", "rows", "fused"])
def test_per_token_loss_equals_mdlm(path, time_conditioning):
    r = _loss_pair(path, time_conditioning, attention_mask=None)
    loss, terms = r["loss"], r["terms"]
    (mdlm_xt, mdlm_sigma), = r["theirs"].calls
    (our_xt, our_noise), = r["mine"].calls
    # The same corruption and noise level, bit for bit.
    assert torch.equal(our_xt, mdlm_xt)
    assert torch.equal(terms.masked, mdlm_xt == MASK)
    assert 0 < int(terms.num_masked) < terms.masked.numel()
    sigma = r["mdlm"].noise(terms.t)[0]  # sigma(t) (diffusion.py:862-863)
    assert torch.equal(our_noise, sigma)  # our DiT zeroes it itself without time conditioning; MDLM before its DiT
    assert torch.equal(mdlm_sigma, sigma if time_conditioning else torch.zeros_like(sigma))
    # Per-token loss: -log p(x0 | x_t) / t at masked positions, exactly 0 elsewhere, on every path.
    torch.testing.assert_close(terms.token_loss, loss.nlls, **FP32)
    assert torch.all(loss.nlls[~terms.masked] == 0) and torch.all(terms.token_loss[~terms.masked] == 0)
    torch.testing.assert_close(terms.loss, loss.loss, **FP32)
    # And the same gradient: MDLM and our model would take the same training step.
    loss.loss.backward()
    terms.loss.backward()
    theirs = dict(r["reference"].named_parameters())
    for name, p in r["ours"].named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, **FP32, msg=name)


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_padded_rows_loss_equals_mdlm_with_mask_padding(path):
    """MDLM's q_xt (diffusion.py:583-585) masks PAD positions like any other (the attention mask only zeroes
    their loss, :908): `mask_padding=True` (diffusion.mask_padding) does the same; by default PAD stays visible,
    which changes the loss at real tokens (the default is ours on purpose: README, method)."""
    lengths = torch.tensor([16, 12, 9, 5, 16, 7, 11, 4])
    attention_mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    r = _loss_pair(path, False, attention_mask, mask_padding=True)
    (mdlm_xt, _), = r["theirs"].calls
    (our_xt, _), = r["mine"].calls
    assert (mdlm_xt[attention_mask == 0] == MASK).any()  # the premise: MDLM masked some padding
    assert torch.equal(our_xt, mdlm_xt)
    assert not r["terms"].masked[attention_mask == 0].any()  # never a loss position
    torch.testing.assert_close(r["terms"].token_loss, r["loss"].nlls, **FP32)
    default = _loss_pair(path, False, attention_mask)
    assert not torch.allclose(default["terms"].token_loss, r["loss"].nlls, **FP32)


# ----------------------------------------------------------------------------------------------------------
# 3. The sampler's transition probabilities


def _mdlm_transition(kind: str, logits: torch.Tensor, x: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """MDLM's p(x_s | x_t) (B, L, V), float64, from `_ddpm_caching_update` (diffusion.py:592-610) or
    `_ddpm_update` (:612-637): their unnormalised q_xs is caught where it goes into `_sample_categorical`, whose
    Gumbel race (:24-28) draws index i with probability q_i / sum q; unmasked positions are copied (:609-610)."""
    namespace = ref.diffusion_namespace()
    caught = []

    def catch(q_xs):
        caught.append(q_xs.clone())
        return q_xs.argmax(-1)

    namespace["_sample_categorical"] = catch
    fixed = Recorder(FixedLogits(logits))
    mdlm = ref.reference_diffusion(fixed, MASK, time_conditioning=True, length=x.shape[1], namespace=namespace)
    B = x.shape[0]
    t_col = torch.full((B, 1), t, dtype=torch.float64)  # as `_sample` builds it (diffusion.py:675-676)
    dt = t - s
    with ref.quiet():
        if kind == "ddpm_cache":
            p_x0 = mdlm.forward(x, mdlm.noise(t_col)[0]).exp()  # the p_x0 it computes when none is cached (:602)
            mdlm._ddpm_caching_update(x, t_col, dt, p_x0=p_x0)
        else:
            mdlm._ddpm_update(x, t_col, dt)
    (q_xs,) = caught
    probs = q_xs / q_xs.sum(-1, keepdim=True)
    copied = torch.nn.functional.one_hot(x, NUM_TOKENS).to(probs.dtype)
    return torch.where((x != MASK)[..., None], copied, probs)


def _our_transition(logits: torch.Tensor, x: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """Our ancestral step's p(x_s | x_t) (samplers.py `ancestral`): a masked token is decoded with probability
    1 - mask_prob(s) / mask_prob(t), drawn by `gumbel_argmax` from the softmax over the real tokens (MASK's logit
    -inf); unmasked tokens carry over. `test_ancestral_step_draws_follow_mdlm` checks the sampler draws this."""
    schedule = LogLinearSchedule(EPS)
    p_unmask = 1.0 - samplers._mask_prob(schedule, s) / samplers._mask_prob(schedule, t)
    real = logits.double().clone()
    real[..., MASK] = float("-inf")
    probs = p_unmask * real.softmax(-1)
    probs[..., MASK] = 1.0 - p_unmask
    copied = torch.nn.functional.one_hot(x, NUM_TOKENS).to(probs.dtype)
    return torch.where((x != MASK)[..., None], copied, probs)


class FixedLogits(torch.nn.Module):
    """A denoiser whose logits (B, L, V) do not depend on its input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x_t, noise_level):
        return self.logits.expand(x_t.shape[0], *self.logits.shape[1:]).clone()


def _sampler_case(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, NUM_TOKENS, generator=gen, dtype=torch.float64) * 2
    x = torch.randint(0, NUM_REAL, (2, 6), generator=gen)
    x[:, 1:5] = MASK  # positions 0 and 5 given
    x[1, 2] = 7
    return logits, x


STEPS = [(1.0, 0.75), (0.6, 0.35), (0.1, 0.0)]


@pytest.mark.parametrize("kind", ["ddpm", "ddpm_cache"])
@pytest.mark.parametrize(("t", "s"), STEPS)
def test_ancestral_step_probabilities_equal_mdlm(kind, t, s):
    logits, x = _sampler_case()
    theirs = _mdlm_transition(kind, logits, x, t, s)
    ours = _our_transition(logits, x, t, s)
    assert torch.allclose(theirs.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-12)
    # float64: MDLM's move chances 1 - exp(-sigma) (ddpm) or t (ddpm_cache) against our (1 - eps) t ratio differ
    # only by rounding.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize(("t", "s"), STEPS)
def test_ancestral_step_draws_follow_mdlm(monkeypatch, cache, t, s):
    """Our sampler, one real step from t to s over many copies of a canvas: the empirical frequencies are MDLM's
    transition probabilities, within 5 standard errors (seeded, so deterministic); and the noise level the
    network sees is MDLM's sigma_t (diffusion.py:594, 602), bit for bit."""
    logits, x = _sampler_case()
    copies = 20_000
    canvas = x.repeat(copies, 1)  # (2 copies, 6)
    network = Recorder(FixedLogits(logits.float().repeat(copies, 1, 1)))
    monkeypatch.setattr(samplers, "time_grid", lambda num_steps: [t, s])  # the one step t -> s
    out, _ = samplers.ancestral(samplers.Network(network, cache=cache), canvas, schedule=LogLinearSchedule(EPS),
                                mask_id=MASK, num_steps=1, generator=torch.Generator().manual_seed(6), cache=cache)
    expected = _mdlm_transition("ddpm", logits, x, t, s)  # (2, 6, V)
    counts = torch.nn.functional.one_hot(out.view(copies, 2, 6), NUM_TOKENS).double().mean(0)  # (2, 6, V)
    stderr = (expected * (1 - expected) / copies).sqrt()
    assert torch.all((counts - expected).abs() <= 5 * stderr + 1e-12), float((counts - expected).abs().max())
    if network.calls:
        (_, noise_level), = network.calls
        sigma_t = ref.noise_schedule_module().LogLinearNoise(EPS)(torch.full((copies * 2,), t))[0]
        assert torch.equal(noise_level, sigma_t)


# ----------------------------------------------------------------------------------------------------------
# 4. The EMA


@pytest.mark.parametrize("decay", [0.9999, 0.5])
def test_ema_equals_mdlm_bit_for_bit(decay):
    """MDLM's ExponentialMovingAverage (ema.py, use_num_updates=True) and our ModelEMA over 25 updates of random
    parameter changes. Decay 0.9999 stays in the (1 + n) / (10 + n) warm-up throughout; 0.5 leaves it at n = 8.
    Both compute shadow -= (1 - d) * (shadow - param) in float32: equal bit for bit."""
    torch.manual_seed(0)
    model = our_dit(mdlm_dit(seed=7), time_conditioning=True)
    theirs = ref.ema_module().ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=True)
    ours = build_ema(model, decay)
    gen = torch.Generator().manual_seed(8)
    for step in range(26):
        if step:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            theirs.update(model.parameters())
            ours.update_parameters(model)
        assert ours.num_updates == theirs.num_updates == step
        shadow = list(ours.module.parameters())
        assert len(shadow) == len(theirs.shadow_params)
        for a, b in zip(shadow, theirs.shadow_params):
            assert torch.equal(a, b), (step, max_abs(a, b))
    # Not vacuous: the average moved off the initial weights and is not the current ones.
    assert not torch.equal(shadow[0], dict(model.named_parameters())["vocab_embed.embedding"])


# ----------------------------------------------------------------------------------------------------------
# 5. The validation bound


class RecordingObjective(MaskedDiffusionObjective):
    """Our objective, keeping the t and uniform draws `evaluate_bound` passes it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[dict] = []

    def __call__(self, model, x0, t=None, attention_mask=None, generator=None, uniform_noise=None, **kwargs):
        self.calls.append(dict(x0=x0, t=t, uniform_noise=uniform_noise, attention_mask=attention_mask))
        return super().__call__(model, x0, t=t, attention_mask=attention_mask, generator=generator,
                                uniform_noise=uniform_noise, **kwargs)


def _mdlm_validation_nll(model: torch.nn.Module, time_conditioning: bool, calls: list[dict]) -> tuple[float, list]:
    """MDLM's validation NLL on the same x0, t and uniform draws: `_loss` per batch (diffusion.py:896-916), the
    `NLL` MeanMetric updated with (nlls, token_mask) (:44-45, :369-372), i.e. sum nlls / sum attention mask.
    `_sample_t` is given the same t; `q_xt` (:583-585) compares the same uniform draw to its move chance, and
    (as ours does) leaves padding unmasked: the masking difference is `test_padded_rows_loss_equals_mdlm`'s.
    Returns the NLL and each call's per-sequence NELBO (nlls.sum(-1) / attention_mask.sum(-1))."""
    mdlm = ref.reference_diffusion(model, MASK, time_conditioning, LENGTH)
    total, count, per_sequence = 0.0, 0.0, []
    for call in calls:
        x0, real = call["x0"], call["attention_mask"]
        real = torch.ones_like(x0) if real is None else real.long()
        mdlm._sample_t = lambda n, device, t=call["t"]: t
        mdlm.q_xt = lambda x, move_chance, u=call["uniform_noise"], real=real: torch.where(
            (u < move_chance) & real.bool(), mdlm.mask_index, x)
        with torch.no_grad(), ref.quiet():
            loss = mdlm._loss(x0, real)
        total += float(loss.nlls.double().sum())
        count += float(loss.token_mask.double().sum())
        per_sequence.append(loss.nlls.double().sum(-1) / loss.token_mask.double().sum(-1))
    return total / count, per_sequence


@pytest.mark.parametrize("framing", ["packed", "padded"])
@pytest.mark.parametrize("num_t", [1, 3])
def test_validation_bound_equals_mdlm(framing, num_t):
    """`evaluate_bound` on MDLM-framed batches ([BOS] ... [EOS], packed or padded) is MDLM's validation NLL on the
    same draws: BOS and EOS are predicted and counted as any token, padding is not counted. With num_t > 1 ours
    averages num_t stratified passes, the mean of MDLM's NLL over those passes (same tokens in each)."""
    time_conditioning = framing == "packed"
    reference = mdlm_dit(seed=9)
    ours = our_dit(reference, time_conditioning)
    gen = torch.Generator().manual_seed(10)
    docs = [torch.randint(3, NUM_REAL, (int(n),), generator=gen).tolist() for n in torch.randint(3, 20, (12,))]
    if framing == "packed":
        blocks = torch.from_numpy(pack_documents(docs, LENGTH, BOS, EOS).astype("int64"))
        pad_id = None
    else:  # one document per row, [BOS] doc [EOS] then PAD (store.py's padded framing), at most L - 2 tokens
        blocks = torch.full((len(docs), LENGTH), PAD)
        for i, d in enumerate(docs):
            row = [BOS, *d[: LENGTH - 2], EOS]
            blocks[i, : len(row)] = torch.tensor(row)
        pad_id = PAD
    assert torch.all(blocks[:, 0] == BOS)
    batches = [blocks[:4], blocks[4:8]]
    objective = RecordingObjective(LogLinearSchedule(EPS), MASK)
    bound = evaluate_bound(ours, objective, batches, num_t=num_t, seed=11, pad_id=pad_id)
    assert len(objective.calls) == num_t * len(batches)
    expected, per_sequence = _mdlm_validation_nll(reference, time_conditioning, objective.calls)
    real = blocks[:8] != PAD if framing == "padded" else torch.ones_like(blocks[:8], dtype=torch.bool)
    assert bound.num_tokens == int(real.sum())  # BOS and EOS counted, PAD not (MDLM: attention_mask.sum())
    assert math.isclose(bound.nelbo, expected, rel_tol=1e-5)
    # And per sequence, for a fixed t and mask: our NelboTerms.sequence_loss is MDLM's nlls.sum / tokens.
    call = objective.calls[0]
    with torch.no_grad():
        terms = MaskedDiffusionObjective(LogLinearSchedule(EPS), MASK)(
            ours, call["x0"], t=call["t"], uniform_noise=call["uniform_noise"], attention_mask=call["attention_mask"])
    torch.testing.assert_close(terms.sequence_loss.double(), per_sequence[0], rtol=1e-5, atol=1e-6)
