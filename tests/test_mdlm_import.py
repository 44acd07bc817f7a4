"""`atat import` (issue 18): MDLM's two release layouts, built here from MDLM's own DiT (../shared/reference/mdlm)
with random weights, become export folders that give MDLM's logits, MDLM's NELBO and samples without MASK."""

from __future__ import annotations

import collections
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import mdlm_reference as ref
from test_data import GPT2, needs_shared

if (_why := ref.missing()) is not None:
    pytest.skip(_why, allow_module_level=True)

from mdlm_atat.cli import main  # noqa: E402
from mdlm_atat.eval.run import load_for_inference  # noqa: E402
from mdlm_atat.mdlm_import import import_mdlm  # noqa: E402
from mdlm_atat.sample import sample_checkpoint  # noqa: E402
from mdlm_atat.train.checkpoint import CheckpointError  # noqa: E402
from mdlm_atat.run import make_objective  # noqa: E402

pytestmark = [
    needs_shared,  # MDLM's OpenWebText tokenizer: GPT-2, MASK = 50,257
    pytest.mark.filterwarnings("ignore:.*autocast.*", "ignore:.*CUDA is not available.*"),  # MDLM's dit.py on CPU
]

GPT2_NUM_TOKENS = 50258  # MDLM's OpenWebText vocabulary: GPT-2's 50,257 tokens and MASK = 50,257
MDLM_OWT_CONFIG = {  # the parts of MDLM's Hydra config (configs/config.yaml) that import reads or checks
    "backbone": "dit", "parameterization": "subs", "T": 0, "time_conditioning": False,
    "noise": {"type": "loglinear"}, "training": {"ema": 0.9999},
    "model": {"hidden_size": 32, "cond_dim": 16, "length": 32, "n_blocks": 2, "n_heads": 2, "dropout": 0.1},
}


# ----------------------------------------------------------------------------------------------------------
# MDLM's two release layouts, built from its own DiT


def mdlm_dit(length: int, hidden: int = 32, heads: int = 2, blocks: int = 2, cond: int = 16,
             seed: int = 0) -> torch.nn.Module:
    """MDLM's DIT with GPT-2's vocabulary and random weights (off its zero init, which would make every block the
    identity), eval mode."""
    model = ref.dit_module().DIT(ref.dit_config(hidden, cond, heads, blocks, length), vocab_size=GPT2_NUM_TOKENS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def write_hub_folder(folder: Path, model: torch.nn.Module, time_conditioning: bool = False) -> Path:
    """What `hf download kuleshov-group/mdlm-owt` gives: config.json (model_type mdlm, the fields of MDLM's
    configuration_mdlm.py) and model.safetensors with the DiT's state dict under `backbone.`."""
    from safetensors.torch import save_file

    m = model.config.model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MDLM"],
        "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig", "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
        "model_type": "mdlm", "vocab_size": model.vocab_size, "model_length": m.length, "hidden_dim": m.hidden_size,
        "cond_dim": m.cond_dim, "n_blocks": m.n_blocks, "n_heads": m.n_heads, "dropout": 0.1,
        "time_conditioning": time_conditioning, "return_dict": False, "torch_dtype": "float32",
    }))
    save_file({f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    return folder


def write_lightning_checkpoint(path: Path, model: torch.nn.Module, config: object, step: int = 7) -> dict:
    """A .ckpt as MDLM's Lightning training writes it: raw weights in `state_dict`, the EMA (models/ema.py, built
    over backbone then noise parameters) in `ema`, optimiser states, and `hyper_parameters` holding `config`
    (pickled objects in the real file). The EMA is moved off the raw weights, so the two can be told apart.
    Returns the written payload."""
    ema = ref.ema_module().ExponentialMovingAverage(model.parameters(), decay=0.9999)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema.update(model.parameters())  # shadow = a mix of the old and new weights, not the raw ones
    num_params = len(list(model.parameters()))
    payload = {
        "epoch": 0, "global_step": step, "pytorch-lightning_version": "2.2.1",
        "state_dict": collections.OrderedDict((f"backbone.{k}", v) for k, v in model.state_dict().items()),
        "ema": ema.state_dict(),
        "optimizer_states": [{"state": {i: {"exp_avg": torch.zeros_like(p)} for i, p in enumerate(model.parameters())},
                              "param_groups": [{"lr": 3e-4, "params": list(range(num_params))}]}],
        "lr_schedulers": [{"last_epoch": step}],
        "loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": step}}},
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": config, "tokenizer": None},
    }
    torch.save(payload, path)
    return payload


def mdlm_nelbo_terms(mdlm: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor, uniform: torch.Tensor,
                     time_conditioning: bool, noise: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MDLM's continuous-time SUBS loss per token (diffusion.py `_forward_pass_diffusion`: its `forward`, i.e.
    `_process_sigma` and `_subs_parameterization`, and its LogLinearNoise or CosineNoise), masking where `uniform`
    is below the move chance, as its `q_xt` does with its own draw. (B, L) each: the weighted NLL and the mask."""
    mask_id = mdlm.vocab_size - 1
    diffusion = ref.reference_diffusion(mdlm, mask_id, time_conditioning, x0.shape[1])
    diffusion.noise = {"loglinear": ref.noise_schedule_module().LogLinearNoise,
                       "cosine": ref.noise_schedule_module().CosineNoise}[noise]()  # get_noise, eps 1e-3
    sigma, dsigma = diffusion.noise(t)  # (B,), (B,)
    move_chance = 1 - torch.exp(-sigma[:, None])  # (B, 1)
    x_t = torch.where(uniform < move_chance, mask_id, x0)
    with torch.no_grad(), ref.quiet():
        log_p = diffusion.forward(x_t, sigma[:, None])  # (B, L, V), SUBS
    log_p_x0 = log_p.gather(-1, x0[:, :, None])[:, :, 0]
    return -log_p_x0 * (dsigma / torch.expm1(sigma))[:, None], x_t == mask_id


def assert_same_as_mdlm(folder: Path, mdlm: torch.nn.Module, time_conditioning: bool,
                        noise: str = "loglinear") -> None:
    """Logits bit for bit; the NELBO of the same masks to float32 rounding (our alpha'/alpha against MDLM's
    dsigma/expm1(sigma))."""
    loaded = load_for_inference(folder)
    model, cfg, tokenizer = loaded.model, loaded.cfg, loaded.tokenizer
    assert (tokenizer.mask_id, tokenizer.num_tokens) == (50257, mdlm.vocab_size)
    assert (cfg.diffusion.schedule, cfg.diffusion.eps, cfg.model.time_conditioning) == (noise, 1e-3, time_conditioning)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50257, (4, cfg.data.max_length), generator=gen)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    uniform = torch.rand(x0.shape, generator=gen)
    mdlm_nll, mdlm_masked = mdlm_nelbo_terms(mdlm, x0, t, uniform, time_conditioning, noise)
    objective = make_objective(cfg, tokenizer)
    with torch.no_grad(), ref.quiet():
        x_t = torch.where(mdlm_masked, tokenizer.mask_id, x0)
        sigma = objective.schedule.total_noise(t)
        assert torch.equal(model(x_t, sigma), mdlm(x_t, sigma if time_conditioning else torch.zeros(4)))
        terms = objective(model, x0, t=t, uniform_noise=uniform)
    assert torch.equal(terms.masked, mdlm_masked)
    torch.testing.assert_close(terms.token_loss, mdlm_nll, rtol=1e-5, atol=1e-5)
    assert terms.loss.item() == pytest.approx((mdlm_nll.sum() / x0.numel()).item(), rel=1e-6)


def write_corpus(path: Path) -> Path:
    with path.open("w") as f:
        for i in range(40):
            text = f"Document {i}: masked diffusion language models unmask a few tokens at every step. " * 4
            f.write(json.dumps({"text": text, "split": "validation" if i % 2 else "train"}) + "\n")
    return path


def test_hub_folder(tmp_path, monkeypatch, capsys):
    mdlm = mdlm_dit(length=32)
    hub = write_hub_folder(tmp_path / "mdlm-owt", mdlm)
    out = tmp_path / "mdlm-owt-atat"
    assert main(["import", "--mdlm", str(hub), "--out", str(out), "--tokenizer", str(GPT2)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weights"] == "released" and summary["step"] is None and summary["mask_id"] == 50257
    assert (summary["hidden_dim"], summary["num_layers"], summary["num_heads"], summary["max_length"]) == (32, 2, 2, 32)
    assert_same_as_mdlm(out, mdlm, time_conditioning=False)

    monkeypatch.setenv("HOME", str(tmp_path))  # the token store's default cache, ~/.cache/mdlm_atat
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert main(["eval", "--checkpoint", str(out), "--dataset", str(corpus), "--max-batches", "1",
                 "--batch-size", "2", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == "released" and result["num_tokens"] == 64 and result["nelbo"] > 0
    for sampler in ("ancestral", "confidence"):
        samples = tmp_path / f"{sampler}.jsonl"
        sample_checkpoint(out, sampler=sampler, num_steps=8, num_samples=2, seed=1, device="cpu", progress=False,
                          output=samples)
        ids = [json.loads(line)["token_ids"] for line in samples.read_text().splitlines()]
        assert len(ids) == 2 and all(len(row) == 30 and 50257 not in row for row in ids)  # L - 2, never MASK


def fake_omegaconf(config: dict) -> tuple[object, dict[str, types.ModuleType]]:
    """`config` as an object pickled the way omegaconf 2.3 pickles a DictConfig (state: `_content` of nodes, each
    leaf's state holding `_val`, `_parent` pointing back up), and the modules to register while saving it."""
    dictconfig, nodes = types.ModuleType("omegaconf.dictconfig"), types.ModuleType("omegaconf.nodes")

    class DictConfig:
        def __init__(self, content: dict, parent: object = None) -> None:
            self.__dict__.update(_metadata=None, _parent=parent, _content={
                k: DictConfig(v, self) if isinstance(v, dict) else AnyNode(v, self) for k, v in content.items()
            })

    class AnyNode:
        def __init__(self, value: object, parent: object) -> None:
            self.__dict__.update(_val=value, _metadata=None, _parent=parent)

    for module, cls in ((dictconfig, DictConfig), (nodes, AnyNode)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    return DictConfig(config), {"omegaconf": types.ModuleType("omegaconf"), "omegaconf.dictconfig": dictconfig,
                                "omegaconf.nodes": nodes}


def write_ckpt(path: Path, mdlm: torch.nn.Module, config: dict, monkeypatch) -> dict:
    """The .ckpt with its config pickled as omegaconf objects, whose modules are gone again when it is read."""
    pickled, modules = fake_omegaconf(config)
    with monkeypatch.context() as patch:
        for name, module in modules.items():
            patch.setitem(sys.modules, name, module)
        return write_lightning_checkpoint(path, mdlm, pickled)


def test_lightning_checkpoint_ema_raw_and_config(tmp_path, monkeypatch):
    config = {**MDLM_OWT_CONFIG, "time_conditioning": True, "model": {**MDLM_OWT_CONFIG["model"], "length": 48}}
    mdlm = mdlm_dit(length=48)
    ckpt = tmp_path / "last.ckpt"
    payload = write_ckpt(ckpt, mdlm, config, monkeypatch)

    summary = import_mdlm(ckpt, tmp_path / "ema", tokenizer=str(GPT2))
    assert (summary["weights"], summary["step"], summary["max_length"], summary["time_conditioning"]) == (
        "ema", 7, 48, True)  # L and the conditioning come from the pickled config
    raw = import_mdlm(ckpt, tmp_path / "raw", tokenizer=str(GPT2), use_ema=False)
    assert raw["weights"] == "raw"
    assert_same_as_mdlm(tmp_path / "raw", mdlm, time_conditioning=True)  # mdlm holds the raw weights

    ema = ref.ema_module().ExponentialMovingAverage(mdlm.parameters(), decay=0.9999)
    ema.load_state_dict(payload["ema"])
    ema.copy_to(mdlm.parameters())  # as MDLM evaluates: the shadow parameters copied into the backbone
    assert_same_as_mdlm(tmp_path / "ema", mdlm, time_conditioning=True)
    card = (tmp_path / "ema" / "README.md").read_text()
    assert "MDLM's checkpoint `last.ckpt`, step 7" in card and "its EMA weights" in card
    assert "pass `noise_level` (B,) = -log(1 - alpha(t)), with alpha(t) = (1 - 0.001) t" in card


def test_lightning_checkpoint_cosine_schedule(tmp_path, monkeypatch):
    mdlm = mdlm_dit(length=32)
    ckpt = tmp_path / "cosine.ckpt"
    write_ckpt(ckpt, mdlm, {**MDLM_OWT_CONFIG, "noise": {"type": "cosine"}}, monkeypatch)
    assert import_mdlm(ckpt, tmp_path / "raw", tokenizer=str(GPT2), use_ema=False)["schedule"] == "cosine"
    assert_same_as_mdlm(tmp_path / "raw", mdlm, time_conditioning=False, noise="cosine")


def test_lightning_checkpoint_runs_none_of_its_code(tmp_path, monkeypatch):
    marker = tmp_path / "ran"

    class Payload:  # what a hostile pickle does: call a function of its choosing while loading
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    mdlm = mdlm_dit(length=32)
    ckpt = tmp_path / "hostile.ckpt"
    write_lightning_checkpoint(ckpt, mdlm, {**MDLM_OWT_CONFIG, "callback": Payload()})
    import_mdlm(ckpt, tmp_path / "out", tokenizer=str(GPT2))
    assert not marker.exists()


def test_real_omegaconf_config_is_read(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    if not hasattr(omegaconf, "OmegaConf"):
        pytest.skip("only the reference's omegaconf stand-in is importable")
    config = omegaconf.OmegaConf.create({**MDLM_OWT_CONFIG, "model": {**MDLM_OWT_CONFIG["model"], "length": 40}})
    write_lightning_checkpoint(tmp_path / "real.ckpt", mdlm_dit(length=40), config)
    assert import_mdlm(tmp_path / "real.ckpt", tmp_path / "out", tokenizer=str(GPT2))["max_length"] == 40


def run_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line: cause and fix
    return err


def test_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["import", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--mdlm", "--out", "--tokenizer", "--dataset", "--no-ema", "--force"))
    mdlm = mdlm_dit(length=32)
    hub = write_hub_folder(tmp_path / "mdlm-owt", mdlm)
    out = str(tmp_path / "out")
    assert "not found" in run_error(capsys, "import", "--mdlm", str(tmp_path / "nowhere"), "--out", out)
    (tmp_path / "empty").mkdir()
    assert "expected MDLM's hub folder" in run_error(capsys, "import", "--mdlm", str(tmp_path / "empty"), "--out", out)
    assert "--tokenizer gpt2" in run_error(capsys, "import", "--mdlm", str(hub), "--out", out)
    assert "50,258 rows" in run_error(capsys, "import", "--mdlm", str(hub), "--out", out, "--tokenizer", "char")
    assert "atat import --mdlm" in run_error(capsys, "eval", "--checkpoint", str(hub), "--device", "cpu")

    other = write_hub_folder(tmp_path / "other", mdlm)
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "not 'mdlm'" in run_error(capsys, "import", "--mdlm", str(other), "--out", out)

    sedd = tmp_path / "sedd.ckpt"
    write_ckpt(sedd, mdlm, {**MDLM_OWT_CONFIG, "parameterization": "sedd", "noise": {"type": "geometric"}},
               monkeypatch)
    err = run_error(capsys, "import", "--mdlm", str(sedd), "--out", out, "--tokenizer", str(GPT2))
    assert "parameterization='sedd'" in err and "noise.type='geometric'" in err
    assert "atat import --mdlm" in run_error(capsys, "eval", "--checkpoint", str(sedd), "--device", "cpu")

    no_ema = tmp_path / "no-ema.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in mdlm.state_dict().items()}}, no_ema)
    assert "--no-ema" in run_error(capsys, "import", "--mdlm", str(no_ema), "--out", out, "--tokenizer", str(GPT2))
    assert main(["import", "--mdlm", str(no_ema), "--out", out, "--tokenizer", str(GPT2), "--no-ema"]) == 0
    capsys.readouterr()
    assert "--force" in run_error(capsys, "import", "--mdlm", str(hub), "--out", out, "--tokenizer", str(GPT2))
    with pytest.raises(CheckpointError, match="not MDLM's DiT"):
        torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
        import_mdlm(tmp_path / "other.ckpt", tmp_path / "out2", tokenizer=str(GPT2))
