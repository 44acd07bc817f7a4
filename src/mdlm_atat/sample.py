"""`atat sample`: load a checkpoint, lay out the canvas (prefix / infill template), run a sampler, report.

The canvas is the content of one or more blocks: MASK where text is to be generated, token ids where it is
given. The framing the model was trained with is added around each window by the sampler (packed: [BOS] ...
[EOS], so a window holds L - 2 content tokens; padded: [BOS] ..., L - 1). Given positions are never masked.

Infill templates: text with gaps written `[MASK]` (one token) or `[MASK:N]` (N tokens), e.g.
"The [MASK:6] of the city [MASK:12] in 1961." Each piece of text is tokenized on its own.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mdlm_atat.config import ConfigError, SampleOrder, choices
from mdlm_atat.data.tokenizers import Tokenizer
from mdlm_atat.diffusion.samplers import AR_SAMPLERS, DIFFUSION_SAMPLERS, RowGenerators, count_steps, generate
from mdlm_atat.diffusion.schedule import build_schedule
from mdlm_atat.eval.generation import load_reference, sample_quality
from mdlm_atat.progress import progress_bar
from mdlm_atat.runtime import autocast_for, precision_name, resolve_device
from mdlm_atat.run import load_for_inference, resolve_checkpoint
from mdlm_atat.viz.trace import write_trace_html

GAP = re.compile(r"\[MASK(?::(\d+))?\]")
NEAR_GAP = re.compile(r"\[\s*mask\b[^\]]*\]?", re.IGNORECASE)  # [mask:2], [MASK: 3], [MASK:abc], [MASK:4
TRACE_SAMPLES = 4  # samples of the first batch shown on the --trace page
ORDERS = choices(SampleOrder)  # how the confidence sampler picks positions


def parse_template(tokenizer: Tokenizer, template: str) -> list[int]:
    """Ids of an infill template, with tokenizer.mask_id at every gap position."""
    for near in NEAR_GAP.finditer(template):
        if not GAP.fullmatch(near.group(0)):  # a typo would otherwise stay in the text as it is
            raise ConfigError(
                f"--infill: {near.group(0)!r} is not a gap; write [MASK] (one token) or [MASK:N] (N tokens, e.g. "
                "[MASK:3]), in capitals, without spaces"
            )
    ids: list[int] = []
    last = 0
    for match in GAP.finditer(template):
        ids += tokenizer.encode(template[last : match.start()]) if match.start() > last else []
        size = int(match.group(1) or 1)
        if size < 1:
            raise ConfigError(f"--infill: a gap of {size} tokens ({match.group(0)}); write [MASK] or [MASK:N], N >= 1")
        ids += [tokenizer.mask_id] * size
        last = match.end()
    ids += tokenizer.encode(template[last:]) if last < len(template) else []
    return ids


def build_canvas(
    tokenizer: Tokenizer, default_length: int, length: int | None = None, prefix: str | None = None,
    infill: str | None = None,
) -> list[int]:
    """The content ids to complete: MASK where generated. Lengths count content tokens (framing excluded)."""
    if prefix is not None and infill is not None:
        raise ConfigError("--prefix and --infill: give one (a prefix is the template 'TEXT' followed by gaps)")
    if length is not None and length < 1:
        raise ConfigError(f"--length: must be >= 1, got {length}")
    if infill is not None:
        given = parse_template(tokenizer, infill)
        if not GAP.search(infill) and (length is None or length <= len(given)):
            raise ConfigError("--infill: the template has no [MASK] or [MASK:N] gap and --length adds none")
        if length is not None and length < len(given):
            raise ConfigError(f"--length {length}: shorter than the infill template ({len(given)} tokens)")
        return given + [tokenizer.mask_id] * ((length or len(given)) - len(given))
    given = tokenizer.encode(prefix) if prefix else []
    length = length or default_length
    if len(given) >= length:
        raise ConfigError(f"--prefix: {len(given)} tokens leave nothing to generate in --length {length}")
    return given + [tokenizer.mask_id] * (length - len(given))


def framing(cfg_framing: str, tokenizer: Tokenizer, block_length: int) -> tuple[list[int], list[int], int]:
    """(head ids, tail ids, content tokens per window) as the training blocks were framed."""
    if cfg_framing == "packed":
        return [tokenizer.bos_id], [tokenizer.eos_id], block_length - 2
    return [tokenizer.bos_id], [], block_length - 1  # padded: [BOS] document [EOS] PAD ...: the model ends it


def content_text(tokenizer: Tokenizer, ids: list[int], cfg_framing: str) -> str:
    if cfg_framing != "packed":  # padded: the document ends at its EOS; what follows is padding
        ends = [i for i, tok in enumerate(ids) if tok in (tokenizer.eos_id, tokenizer.pad_id)]
        ids = ids[: ends[0]] if ends else ids
    return tokenizer.decode(ids)


def sample_checkpoint(
    checkpoint: str | Path,
    sampler: str | None = None,
    num_steps: int = 128,
    num_samples: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    length: int | None = None,
    stride: int | None = None,
    prefix: str | None = None,
    infill: str | None = None,
    output: str | Path | None = None,
    trace: str | Path | None = None,
    reference: str | None = None,
    use_ema: bool = True,
    device: str = "auto",
    progress: bool = True,
    order: str = "confidence",
    compile: bool = False,
) -> dict[str, Any]:
    """Generate `num_samples` texts; returns the summary (with the texts under "samples"). `compile`:
    torch.compile the denoiser's blocks first."""
    path = resolve_checkpoint(checkpoint)
    torch_device = resolve_device(device)
    loaded = load_for_inference(path, use_ema=use_ema, device=torch_device, with_estimator=order == "easy-first",
                                compile=compile)
    model, cfg, tokenizer, is_ar = loaded.model, loaded.cfg, loaded.tokenizer, loaded.is_ar
    sampler = sampler or ("ar" if is_ar else "ancestral")
    allowed = AR_SAMPLERS if is_ar else DIFFUSION_SAMPLERS
    if sampler not in allowed:
        kind = "an autoregressive (model.name: ar)" if is_ar else f"a diffusion ({cfg.model.name})"
        raise ConfigError(f"--sampler {sampler}: {kind} checkpoint samples with {', '.join(allowed)}")
    if order not in ORDERS:
        raise ConfigError(f"--order {order}: choose {' or '.join(ORDERS)}")
    if order != "confidence" and sampler != "confidence":
        raise ConfigError(f"--order {order}: only --sampler confidence orders positions; add --sampler confidence")
    for flag, value in (("--steps", num_steps), ("--num-samples", num_samples), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    if output is not None and Path(output).suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"--output {output}: write .txt (plain text) or .jsonl (one JSON object per sample)")

    head, tail, window = framing(cfg.data.framing, tokenizer, cfg.data.max_length)
    content = build_canvas(tokenizer, window, length, prefix, infill)
    if len(content) > window and sampler not in ("semi-ar", "ar"):
        raise ConfigError(
            f"--length {len(content)}: beyond the block ({window} content tokens in L = {cfg.data.max_length}); "
            "use --sampler semi-ar"
        )
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride <= window:
        raise ConfigError(f"--stride: must be in [1, {window}] (new tokens per window), got {stride}")
    time_conditioned = bool(getattr(model, "time_conditioning", False))
    notes = []
    if sampler == "ancestral-cache" and time_conditioned:
        notes.append("the model is time-conditioned: ancestral-cache falls back to ancestral (no cache)")

    ref = load_reference(reference, device=torch_device) if reference else None  # before the work: fail fast
    importance = loaded.estimator
    if order == "easy-first":
        if importance is None:
            raise ConfigError(
                f"{path}: no importance estimator saved with it (an MDLM run, atat.enabled=false); "
                "easy-first order needs an ATAT checkpoint, or use the confidence order"
            )
        if cfg.atat.importance_mode == "none":
            notes.append("the estimator's importance_mode is none: every position rates the same (left to right)")
    schedule = build_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)  # the schedule the model was trained with
    autocast = autocast_for(torch_device, cfg.training.mixed_precision)
    canvas_row = torch.tensor(content, dtype=torch.long, device=torch_device)
    batch_sizes = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    steps_per_batch = count_steps(sampler, canvas_row[None], tokenizer.mask_id, num_steps, window, stride)

    token_rows: list[list[int]] = []
    trace_rows: list[dict[str, Any]] = []
    num_calls = num_evals = steps_taken = 0
    cache_used = False
    start = time.perf_counter()
    with progress_bar(total=steps_per_batch * len(batch_sizes), desc=f"sample ({sampler})", unit="step",
              disable=not progress, dynamic_ncols=True, mininterval=0.5) as bar:
        for first, b in zip(range(0, num_samples, batch_size), batch_sizes):
            # Sample i draws from its own stream, seeded by (seed, i): the same whatever --num-samples says.
            generator = RowGenerators.for_samples(seed, range(first, first + b), torch_device)
            out = generate(
                model, canvas_row.expand(b, -1).clone(), sampler=sampler, num_steps=num_steps, schedule=schedule,
                mask_id=tokenizer.mask_id, head=head, tail=tail, window=window, stride=stride,
                generator=generator, autocast=autocast, progress=bar, importance=importance,
            )
            num_calls += out.num_network_calls
            num_evals += out.num_sequence_evals
            steps_taken = out.num_steps
            cache_used = out.cache
            tokens = out.tokens.cpu()
            if (tokens == tokenizer.mask_id).any():  # the samplers' invariant; never expected
                raise RuntimeError("a sampler left MASK in its output")
            if trace is not None and not trace_rows:
                for row in range(min(TRACE_SAMPLES, b)):
                    trace_rows.append({"tokens": [tokenizer.decode([i]) for i in tokens[row].tolist()],
                                       "decode_step": out.decode_step[row].tolist()})
            token_rows += tokens.tolist()
    if torch_device.type == "cuda":
        torch.cuda.synchronize(torch_device)
    seconds = time.perf_counter() - start
    texts = [content_text(tokenizer, ids, cfg.data.framing) for ids in token_rows]
    if not cfg.data.padded and any(tokenizer.eos_id in ids for ids in token_rows):
        eos = tokenizer.decode([tokenizer.eos_id])
        notes.append(f"{eos} inside a sample is EOS: training blocks are documents packed end to end, each ended by "
                     f"EOS, so the model learned to end one document and begin another within a block")

    num_given = sum(i != tokenizer.mask_id for i in content)
    summary: dict[str, Any] = {
        "checkpoint": str(path),
        "step": loaded.step,
        "config_hash": loaded.config_hash,
        "weights": loaded.weights,
        "model": cfg.model.name,
        "sampler": sampler,
        **({"order": order} if sampler == "confidence" else {}),
        "num_steps": None if sampler in AR_SAMPLERS else num_steps,  # per window
        "steps_taken": steps_taken,  # per batch, over all windows
        "num_samples": num_samples,
        "batch_size": batch_size,
        "seed": seed,
        "length": len(content),  # content tokens per sample (framing excluded)
        "num_given_tokens": num_given,
        "window": window,
        "stride": stride if len(content) > window else None,
        "framing": f"{cfg.data.framing}: each window is {'[BOS] ... [EOS]' if tail else '[BOS] ...'}",
        "prefix": prefix,
        "infill": infill,
        "num_network_calls": num_calls,
        "num_sequence_evals": num_evals,
        "cache": cache_used,
        "seconds": seconds,
        "tokens_per_s": num_samples * (len(content) - num_given) / seconds,
        "device": str(torch_device),
        "precision": precision_name(torch_device, cfg.training.mixed_precision),
        "categorical": "Gumbel-max, float64",
        "quality": sample_quality(token_rows, texts, ref),
        "notes": notes,
        "output": str(output) if output is not None else None,
        "trace": str(trace) if trace is not None else None,
    }
    if output is not None:
        write_samples(Path(output), texts, token_rows, summary)
    if trace is not None:
        write_trace_html(
            trace, trace_rows, steps_taken, title=f"atat sample: {sampler}, {steps_taken} steps",
            meta={"checkpoint": path, "step": loaded.step, "sampler": sampler, "seed": seed,
                  "length": len(content), "prefix": prefix, "infill": infill},
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    summary["samples"] = texts
    return summary


def write_samples(path: Path, texts: list[str], token_rows: list[list[int]], summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        lines = [json.dumps({"index": i, "text": text, "token_ids": ids, "sampler": summary["sampler"],
                             "seed": summary["seed"], "step": summary["step"]})
                 for i, (text, ids) in enumerate(zip(texts, token_rows))]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text("".join(f"=== sample {i} ===\n{text}\n\n" for i, text in enumerate(texts)), encoding="utf-8")
