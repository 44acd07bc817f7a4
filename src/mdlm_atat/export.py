"""`atat export`: a checkpoint as a HuggingFace-style folder that `atat eval` and `atat sample` load as they are.

    OUT/
      model.safetensors      the denoiser's weights (the EMA by default: what evaluation and sampling use), the
                             real vocabulary rows only (models/dit.py: padding rows are cut off, and put back
                             as zeros when atat loads the folder), so the format does not depend on the padding
      estimator.safetensors  ATAT's importance estimator, when the run had a learned one (not needed to sample)
      config.json            transformers' fields (model_type, auto_map, sizes, vocabulary, special ids) and, under
                             `mdlm_atat`, the run's full resolved config, step and config hash: the model is
                             rebuilt from it
      configuration_mdlm_atat.py, modeling_mdlm_atat.py
                             the model for transformers: AutoModelForMaskedLM.from_pretrained(OUT,
                             trust_remote_code=True) gives the same logits as `atat` (mdlm_atat/hf/)
      tokenizer.json         the tokenizer (HF `tokenizers` format) with an appended MASK / PAD as added tokens at
                             their ids, tokenizer_config.json and special_tokens_map.json naming BOS, EOS, MASK and
                             PAD, so AutoTokenizer.from_pretrained(OUT) has them (hf/folder.py)
      README.md              a model card: what it is, the evaluation numbers found, how to use it, the config

safetensors holds tensors only (no pickle), so the weights load without running code. The evaluation numbers in
the card come from the run folder the checkpoint sits in (the validation bound logged at the checkpoint's step;
`atat eval` JSON files there with the same step and config hash) and from any `--eval FILE` given.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mdlm_atat import __version__
from mdlm_atat.config import Config, ConfigError
from mdlm_atat.data.tokenizers import Tokenizer
from mdlm_atat.diffusion.schedule import SCHEDULES
from mdlm_atat.hf.folder import AUTO_MAP, copy_remote_code, tokenizer_files
from mdlm_atat.models.dit import strip_vocab_padding
from mdlm_atat.run import read_checkpoint, safetensors
from mdlm_atat.train.checkpoint import CheckpointError, is_export_dir, resolve_checkpoint

FORMAT_VERSION = 1
WEIGHTS = {"ema": "EMA (as evaluation and sampling use)", "raw": "raw (not the EMA)"}  # how the card says them


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    use_ema: bool = True,
    eval_files: list[str | Path] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the export folder; returns a summary (paths, step, evaluation entries in the card)."""
    safetensors()  # before any work: a missing package is the first thing to say
    path = resolve_checkpoint(checkpoint)
    if is_export_dir(path):
        raise CheckpointError(f"{path}: already an exported folder; export a .pt checkpoint or a run folder")
    out = _check_out(Path(out_dir), overwrite, path)
    saved = read_checkpoint(path)
    cfg, tokenizer = saved.cfg, Tokenizer.from_json(saved.tokenizer)
    state_dict, weights = saved.weights(use_ema)
    meta = {"step": saved.step, "config_hash": saved.config_hash, "weights": weights, "tokens_seen": saved.tokens_seen}
    evaluations = collect_evaluations(path, saved.step, saved.config_hash, eval_files or [], cfg)
    files = write_export(out, state_dict, cfg, tokenizer, meta, evaluations, saved.estimator)
    return {"out": str(out_dir), "step": saved.step, "weights": weights, "evaluations": len(evaluations),
            "files": files}


def write_export(
    out: Path,
    weights: dict[str, torch.Tensor],
    cfg: Config,
    tokenizer: Tokenizer,
    meta: dict[str, Any],
    evaluations: list[dict[str, Any]],
    estimator: dict[str, torch.Tensor] | None = None,
    origin: str | None = None,
) -> list[str]:
    """Write the folder (the layout in the module doc) in one step: it appears complete or not at all.

    `meta`: step, config_hash, weights ("ema", "raw", ...), optionally tokens_seen. `origin` replaces the model
    card's "trained with mdlm-atat" line (for weights trained elsewhere: `atat import`). Returns the file names.
    """
    _, save_file = safetensors()
    tensor_meta = {"format": "pt", **{k: str(meta[k]) for k in ("step", "config_hash", "weights")}}
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = strip_vocab_padding(weights, tokenizer.num_tokens)  # what transformers' modeling file holds
    save_file(_plain(weights), str(tmp / "model.safetensors"), metadata=tensor_meta)
    if estimator:
        save_file(_plain(estimator), str(tmp / "estimator.safetensors"), metadata=tensor_meta)
    num_parameters = sum(v.numel() for v in weights.values())  # the tensors written: the DiT's, padding rows cut
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, tokenizer, meta, num_parameters), indent=2))
    for name, text in tokenizer_files(tokenizer, cfg.data.max_length).items():
        (tmp / name).write_text(text)
    copy_remote_code(tmp)  # transformers' AutoModelForMaskedLM loads the folder with these (trust_remote_code)
    (tmp / "README.md").write_text(model_card(cfg, tokenizer, meta, num_parameters, evaluations, out.name, origin))
    for file in tmp.iterdir():  # safetensors writes 0600: an export is meant to be shared, as the umask allows
        file.chmod(0o666 & ~_umask())
    if out.exists():
        shutil.rmtree(out)  # a previous export (checked by _check_out), or an empty folder
    tmp.rename(out)  # the folder appears complete or not at all
    return sorted(p.name for p in out.iterdir())


def is_previous_export(folder: Path) -> bool:
    """Whether `folder` holds what `atat export` writes and nothing else of note: plain files only (a run folder
    has checkpoints/), and a config.json with our format marker. Only such a folder may be replaced (--force)."""
    try:
        entries = list(folder.iterdir())
        info = json.loads((folder / "config.json").read_text()).get("mdlm_atat")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(info, dict) and "format_version" in info and all(e.is_file() for e in entries)


def _check_out(out: Path, overwrite: bool, checkpoint: Path) -> Path:
    """The folder to write, resolved (`--out .` has no name to put a temporary folder beside). Refuses, in one
    line, anything whose replacement could lose work: the current folder or one above it, the folder holding the
    checkpoint, a file, or a non-empty folder that is not a previous export; a previous export only with --force."""
    resolved = out.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise CheckpointError(f"--out {out}: is the current folder or holds it; name a new folder, e.g. --out export")
    if resolved == checkpoint.resolve() or resolved in checkpoint.resolve().parents:
        raise CheckpointError(
            f"--out {out}: holds the checkpoint being exported ({checkpoint}); name a new folder, e.g. --out "
            f"{resolved.name}-export"
        )
    if resolved.exists() and not resolved.is_dir():
        raise CheckpointError(f"--out {out}: is a file, not a folder; name a new folder")
    if resolved.is_dir() and any(resolved.iterdir()):
        if not is_previous_export(resolved):
            raise CheckpointError(
                f"--out {out}: holds files that are not an atat export (--force replaces a previous export only); "
                "name a new folder"
            )
        if not overwrite:
            raise CheckpointError(f"--out {out}: holds a previous export; pass --force to replace it")
    return resolved


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory or are not contiguous: give each its own copy.
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def hf_config(cfg: Config, tokenizer: Tokenizer, meta: dict[str, Any], num_parameters: int) -> dict[str, Any]:
    """config.json: the fields transformers' MdlmAtatConfig reads (hf/configuration_mdlm_atat.py), and ours."""
    m = cfg.model
    step = meta["step"]  # None: unknown (a release without it, `atat import`)
    info = {"format_version": FORMAT_VERSION, "version": __version__, "step": None if step is None else int(step)}
    if "tokens_seen" in meta:
        info["tokens_seen"] = meta["tokens_seen"]
    info.update({"config_hash": meta["config_hash"], "weights": meta["weights"], "config": cfg.to_dict()})
    return {
        "model_type": "mdlm-atat-dit",
        "architectures": ["MdlmAtatForMaskedLM"],
        "auto_map": AUTO_MAP,
        "is_diffusion_model": not m.is_ar,
        "hidden_size": m.hidden_dim,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "cond_dim": m.cond_dim,
        "mlp_ratio": m.mlp_ratio,
        "dropout": m.dropout,
        "time_conditioning": m.time_conditioning,
        "schedule": cfg.diffusion.schedule,  # alpha(t); a time-conditioned model sees sigma(t) = -log(1 - alpha(t))
        "schedule_eps": cfg.diffusion.eps,
        "max_position_embeddings": cfg.data.max_length,
        "vocab_size": tokenizer.num_tokens,  # embedding rows: the tokenizer's ids plus any appended MASK / PAD
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "mask_token_id": tokenizer.mask_id,
        "pad_token_id": tokenizer.pad_id,
        "num_parameters": num_parameters,
        "torch_dtype": "float32",
        "mdlm_atat": info,
    }


def collect_evaluations(
    checkpoint: Path, step: int, config_hash: str, eval_files: list, cfg: Config
) -> list[dict[str, Any]]:
    """Evaluation numbers for the card: the training run's validation bound at this step, `atat eval` JSON files
    in the run folder for this step and config, and the files given."""
    found: list[dict[str, Any]] = []
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        val = None
        for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("event") == "val" and record.get("step") == step:
                val = record
        if val is not None:
            found.append({
                "dataset": cfg.data.dataset_name, "split": cfg.data.val_split, "nelbo": val["val_nelbo"],
                "stderr": val.get("val_stderr"), "ppl": val.get("val_ppl"), "num_tokens": val.get("val_tokens"),
                "step": step, "source": "validation during training (metrics.jsonl)",
            })
    candidates = sorted(run_dir.glob("*.json")) if run_dir is not None else []
    explicit = {Path(p).resolve() for p in eval_files}
    for path in [*candidates, *map(Path, eval_files)]:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            if Path(path).resolve() in explicit:
                raise ConfigError(f"--eval {path}: not a readable atat eval JSON file") from None
            continue
        results = [data] if isinstance(data, dict) and "nelbo" in data else (
            list(data.values()) if isinstance(data, dict) and data and all(isinstance(v, dict) and "nelbo" in v
                                                                           for v in data.values()) else [])
        for r in results:
            same = r.get("step") == step and r.get("config_hash") == config_hash
            if same or Path(path).resolve() in explicit:
                keys = ("dataset", "split", "nelbo", "stderr", "ppl", "num_tokens", "step")
                source = Path(path).name + ("" if same else " (another step or config)")
                found.append({**{k: r.get(k) for k in keys}, "source": source})
    unique = {json.dumps(e, sort_keys=True, default=str): e for e in found}
    return list(unique.values())


def model_card(
    cfg: Config, tokenizer: Tokenizer, meta: dict, num_parameters: int, evaluations: list, name: str,
    origin: str | None = None,
) -> str:
    is_ar = cfg.model.is_ar
    method = ("an autoregressive baseline (causal DiT, next-token loss)" if is_ar else
              f"ATAT (importance {cfg.atat.importance_mode}, masking {cfg.atat.masking}, beta0 {cfg.atat.beta0}, "
              f"curriculum {cfg.curriculum.variant})" if cfg.atat.enabled else "MDLM (uniform masking)")
    what = "causal language model" if is_ar else "masked diffusion language model (MDLM, Sahoo et al., NeurIPS 2024)"
    lines = [
        "---",
        "library_name: mdlm-atat",
        "tags: [autoregressive, causal-lm, text-generation]" if is_ar else
        "tags: [masked-diffusion, mdlm, atat, text-generation]",
        "---",
        "",
        f"# {name}",
        "",
        origin or f"A {what} trained with mdlm-atat {__version__}: {method}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| denoiser | DiT, {cfg.model.hidden_dim} wide, {cfg.model.num_layers} blocks, {cfg.model.num_heads} heads, "
        f"{num_parameters:,} parameters |",
        f"| weights | {WEIGHTS.get(meta['weights'], meta['weights'])}, "
        f"step {'unknown' if meta['step'] is None else meta['step']}, config hash {meta['config_hash']} |",
        f"| tokenizer | {tokenizer.name}: {tokenizer.vocab_size:,} tokens; MASK id {tokenizer.mask_id}, "
        f"BOS {tokenizer.bos_id}, EOS {tokenizer.eos_id}, PAD {tokenizer.pad_id} |",
        f"| data | {cfg.data.dataset_name}, {cfg.data.framing} framing, L = {cfg.data.max_length} |",
        "",
        "## Evaluation",
        "",
    ]
    if evaluations:
        lines += [
            "MDLM's NELBO under uniform masking, in nats per token: an upper bound on the negative log-likelihood, "
            "whatever the masking the model was trained with, so PPL = exp(NELBO) is an upper bound on perplexity, "
            "comparable with the MDLM paper's; +- is the standard error over sequences."
            if not is_ar else "Exact NLL (autoregressive), nats per token; PPL = exp(NLL).",
            "",
            f"| dataset | split | {'NLL' if is_ar else 'NELBO'} (nats/token) | PPL | tokens | step | source |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for e in evaluations:
            stderr = f" +- {e['stderr']:.4f}" if isinstance(e.get("stderr"), (int, float)) else ""
            ppl = f"{e['ppl']:.2f}" if isinstance(e.get("ppl"), (int, float)) and math.isfinite(e["ppl"]) else ""
            lines.append(f"| {e.get('dataset')} | {e.get('split') or ''} | {e['nelbo']:.4f}{stderr} | {ppl} | "
                         f"{e.get('num_tokens') or ''} | {e.get('step')} | {e['source']} |")
    else:
        lines.append("No evaluation found for this checkpoint: run `atat eval --checkpoint THIS_FOLDER`.")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "# in a clone of mdlm-atat, after pip install -e .",
        f"atat eval --checkpoint {name} --dataset {cfg.data.dataset_name}",
        f"atat sample --checkpoint {name} --num-samples 4",
        "```",
        "",
        "`model.safetensors` holds the real vocabulary rows: it loads into `mdlm_atat.models.build_model(cfg.model, "
        "num_tokens)` with the config in `config.json` (`mdlm_atat.config`) once `mdlm_atat.models.dit.pad_vocab` has "
        "added the model's padding rows (`model.pad_vocab_multiple`); `mdlm_atat.eval.run.load_for_inference(FOLDER)` "
        "does all three.",
        "",
        *transformers_usage(cfg, tokenizer, name),
        "",
        f"## {'Config' if origin else 'Training config'}",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def transformers_usage(cfg: Config, tokenizer: Tokenizer, name: str) -> list[str]:
    """The model card's "Load with transformers" section: code that runs as written, and what the logits are."""
    if cfg.model.is_ar:
        predict = [
            'ids = tokenizer("The capital of France is", return_tensors="pt").input_ids',
            "logits = model(ids).logits  # (B, L, vocab_size); causal: position i scores token i + 1",
            "logits[..., tokenizer.mask_token_id] = -torch.inf  # the MASK row is unused",
            "print(tokenizer.decode(logits[0, -1].argmax()))",
        ]
        meaning = "This is the autoregressive baseline: the same DiT with causal attention."
    else:
        predict = [
            'ids = tokenizer("The capital of France is Paris.", return_tensors="pt").input_ids',
            "x_t = ids.clone()",
            "x_t[:, 4:6] = tokenizer.mask_token_id  # the positions to predict",
            "logits = model(x_t).logits  # (B, L, vocab_size): the denoiser's raw output",
            "logits[..., tokenizer.mask_token_id] = -torch.inf  # SUBS: MASK is never predicted",
            "print(tokenizer.decode(logits[0, 4:6].argmax(-1)))",
        ]
        alpha = SCHEDULES[cfg.diffusion.schedule].alpha_formula.format(eps=cfg.diffusion.eps)
        meaning = (
            "Under MDLM's SUBS parameterisation p(x0 | x_t) at a masked position is the softmax of these logits "
            "without MASK, and a position that is not masked keeps its token; `atat sample` implements the "
            "samplers. "
            + ("The model is not time-conditioned (MDLM's default): it needs no noise level."
               if not cfg.model.time_conditioning else
               f"The model is time-conditioned: pass `noise_level` (B,) = -log(1 - alpha(t)), with alpha(t) = "
               f"{alpha} the masking rate of x_t "
               f"({cfg.diffusion.schedule} schedule).")
        )
    pad = ("PAD is EOS (the model was trained on packed blocks, without padding)" if tokenizer.pad_id is None
           else f"PAD is id {tokenizer.pad_id}")
    return [
        "## Load with transformers",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer",
        "",
        f'model = AutoModelForMaskedLM.from_pretrained("{name}", trust_remote_code=True)  # the code in this folder',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)  # else transformers 5 asks',
        *predict,
        "```",
        "",
        f"MASK is id {tokenizer.mask_id}; {pad}. The logits are the ones `atat` computes (the same float32 operations; "
        f"the last bits can differ with the weights' memory layout). {meaning}",
    ]

