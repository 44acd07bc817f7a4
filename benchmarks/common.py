"""Pieces the benchmark scripts share (they run as `python benchmarks/NAME.py`, so this imports as `common`)."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from mdlm_atat.config import MODEL_SIZES, Config, ModelConfig, load_config
from mdlm_atat.models.dit import DiT, DiTBlock, FinalLayer


H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM datasheet, bf16 tensor cores without sparsity (the H200's is the same)


def peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    """The peak FLOP/s that MFU divides by: --peak-flops, else the H100/H200 bf16 datasheet figure on CUDA, else none."""
    if args.peak_flops is not None:
        return args.peak_flops
    return H100_BF16_DENSE_FLOPS if device.type == "cuda" else None


def matmul_parameters(model: DiT) -> int:
    """Weights each token is multiplied by: the blocks' qkv, attn_out and MLP weights, and the output layer's real
    rows (vocabulary padding is work done, not useful work: MFU leaves it out)."""
    total = model.num_tokens * model.output_layer.linear.in_features
    for block in model.blocks:
        total += block.attn_qkv.weight.numel() + block.attn_out.weight.numel()
        total += sum(m.weight.numel() for m in block.mlp if isinstance(m, torch.nn.Linear))
    return total


def forward_flops_per_sequence(model: DiT, seq_len: int) -> int:
    """FLOPs of one sequence through the DiT's trunk (blocks: qkv, attention, attn_out, MLP), the output layer left
    out: 2 x (the blocks' matmul weights) + 4 x layers x L x hidden (QK^T and AV) per token."""
    blocks = matmul_parameters(model) - model.num_tokens * model.output_layer.linear.in_features
    return seq_len * (2 * blocks + 4 * len(model.blocks) * seq_len * model.output_layer.linear.in_features)


def sampling_flops(model: DiT, num_sequence_evals: int, seq_len: int, decoded_tokens: int) -> int:
    """A sampler's work: whole sequences through the trunk (what a cache saves) plus each decoded token's
    projection to the vocabulary."""
    hidden = model.output_layer.linear.in_features
    trunk = num_sequence_evals * forward_flops_per_sequence(model, seq_len)
    return trunk + 2 * hidden * model.num_tokens * decoded_tokens


def model_config(args: argparse.Namespace, dropout: float) -> tuple[ModelConfig, str]:
    """The preset (default small), with any explicit dimension taking precedence; returns (config, label)."""
    preset = args.size or "small"
    default = MODEL_SIZES[preset]
    explicit = (args.hidden_dim, args.num_layers, args.num_heads)
    hidden, layers, heads = (e if e is not None else d for e, d in zip(explicit, default))
    label = preset if (hidden, layers, heads) == default else "custom"
    if hidden % heads or (hidden // heads) % 2:
        raise SystemExit(f"--num-heads: hidden_dim {hidden} / num_heads {heads} must be an even integer (rotary)")
    cfg = ModelConfig(hidden_dim=hidden, num_layers=layers, num_heads=heads, cond_dim=args.cond_dim, dropout=dropout,
                      pad_vocab_multiple=getattr(args, "pad_vocab_multiple", ModelConfig.pad_vocab_multiple))
    return cfg, label


def run_config(model: ModelConfig, overrides: list[str]) -> Config:
    """A validated run config with the benchmark's denoiser and `overrides` (section.key=value), for
    `mdlm_atat.run.Run.build`: the benchmarks build and step their runs as training does."""
    sizes = [f"model.{key}={value}" for key, value in vars(model).items() if value is not None and key != "size"]
    return load_config(None, [*sizes, *overrides])


@torch.no_grad()
def move_zero_init_off_zero(model: DiT, generator: torch.Generator, std: float = 0.02) -> None:
    """Give adaLN and the output layer small random weights, so the loss depends on every layer. The output
    layer's vocabulary padding rows stay zero (as training keeps them): the same draws, hence the same loss, at any
    `model.pad_vocab_multiple`."""
    for module in model.modules():
        if isinstance(module, (DiTBlock, FinalLayer)):
            layers = [module.adaLN_modulation] + ([module.linear] if isinstance(module, FinalLayer) else [])
            for linear in layers:
                for p in (linear.weight, linear.bias):
                    p = p[: getattr(linear, "num_tokens", len(p))]  # the real rows (OutputLinear: models/dit.py)
                    p.copy_(torch.randn(p.shape, generator=generator) * std)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROFILE_TOP = 25


def profile_calls(call, indices: range, device: torch.device) -> dict[str, Any]:
    """Run `call(i)` for each index under torch.profiler: the time per call that the GPU (the CPU, without one)
    spent busy, and the top kernels (ops on the CPU) by their own time; see `kernel_rows`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in indices:
            call(i)
        synchronize(device)
    return kernel_rows(prof.key_averages(), len(indices), cuda)


def kernel_rows(events, calls: int, cuda: bool) -> dict[str, Any]:
    """`busy_ms_per_step`: the summed own time per call of the GPU's kernels (memory copies and sets included),
    or of the CPU's ops without a GPU; `top`: the largest of them, each with its name, count and milliseconds per
    call and its share of that busy time. On the GPU only device-side events count: a CPU op's own device time
    is its kernels' time again, and so is a named range's (the optimiser's step), so counting those too would
    count kernels twice."""
    from torch.autograd import DeviceType

    def own_us(event) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in events if e.device_type == wanted and own_us(e) > 0
              and not getattr(e, "is_user_annotation", False)]  # a range around kernels counted already
    total = sum(own_us(e) for e in events)
    top = sorted(events, key=own_us, reverse=True)[:PROFILE_TOP]
    return {
        "busy_ms_per_step": total / calls / 1e3,
        "top": [
            {"name": e.key, "calls_per_step": e.count / calls, "ms_per_step": own_us(e) / calls / 1e3,
             "share": own_us(e) / total}
            for e in top
        ],
    }


def print_profile(profile: dict[str, Any] | None, title: str, step_ms: float | None = None) -> None:
    """The busy time per call (against the call's wall time `step_ms` where given) and the top rows."""
    if not profile:
        return
    busy = f"busy {profile['busy_ms_per_step']:.2f} ms per call"
    if step_ms:
        busy += f" of {step_ms:.2f} ms ({profile['busy_ms_per_step'] / step_ms:.0%})"
    print(f"\n{title}: {busy}; top {len(profile['top'])}:")
    for r in profile["top"]:
        print(f"  {r['ms_per_step']:8.3f} ms  {r['share'] * 100:5.1f}%  x{r['calls_per_step']:<6g} {r['name'][:110]}")


REPO = Path(__file__).resolve().parents[1]


def repo_relative(text: str) -> str:
    """A path as a reader of the results would type it from the checkout: relative to the repository (../shared
    for the offline corpora beside it), never the absolute path of the machine that ran the benchmark."""
    for root, shown in ((REPO, ""), (REPO.parent / "shared", "../shared/")):
        for prefix in (f"{root}/", f"{root.resolve()}/"):
            text = text.replace(prefix, shown)
        if text in (str(root), str(root.resolve())):
            return shown.rstrip("/") or "."
    return text


def shown_command() -> str:
    """The command as run (`python SCRIPT ARGS`), its paths relative to the repository."""
    return repo_relative(shlex.join(["python", *sys.argv]))


def run_facts(device: torch.device, device_name: str, precision: str) -> dict[str, Any]:
    """What every benchmark JSON starts with: the command as run, when, and on what."""
    return {
        "command": shown_command(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "device": str(device),
        "device_name": device_name,
        "precision": precision,
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Right-aligned columns, as wide as their widest cell."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
