"""Data-parallel scaling of the training step (MDLM, or ATAT with --atat): tokens/s per GPU on 1 vs N GPUs, the
efficiency, peak memory per GPU; and, with --resume-check, a checkpoint written on N GPUs resumed on 1.

Weak scaling, as training scales: the per-device batch stays (default 32 x 1024) and the global batch grows
with the number of GPUs. Each point is a `torchrun --standalone --nproc_per_node N` launch of this script in
worker mode, which times the trainer's own step, `mdlm_atat.run.Run.train_step`, on a run built by `Run.build`
as the trainer builds it (constant LR): `seed_step_dropout` and `step_draws` (t antithetic over the global batch, the masks' draws), this rank's rows,
the MDLM objective (the SUBS loss fused with the output layer, as training), backward under `gradient_sync`,
`clip_grad_norm_(1.0)`, AdamW from `build_optimizer` (fused on CUDA), the EMA update; the model wrapped by
`parallelize` (compile, then DDP or FSDP2), bf16 autocast on CUDA. Left out: the data loader (random tokens, made
on the device), the trainer's per-step non-finite check (one host sync) and logging.

With --atat the step is ATAT's, as the trainer takes it (diffusion/atat.py): the importance estimator built by
`build_estimator` (default AtatConfig size, a made-up unigram table) on the clean tokens, the
tilted masks at the hard stage's fixed beta (beta0 = 0.5 from the first step: curriculum.variant=none, no
estimator warm-up), the 1/p-corrected NELBO, the rank-percentile targets and the estimator's BCE loss, one
backward for both, each group clipped to 1.0, AdamW over both parameter groups; the estimator wrapped as
`parallelize` wraps it (compiled with the model; replicated with DDP under DDP and FSDP2 alike).

    tokens/s per device = batch_size x seq_len x accumulation / step time (the slowest rank's)
    scaling efficiency (N GPUs) = tokens/s per device on N GPUs / tokens/s per device on 1 GPU

One process never wraps the model (train/distributed.py), so the 1-GPU point is plain single-GPU training, the
baseline every strategy is compared with; a variant's 1-GPU point is shared by variants with the same compile
setting.

--resume-check, after the timed points, for each strategy of --variants (or those it names): the real trainer
(`python -m mdlm_atat train`, ATAT on, the benchmark's model and per-device batch) on a small offline corpus
(--resume-data, default stdlib-docs with a 512-token BPE trained on the spot) under torchrun on the largest
--nproc N for 2 x --resume-steps steps, saving checkpoints/last.pt half-way (kept as last.prev.pt by the final
save); then that half-way checkpoint, in a fresh run folder, resumed in one process (`--resume`, gradient
accumulation N so the global batch stays) to the end. It passes when the checkpoint is consolidated (plain full
tensors, no wrapper prefixes) and records N processes at the saved step, the one-process run starts at that step,
and its losses are finite and each within --resume-rtol of what the N-process run logged at the same step. That
comparison is exact up to float rounding because dropout is off for the check: t, the masks' draws and the
samples are functions of (seed, step, sample index), not of the world size (train/distributed.py); only dropout
draws per rank. What remains is bf16 rounding (FSDP2 computes with bf16 copies of every weight, autocast only
the matmuls) and the gradient reduction order.

On 2 GPUs, MDLM (the command docs/distributed.md records):
    PYTHONPATH=src python3 benchmarks/scaling.py --size small --nproc 1,2 --variants ddp,ddp-compiled,fsdp \
        --output benchmarks/results/scaling_small_h100x2.json

On 2 GPUs, ATAT, small and medium, DDP and FSDP2, and the 2 -> 1 resume (about 5 minutes on H200s):
    PYTHONPATH=src python3 benchmarks/scaling.py --size small --nproc 1,2 --variants ddp,fsdp --atat \
        --steps 10 --warmup 3 --resume-check --output $OUT/scaling_small_atat.json
    PYTHONPATH=src python3 benchmarks/scaling.py --size medium --nproc 1,2 --variants ddp,fsdp --atat \
        --steps 10 --warmup 3 --output $OUT/scaling_medium_atat.json
On 8 GPUs: --nproc 1,2,4,8 (the resume check then writes on 8 and resumes on 1).

CPU smoke test with gloo (seconds; its timings mean nothing):
    python benchmarks/scaling.py --device cpu --hidden-dim 32 --num-layers 2 --num-heads 2 --cond-dim 16 \
        --seq-len 32 --batch-size 4 --vocab-size 100 --steps 3 --warmup 1 --nproc 1,2 --variants ddp,fsdp \
        --atat --resume-check --resume-steps 2
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import mdlm_atat
from mdlm_atat.config import MODEL_SIZES, ModelConfig
from mdlm_atat.models.dit import count_parameters
from mdlm_atat.run import Run, Vocab
from mdlm_atat.runtime import autocast_for, precision_name
from mdlm_atat.train import distributed
from mdlm_atat.viz.report import read_metrics
from common import fmt, print_table, repo_relative, run_config, synchronize  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

VARIANTS = ("ddp", "ddp-compiled", "fsdp", "fsdp-compiled")
NUM_DISTINCT_BATCHES = 4
# ATAT at the hard stage's tilt from the first step: beta = +beta0 fixed, no uniform-masking warm-up.
ATAT_OVERRIDES = ("curriculum.variant=none", "atat.estimator_warmup_steps=0")
REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "atat" / "base_config.yaml"  # every key at its default
RESUME_VOCAB_SIZE = 512  # the resume check's BPE: trained on the corpus in seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", default="1,2", help="comma-separated process (GPU) counts; 1 is the baseline")
    p.add_argument("--variants", default="ddp,ddp-compiled,fsdp", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--atat", action="store_true", help="time ATAT's step (estimator, tilted masks, its loss)")
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
    p.add_argument(
        "--resume-check", nargs="?", const="", metavar="STRATEGIES",
        help="then the trainer (ATAT) on the largest --nproc, resumed on 1 process: for each strategy of --variants, "
        "or the comma-separated ones given (ddp, fsdp)",
    )
    p.add_argument("--resume-steps", type=int, default=10, help="steps before the checkpoint; as many after it")
    p.add_argument(
        "--resume-data", default="stdlib-docs",
        help="the resume check's corpus (data.dataset_name): stdlib-docs, or a local .jsonl/.txt file or folder",
    )
    p.add_argument(
        "--resume-rtol", type=float, default=0.02,
        help="largest relative gap between a resumed step's loss and the N-process run's (bf16: about 4e-3 a rounding)",
    )
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
    if args.resume_check is not None:
        named = [v.strip() for v in args.resume_check.split(",") if v.strip()]
        args.resume_check = named or list(dict.fromkeys(v.removesuffix("-compiled") for v in args.variants))
        if not set(args.resume_check) <= {"ddp", "fsdp"}:
            p.error(f"--resume-check: strategies are ddp and fsdp, not {args.resume_check}")
        if max(args.nproc) < 2:
            p.error("--resume-check: writes on the largest --nproc and resumes on 1; give a count above 1")
    if args.resume_steps < 1:
        p.error("--resume-steps: must be >= 1")
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
    cfg = run_config(model_config(args), [
        f"data.batch_size={args.batch_size}", f"data.max_length={args.seq_len}", f"atat.enabled={args.atat}",
        *ATAT_OVERRIDES, f"training.gradient_accumulation_steps={args.accumulation}", f"training.strategy={strategy}",
        f"training.compile={compiled}", f"training.mixed_precision={args.precision}", f"training.seed={args.seed}",
        "training.warmup_steps=0",
    ])
    num_tokens = args.vocab_size + 1  # MASK is the last id
    # A made-up unigram table stands in for the training split's counts (ATAT's estimator).
    counts = torch.randint(0, 1000, (args.vocab_size,), generator=torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)  # the same weights on every rank
    run = Run.build(cfg, Vocab(num_tokens, mask_id=args.vocab_size), env, counts if args.atat else None)
    model, estimator, atat = run.model, run.estimator, run.atat
    autocast = autocast_for(device, args.precision)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1 + env.rank)  # each rank its own tokens
    batches = itertools.cycle([  # (B, L) each; micro-batch k of the run takes batches[k % 4]
        torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device, generator=gen)
        for _ in range(NUM_DISTINCT_BATCHES)
    ])
    global_batch = run.global_batch
    losses, estimator_losses = [], []

    def step(i: int) -> None:  # the trainer's step (mdlm_atat.run.Run.train_step), on random tokens
        result = run.train_step(batches, autocast)
        if result.atat is not None:
            estimator_losses.append(result.atat.estimator_loss.detach())
        losses.append(result.nelbo)

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
        "atat": args.atat,
        "strategy": run.parallel.strategy,
        "compiled": compiled,
        "world_size": env.world_size,
        "step_s": step_s,
        "tokens_per_s": tokens_per_step_per_device * env.world_size / step_s,
        "tokens_per_s_per_device": tokens_per_step_per_device / step_s,
        "global_batch_size": global_batch,
        "warmup_s": warmup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "num_parameters": count_parameters(model),
        "losses_finite": bool(torch.isfinite(torch.stack(losses + estimator_losses).float()).all()),
        "last_loss": float(losses[-1]),
        "precision": precision_name(device, args.precision),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
    }
    if atat is not None:
        state = atat.curriculum.state(args.warmup)
        result.update(
            estimator_parameters=count_parameters(estimator),
            stage=state.stage,
            beta=state.beta,
            last_estimator_loss=float(estimator_losses[-1]),
        )
    if env.is_main:
        args.worker.write_text(json.dumps(result))
    distributed.destroy_distributed()


# ----------------------------------------------------------------------------------------------------------
# Driver: one torchrun launch per point


WORKER_OPTIONS = (
    "size", "hidden_dim", "num_layers", "num_heads", "cond_dim", "dropout", "batch_size", "accumulation", "seq_len",
    "vocab_size", "steps", "warmup", "precision", "device", "seed", "atat",
)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The options a worker needs, spelled in full (torchrun rejects abbreviations of its own, e.g. --nproc)."""
    out = []
    for name in WORKER_OPTIONS:
        value, flag = getattr(args, name), f"--{name.replace('_', '-')}"
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_command(command: list[str], timeout: float, what: str) -> subprocess.CompletedProcess | None:
    """Run a launch, printing it; None (and the reason printed) when it timed out or failed."""
    print(f"\n$ {shlex.join(command)}", flush=True)
    # The package may be on PYTHONPATH only (not installed): the children import it from where this one did.
    src = str(Path(mdlm_atat.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, timeout=timeout, capture_output=True, text=True, env=env)
    except subprocess.TimeoutExpired:
        print(f"{what}: timed out after {timeout:.0f} s", flush=True)
        return None
    if done.returncode != 0:
        print(f"{what}: failed (exit {done.returncode})\n{done.stderr[-4000:]}", flush=True)
        return None
    return done


def launch(args: argparse.Namespace, variant: str, nproc: int, out: Path) -> dict[str, Any] | None:
    command = [*torchrun(nproc), str(Path(__file__).resolve()), *worker_argv(args), "--worker", str(out),
               "--variant", variant]
    done = run_command(command, args.timeout, f"{variant} on {nproc}")
    if done is None or not out.is_file():
        return None
    result = json.loads(out.read_text())
    print(
        f"{variant} on {nproc}: {result['step_s'] * 1e3:.1f} ms/step, "
        f"{result['tokens_per_s_per_device']:,.0f} tokens/s per device",
        flush=True,
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# The resume check: the trainer writes on N processes, one process continues


def resume_overrides(args: argparse.Namespace, strategy: str, cache_dir: Path) -> list[str]:
    """The trainer's config for the check: the benchmark's model and per-device batch, ATAT on, dropout off (it is
    the one draw made per rank, so one process resumes with the draws N processes would have made)."""
    cfg = model_config(args)
    steps = args.resume_steps
    return [
        f"data.dataset_name={args.resume_data}", "data.tokenizer=bpe", f"data.tokenizer_vocab_size={RESUME_VOCAB_SIZE}",
        f"data.batch_size={args.batch_size}", f"data.max_length={args.seq_len}", "data.num_workers=0",
        f"data.cache_dir={cache_dir}",
        f"model.hidden_dim={cfg.hidden_dim}", f"model.num_layers={cfg.num_layers}", f"model.num_heads={cfg.num_heads}",
        f"model.cond_dim={cfg.cond_dim}", "model.dropout=0.0",
        f"training.total_steps={2 * steps}", "training.warmup_steps=0",
        f"training.gradient_accumulation_steps={args.accumulation}", "training.log_every_n_steps=1",
        f"training.eval_every_n_steps={2 * steps}", "training.eval_batches=1", f"training.save_every_n_steps={steps}",
        f"training.mixed_precision={args.precision}", f"training.device={args.device}",
        f"training.strategy={strategy}", f"training.seed={args.seed}",
        "atat.enabled=true", "atat.diagnostics_batches=0", *ATAT_OVERRIDES, "logging.tensorboard=false",
    ]


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """What the check needs from a checkpoint, read memory-mapped (a small model's last.pt is over a GB)."""
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state_dicts = [payload[part] or {} for part in ("model", "ema", "estimator")]
    summary = {
        "world_size": payload["world_size"],
        "step": payload["state"]["step"],
        "samples_seen": payload["state"]["samples_seen"],
        # The single-process layout: full plain tensors, no `module.` (DDP) or `_orig_mod.` (compile) prefixes.
        "consolidated": all(
            type(value) is torch.Tensor and not key.startswith(("module.", "_orig_mod."))
            for sd in state_dicts for key, value in sd.items()
        ),
    }
    del payload, state_dicts
    return summary


def resume_check(args: argparse.Namespace, strategy: str, nproc: int, tmp: Path) -> dict[str, Any]:
    """The trainer on `nproc` processes for 2 x `--resume-steps` steps, saving at half-way; then that half-way
    checkpoint resumed in one process to the end, and compared step by step with the N-process run's second half."""
    steps = args.resume_steps
    written, resumed = tmp / f"resume-{strategy}-written", tmp / f"resume-{strategy}-resumed"
    result: dict[str, Any] = {
        "strategy": strategy, "written_on": nproc, "resumed_on": 1, "saved_step": steps, "final_step": 2 * steps,
        "dataset": args.resume_data, "rtol": args.resume_rtol, "ok": False, "error": None,
    }
    write = [
        *torchrun(nproc), "-m", "mdlm_atat", "train", "--config", str(BASE_CONFIG), "--log-dir", str(written),
        *resume_overrides(args, strategy, tmp / "resume-cache"),
    ]
    if run_command(write, args.timeout, f"resume check ({strategy}): training on {nproc}") is None:
        result["error"] = f"training on {nproc} processes failed"
        return result
    # Saving at the end kept the half-way last.pt as last.prev.pt (with its sha256): it becomes the checkpoint
    # of a fresh run folder, which one process resumes.
    if not (written / "checkpoints" / "last.prev.pt").is_file():
        result["error"] = f"no half-way checkpoint (last.prev.pt) in {written}"
        return result
    (resumed / "checkpoints").mkdir(parents=True)
    for name in ("last.prev.pt", "last.prev.pt.sha256"):
        os.replace(written / "checkpoints" / name, resumed / "checkpoints" / name.replace(".prev", ""))
    result["checkpoint"] = checkpoint_summary(resumed / "checkpoints" / "last.pt")
    # One process, accumulating over the N ranks' micro-batches: the same global batch, in the loader's order.
    resume = [
        sys.executable, "-m", "mdlm_atat", "train", "--log-dir", str(resumed), "--resume",
        f"training.gradient_accumulation_steps={nproc * args.accumulation}",
    ]
    if run_command(resume, args.timeout, f"resume check ({strategy}): resuming on 1") is None:
        result["error"] = "resuming on 1 process failed"
        return result

    written_log, resumed_log = read_metrics(written), read_metrics(resumed)
    start = written_log.starts[0]
    resume_event = next((r for r in resumed_log.starts if r["event"] == "resume"), {})
    continued = {r["step"]: r["loss"] for r in written_log.get("train")}  # steps 1 .. 2S, on N processes
    after = {r["step"]: r["loss"] for r in resumed_log.get("train")}  # steps S + 1 .. 2S, on 1
    gaps = [abs(after[s] - continued[s]) / abs(continued[s]) for s in after if s in continued]
    result.update(
        written_strategy=start["strategy"],
        global_batch_size=start["global_batch_size"],
        resumed_world_size=resume_event.get("world_size"),
        resumed_at_step=resume_event.get("step"),
        resumed_global_batch_size=resume_event.get("global_batch_size"),
        resumed_steps=sorted(after),
        loss_at_save=continued.get(steps),
        loss_first_resumed=after.get(steps + 1),
        loss_first_continued=continued.get(steps + 1),
        loss_last_resumed=after.get(2 * steps),
        loss_last_continued=continued.get(2 * steps),
        max_rel_gap=max(gaps) if gaps and all(map(math.isfinite, gaps)) else None,
        losses_finite=all(math.isfinite(v) for v in [*continued.values(), *after.values()]),
        val_nelbo_resumed=(resumed_log.get("val") or [{}])[-1].get("val_nelbo"),
        val_nelbo_continued=(written_log.get("val") or [{}])[-1].get("val_nelbo"),
    )
    checks = {
        "the checkpoint records N processes at the saved step": (
            result["checkpoint"]["world_size"] == nproc and result["checkpoint"]["step"] == steps
        ),
        "the checkpoint is consolidated": result["checkpoint"]["consolidated"],
        "one process resumed at the saved step": (
            (result["resumed_world_size"], result["resumed_at_step"]) == (1, steps)
        ),
        "the global batch is kept": result["resumed_global_batch_size"] == result["global_batch_size"],
        "the resumed run logged every step to the end": (
            result["resumed_steps"] == list(range(steps + 1, 2 * steps + 1))
        ),
        "finite losses": result["losses_finite"],
        f"resumed losses within {args.resume_rtol:g} (relative) of the N-process run's": (
            result["max_rel_gap"] is not None and result["max_rel_gap"] <= args.resume_rtol
        ),
    }
    for run_dir in (written, resumed):  # a few GB of checkpoints each at the real sizes
        shutil.rmtree(run_dir)
    failed = [name for name, passed in checks.items() if not passed]
    result["ok"] = not failed
    result["error"] = "failed: " + "; ".join(failed) if failed else None
    print(f"resume check ({strategy}): {'OK' if result['ok'] else result['error']}", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------
# Tables and the JSON record


def percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.1%}"


def print_results(results: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    header = (
        "variant", "method", "GPUs", "strategy", "step ms", "tokens/s", "tokens/s/device", "efficiency", "peak GiB"
    )
    rows = [
        (
            r["variant"] if r["world_size"] > 1 else ("compiled" if r["compiled"] else "eager"),
            "atat" if r.get("atat") else "mdlm",
            str(r["world_size"]),
            r["strategy"],
            fmt(r["step_s"] * 1e3, ".1f"),
            fmt(r["tokens_per_s"], ",.0f"),
            fmt(r["tokens_per_s_per_device"], ",.0f"),
            percent(r["scaling_efficiency"]),
            fmt(r["peak_memory_gib"], ".2f"),
        )
        for r in results
    ]
    print()
    print_table(header, rows)
    if not checks:
        return
    print(
        "\nresume check (ATAT): the trainer on N processes, its half-way checkpoint resumed on 1; the losses of the\n"
        "first and last resumed steps, resumed on 1 vs continued on N, and the largest relative gap over all of them:"
    )
    header = (
        "strategy", "written on", "saved step", "loss at save", "resumed on", "resumed at", "first: on 1", "on N",
        "last: on 1", "on N", "max gap", "result",
    )
    rows = [
        (
            c["strategy"],
            str(c["written_on"]),
            str(c["saved_step"]),
            fmt(c.get("loss_at_save"), ".4f"),
            str(c.get("resumed_world_size", "n/a")),
            str(c.get("resumed_at_step", "n/a")),
            fmt(c.get("loss_first_resumed"), ".4f"),
            fmt(c.get("loss_first_continued"), ".4f"),
            fmt(c.get("loss_last_resumed"), ".4f"),
            fmt(c.get("loss_last_continued"), ".4f"),
            fmt(c.get("max_rel_gap"), ".1e"),
            "OK" if c["ok"] else "FAILED",
        )
        for c in checks
    ]
    print_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args)
        return 0
    cfg = model_config(args)
    print(
        f"DiT hidden {cfg.hidden_dim}, layers {cfg.num_layers}, heads {cfg.num_heads}; "
        f"{'ATAT (estimator, tilted masks at fixed beta0)' if args.atat else 'MDLM'} step; per device "
        f"{args.batch_size} x {args.seq_len} tokens x {args.accumulation} accumulation; {args.steps} timed steps "
        f"after {args.warmup}; torch {torch.__version__}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
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
                write_output(args, argv, results, checks)  # after every point: a run cut short keeps what it measured
        for strategy in args.resume_check or []:
            checks.append(resume_check(args, strategy, max(args.nproc), Path(tmp)))
            ok &= checks[-1]["ok"]
            write_output(args, argv, results, checks)

    print_results(results, checks)
    if args.output is not None:
        print(f"\nwrote {args.output}")
    return 0 if ok else 1


def write_output(
    args: argparse.Namespace, argv: list[str], results: list[dict[str, Any]], checks: list[dict[str, Any]]
) -> None:
    if args.output is None:
        return
    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": repo_relative(shlex.join(["python3", "benchmarks/scaling.py", *argv])),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "method": "atat" if args.atat else "mdlm",
        "args": {k: (repo_relative(str(v)) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "resume_checks": checks,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
