"""Exports load in transformers (issue 18): the shipped modeling file computes our DiT's logits, and the tokenizer
has MASK and PAD. The modeling file restates models/dit.py by hand: the first test is what keeps the two equal."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mdlm_atat.config import ModelConfig
from mdlm_atat.data.tokenizers import char_tokenizer, load_local_tokenizer
from mdlm_atat.eval.run import load_for_inference
from mdlm_atat.export import hf_config, write_export
from mdlm_atat.hf.folder import atat_backend, tokenizer_files
from mdlm_atat.models import build_model
from mdlm_atat.models.dit import strip_vocab_padding

from test_data import GPT2, needs_shared
from test_dit import randomise

transformers = pytest.importorskip("transformers")
from mdlm_atat.hf.modeling_mdlm_atat import MdlmAtatConfig, MdlmAtatForMaskedLM  # noqa: E402 - needs transformers

CONFIGS = [  # (hidden, layers, heads, cond, mlp_ratio, time_conditioning, model name)
    (32, 2, 2, 16, 4, False, "atat-dit"),
    (48, 3, 4, 24, 2, True, "mdlm-dit"),
    (24, 1, 1, 7, 3, True, "atat-dit"),  # one head, an odd conditioning width
    (32, 2, 4, 16, 4, False, "ar"),  # causal attention
]


def meta() -> dict:
    return {"step": 3, "config_hash": "abc", "weights": "ema"}


@pytest.mark.parametrize("hidden,layers,heads,cond,mlp_ratio,time_conditioning,name", CONFIGS)
def test_transformers_model_computes_the_dit_exactly(tiny_config, hidden, layers, heads, cond, mlp_ratio,
                                                     time_conditioning, name):
    cfg = tiny_config(f"model.hidden_dim={hidden}", f"model.num_layers={layers}", f"model.num_heads={heads}",
                      f"model.cond_dim={cond}", f"model.mlp_ratio={mlp_ratio}",
                      f"model.time_conditioning={str(time_conditioning).lower()}", f"model.name={name}",
                      f"atat.enabled={str(name != 'ar').lower()}")
    tokenizer = char_tokenizer()
    ours = randomise(build_model(cfg.model, tokenizer.num_tokens), seed=hidden + layers).eval()
    # config.json as `atat export` writes it, read by the shipped configuration class: the field mapping is tested too
    hf_cfg = MdlmAtatConfig.from_dict(hf_config(cfg, tokenizer, meta(), 0))
    theirs = MdlmAtatForMaskedLM(hf_cfg).eval()
    # the same parameter names and shapes, once the vocabulary padding rows are cut off as the export does
    theirs.load_state_dict(strip_vocab_padding(ours.state_dict(), tokenizer.num_tokens), strict=True)
    gen = torch.Generator().manual_seed(0)
    for batch, length in ((1, 7), (3, 16)):
        x_t = torch.randint(0, tokenizer.num_tokens, (batch, length), generator=gen)
        noise = torch.rand(batch, generator=gen)
        with torch.no_grad():
            expected = ours(x_t, noise)
            assert torch.equal(theirs(x_t, noise_level=noise).logits, expected)  # bit for bit, float32
            if not time_conditioning:
                assert torch.equal(theirs(x_t).logits, expected)  # the noise level is optional then


def test_built_from_a_config_it_starts_as_mdlm():
    model = MdlmAtatForMaskedLM(MdlmAtatConfig(vocab_size=37, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, cond_dim=16)).eval()
    logits = model(torch.randint(0, 37, (2, 8))).logits
    assert torch.equal(logits, torch.zeros_like(logits))  # zero output layer: the uniform start, (1 - eps) ln V
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0, 0]]))


def _export(tmp_path, tiny_config, tokenizer, *overrides, name="tiny-export"):
    cfg = tiny_config(*overrides)
    model = randomise(build_model(cfg.model, tokenizer.num_tokens), seed=1)
    out = tmp_path / name
    write_export(out, model.state_dict(), cfg, tokenizer, meta(), [])
    return out


@needs_shared
def test_export_folder_loads_in_transformers(tmp_path, tiny_config, monkeypatch):
    gpt2 = load_local_tokenizer(GPT2)  # MASK appended at 50,257, no PAD: MDLM's OpenWebText setting
    out = _export(tmp_path, tiny_config, gpt2)
    loaded = load_for_inference(out)
    ours, tokenizer = loaded.model, loaded.tokenizer
    assert tokenizer.to_json() == gpt2.to_json()  # atat reads back the tokenizer it wrote, byte for byte

    config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(config).__name__ == "MdlmAtatConfig" and config.mask_token_id == 50257
    model = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)
    assert not model.training
    assert type(transformers.AutoModel.from_pretrained(out, trust_remote_code=True)) is type(model)

    # As the issue asks, without trust_remote_code: transformers 5 reads config.json first and, run without a
    # terminal (no prompt), falls back to a plain config; the tokenizer loads either way.
    monkeypatch.setattr(transformers.dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 0)
    for options in ({}, {"trust_remote_code": True}):
        hf_tok = transformers.AutoTokenizer.from_pretrained(out, **options)
        assert (hf_tok.mask_token, hf_tok.mask_token_id) == ("[MASK]", 50257)
        assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (50256, 50256, 50256)  # PAD = EOS

    text = "Masked diffusion models unmask tokens, one step at a time."
    ids = hf_tok(text, return_tensors="pt").input_ids  # (1, L)
    assert ids[0].tolist() == tokenizer.encode(text)
    x_t = ids.repeat(2, 1)
    x_t[0, 2:5] = x_t[1, -3:] = hf_tok.mask_token_id
    assert hf_tok.decode(x_t[0, 1:6]) == tokenizer.decode(x_t[0, 1:6].tolist())  # "[MASK]" both ways
    with torch.no_grad():
        # The same float32 operations; transformers keeps the weights memory-mapped, which can move the last bit.
        torch.testing.assert_close(model(x_t).logits, ours(x_t, torch.zeros(2)), rtol=1e-5, atol=1e-6)


@needs_shared
def test_special_tokens_of_every_kind(tmp_path):
    """Own MASK and PAD (text8's characters), appended MASK and PAD (GPT-2, padded framing)."""
    padded = load_local_tokenizer(GPT2).with_padding()  # MASK 50257, PAD 50258, both appended
    for tokenizer, expected in ((char_tokenizer(), (4, 5)), (padded, (50257, 50258))):
        files = tokenizer_files(tokenizer, max_length=64)
        folder = tmp_path / tokenizer.name
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder)  # no config.json here: no question asked
        assert (hf_tok.mask_token_id, hf_tok.pad_token_id) == expected
        info = json.loads(files["tokenizer_config.json"])["mdlm_atat"]
        backend = atat_backend(files["tokenizer.json"], info)
        assert backend == json.loads(tokenizer.to_json())["backend"]  # the appended tokens come off again


@needs_shared
def test_model_card_code_runs(tmp_path, tiny_config, monkeypatch):
    out = _export(tmp_path, tiny_config, load_local_tokenizer(GPT2), name="card-export")
    card = (out / "README.md").read_text()
    assert "## Load with transformers" in card and "MASK is id 50257; PAD is EOS" in card
    code = re.search(r"```python\n(.+?)\n```", card, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the card names the folder as it sits
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the card's own snippet, as a user pastes it


def test_model_has_no_parameter_the_dit_lacks():
    """Parameter names and order match models/dit.py (so model.safetensors, the real vocabulary rows of the DiT's
    state dict, loads as it is)."""
    cfg = ModelConfig(hidden_dim=32, num_layers=2, num_heads=2, cond_dim=16)  # padded: 64 vocabulary rows
    ours = build_model(cfg, 37)
    theirs = MdlmAtatForMaskedLM(MdlmAtatConfig(vocab_size=37, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, cond_dim=16))
    shapes = [(k, v.shape) for k, v in strip_vocab_padding(ours.state_dict(), 37).items()]
    assert [(k, v.shape) for k, v in theirs.state_dict().items()] == shapes
