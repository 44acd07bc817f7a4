"""Data-parallel scaling of the MDLM training step: tokens/s per GPU on 1 vs N GPUs, and the efficiency.

Weak scaling, as training scales: the per-device batch stays (default 32 x 1024) and the global batch grows
with the number of GPUs. Each point is a `torchrun --standalone --nproc_per_node N` launch of this script in
worker mode, which times the trainer's own step, built from the same functions `train/trainer.py` calls:
`seed_step_dropout` and `step_draws` (t antithetic over the global batch, the masks' draws), this rank's rows,
the MDLM objective (masked rows only), backward under `gradient_sync`, `clip_grad_norm_(1.0)`, AdamW from
`build_optimizer` (fused on CUDA), the EMA update; the model wrapped by `parallelize` (compile, then DDP or
FSDP2), bf16 autocast on CUDA. Left out: the data loader (random tokens, made on the device) and logging.

    tokens/s per device = batch_size x seq_len x accumulation / step time (the slowest rank's)
    scaling efficiency (N GPUs) = tokens/s per device on N GPUs / tokens/s per device on 1 GPU

One process never wraps the model (train/distributed.py), so the 1-GPU point is plain single-GPU training, the
baseline every strategy is compared with; a variant's 1-GPU point is shared by variants with the same compile
setting.

On 2 GPUs (the command docs/distributed.md records):
    PYTHONPATH=src python3 benchmarks/scaling.py --size small --nproc 1,2 --variants ddp,ddp-compiled,fsdp \
        --output benchmarks/results/scaling_small_h100x2.json

CPU smoke test with gloo (seconds; its timings mean nothing):
    python benchmarks/scaling.py --device cpu --hidden-dim 32 --num-layers 2 --num-heads 2 --cond-dim 16 \
        --seq-len 32 --batch-size 4 --vocab-size 100 --steps 3 --warmup 1 --nproc 1,2 --variants ddp,fsdp
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mdlm_atat.config import MODEL_SIZES, ModelConfig, TrainingConfig
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective
from mdlm_atat.diffusion.schedule import LogLinearSchedule
from mdlm_atat.models.dit import DiT, count_parameters
from mdlm_atat.runtime import autocast_for, precision_name
from mdlm_atat.train import distributed
from mdlm_atat.train.optim import build_ema, build_optimizer
from common import synchronize  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

VARIANTS = ("ddp", "ddp-compiled", "fsdp", "fsdp-compiled")
NUM_DISTINCT_BATCHES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", default="1,2", help="comma-separated process (GPU) counts; 1 is the baseline")
    p.add_argument("--variants", default="ddp,ddp-compiled,fsdp", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--size", choices=sorted(MODEL_SIZES), default="small", help="preset (hidden, layers, heads)")
    p.add_argument("--hidden-dim", type=int, help="overrides the preset's")
    p.add_argument("--num-layers", type=int, help="overrides the preset's")
    p.add_argument("--num-heads", type=int, help="overrides the preset's")
    p.add_argument("--cond-dim", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1, help="MDLM trains with 0.1")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per device per micro-step")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50257, help="real tokens; MASK is appended (GPT-2: 50257)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 applies on CUDA only")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (each process takes cuda:LOCAL_RANK)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed to each launch")
    p.add_argument("--output", type=Path, help="write all results as JSON here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run one point, write JSON here
    p.add_argument("--variant", default="ddp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.nproc = [int(n) for n in args.nproc.split(",") if n.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants + [args.variant]:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if not args.nproc or min(args.nproc) < 1:
        p.error("--nproc: counts must be >= 1")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    hidden, layers, heads = MODEL_SIZES[args.size]
    return ModelConfig(
        hidden_dim=args.hidden_dim or hidden,
        num_layers=args.num_layers or layers,
        num_heads=args.num_heads or heads,
        cond_dim=args.cond_dim,
        dropout=args.dropout,
    )


# ----------------------------------------------------------------------------------------------------------
# Worker: one (variant, world size) point, under torchrun


def run_worker(args: argparse.Namespace) -> None:
    strategy, compiled = args.variant.removesuffix("-compiled"), args.variant.endswith("-compiled")
    env = distributed.init_distributed(args.device)
    device = env.device
    tc = TrainingConfig(strategy=strategy, compile=compiled, mixed_precision=args.precision)
    cfg = model_config(args)
    num_tokens = args.vocab_size + 1  # MASK is the last id
    objective = MaskedDiffusionObjective(LogLinearSchedule(1e-3), mask_id=args.vocab_size, rows_only=True)

    torch.manual_seed(args.seed)  # the same weights on every rank
    model = DiT(cfg, num_tokens).to(device)
    ema = build_ema(model, 0.9999)
    parallel = distributed.parallelize(model, None, ema.module, tc, env)
    optimizer = build_optimizer(model, tc, device)
    autocast = autocast_for(device, args.precision)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1 + env.rank)  # each rank its own tokens
    batches = [
        torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device, generator=gen)
        for _ in range(NUM_DISTINCT_BATCHES)
    ]
    draw_generator = torch.Generator(device=device)
    global_batch = args.batch_size * env.world_size * args.accumulation
    losses = []

    def step(i: int) -> None:  # the trainer's step (train/trainer.py), on random tokens
        distributed.seed_step_dropout(args.seed, i, env.rank)
        t_all, noise_all = distributed.step_draws(
            objective, args.seed, i, global_batch, args.seq_len, device, draw_generator
        )
        for micro in range(args.accumulation):
            rows = distributed.local_rows(micro, env, args.batch_size)
            x0 = batches[(i * args.accumulation + micro) % NUM_DISTINCT_BATCHES]
            with parallel.gradient_sync(micro == args.accumulation - 1):
                with autocast:
                    loss = objective(parallel.model, x0, t=t_all[rows], uniform_noise=noise_all[rows]).loss
                (loss / args.accumulation).backward()
        distributed.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update_parameters(model)
        losses.append(loss.detach())

    model.train()
    clock = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    warmup_s = time.perf_counter() - clock
    if env.distributed:
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - clock], dtype=torch.float64, device=device)
    if env.distributed:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the job runs at its slowest rank's pace
    step_s = elapsed.item() / args.steps
    tokens_per_step_per_device = args.batch_size * args.accumulation * args.seq_len
    result = {
        "variant": args.variant,
        "strategy": parallel.strategy,
        "compiled": compiled,
        "world_size": env.world_size,
        "step_s": step_s,
        "tokens_per_s": tokens_per_step_per_device * env.world_size / step_s,
        "tokens_per_s_per_device": tokens_per_step_per_device / step_s,
        "global_batch_size": global_batch,
        "warmup_s": warmup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "num_parameters": count_parameters(model),
        "losses_finite": bool(torch.isfinite(torch.stack(losses).float()).all()),
        "last_loss": float(losses[-1]),
        "precision": precision_name(device, args.precision),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
    }
    if env.is_main:
        args.worker.write_text(json.dumps(result))
    distributed.destroy_distributed()


# ----------------------------------------------------------------------------------------------------------
# Driver: one torchrun launch per point


WORKER_OPTIONS = (
    "size", "hidden_dim", "num_layers", "num_heads", "cond_dim", "dropout", "batch_size", "accumulation", "seq_len",
    "vocab_size", "steps", "warmup", "precision", "device", "seed",
)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The options a worker needs, spelled in full (torchrun rejects abbreviations of its own, e.g. --nproc)."""
    out = []
    for name in WORKER_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def launch(args: argparse.Namespace, variant: str, nproc: int, out: Path) -> dict[str, Any] | None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(Path(__file__).resolve()), *worker_argv(args), "--worker", str(out), "--variant", variant,
    ]
    print(f"\n$ {shlex.join(command)}", flush=True)
    try:
        done = subprocess.run(command, timeout=args.timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        print(f"{variant} on {nproc}: timed out after {args.timeout:.0f} s", flush=True)
        return None
    if done.returncode != 0 or not out.is_file():
        print(f"{variant} on {nproc}: failed (exit {done.returncode})\n{done.stderr[-4000:]}", flush=True)
        return None
    result = json.loads(out.read_text())
    print(
        f"{variant} on {nproc}: {result['step_s'] * 1e3:.1f} ms/step, "
        f"{result['tokens_per_s_per_device']:,.0f} tokens/s per device",
        flush=True,
    )
    return result


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args)
        return 0
    cfg = model_config(args)
    print(
        f"DiT hidden {cfg.hidden_dim}, layers {cfg.num_layers}, heads {cfg.num_heads}; per device "
        f"{args.batch_size} x {args.seq_len} tokens x {args.accumulation} accumulation; {args.steps} timed steps "
        f"after {args.warmup}; torch {torch.__version__}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    baselines: dict[bool, dict[str, Any]] = {}  # compiled -> the 1-process point
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            compiled = variant.endswith("-compiled")
            for nproc in args.nproc:
                if nproc == 1 and compiled in baselines:
                    continue  # one process is plain training whatever the strategy: measured once
                result = launch(args, variant, nproc, Path(tmp) / f"{variant}-{nproc}.json")
                ok &= result is not None and result["losses_finite"]
                if result is None:
                    continue
                if nproc == 1:
                    baselines[compiled] = result
                base = baselines.get(compiled)
                result["scaling_efficiency"] = (
                    result["tokens_per_s_per_device"] / base["tokens_per_s_per_device"] if base else None
                )
                if base is not None and nproc > 1:
                    print(f"{variant} on {nproc}: scaling efficiency {result['scaling_efficiency']:.1%}", flush=True)
                results.append(result)
                write_output(args, argv, results)  # after every point: a run cut short keeps what it measured

    header = ("variant", "GPUs", "strategy", "step ms", "tokens/s", "tokens/s/device", "efficiency", "peak GiB")
    rows = [
        (
            r["variant"] if r["world_size"] > 1 else ("compiled" if r["compiled"] else "eager"),
            str(r["world_size"]),
            r["strategy"],
            fmt(r["step_s"] * 1e3, ".1f"),
            fmt(r["tokens_per_s"], ",.0f"),
            fmt(r["tokens_per_s_per_device"], ",.0f"),
            fmt(r["scaling_efficiency"] * 100 if r["scaling_efficiency"] is not None else None, ".1f") + "%",
            fmt(r["peak_memory_gib"], ".2f"),
        )
        for r in results
    ]
    print()
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    if args.output is not None:
        print(f"\nwrote {args.output}")
    return 0 if ok else 1


def write_output(args: argparse.Namespace, argv: list[str], results: list[dict[str, Any]]) -> None:
    if args.output is None:
        return
    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join(["python3", "benchmarks/scaling.py", *argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
