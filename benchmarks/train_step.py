"""Time the full MDLM training step of a DiT, eager and `torch.compile`d, in one process.

One step is the trainer's own, `mdlm_atat.run.Run.train_step`, with no gradient accumulation: the step's t and
masks drawn from (seed, step), the objective's forward (uniform masking, DiT, SUBS loss) under bf16 autocast on
CUDA (fp32 on CPU), backward, `clip_grad_norm_(1.0)`, AdamW from `build_optimizer`, the (constant) LR schedule,
`zero_grad(set_to_none=True)`. The EMA (training.ema_decay=0), the non-finite guard (a host sync) and the data
loader are left out. In the `compiled` variant the DiT (and ATAT's estimator) are compiled in place, as training
compiles them (training.compile); the loss (boolean indexing over the masked rows) stays eager.

`--loss` picks how the SUBS loss meets the output layer: `fused` (the default, as training) hands the masked
rows' targets and weights to the DiT, whose output layer computes the loss and its gradient chunk by chunk
without the (M, V) logits (diffusion/fused_loss.py); `rows` projects the masked rows to (M, V) logits and takes
the loss from them; `full` projects every position to (B, L, V) logits (the plain path; `--full-logits` is an
alias).

Reported per variant: median step time, tokens/s = batch * seq_len / median step time, peak GPU memory, the
parameter count, and MFU = achieved FLOP/s / --peak-flops, with

    FLOP per token per training step = 6 * N_matmul + 12 * num_layers * seq_len * hidden_dim

N_matmul counts the weights every token is multiplied by: per block attn_qkv (3 D^2), attn_out (D^2) and the two
MLP weights (2 * mlp_ratio * D^2), plus the output layer (D * num_tokens). 6 = 2 FLOP per multiply-add times 3
(the forward matmul and the two of its backward). The second term is the attention scores Q K^T and their product
with V: 4 * L * D FLOP per token per layer forward, times 3 for the backward (PaLM, Chowdhery et al. 2022,
appendix B); the attention is bidirectional, so the whole L x L is real work. The embedding lookup, adaLN (once
per sequence), norms, rotary and the loss's log-sum-exp are left out, so MFU is slightly understated.

Numerics check: before timing, each variant computes the loss of the first (seeded, identical) batch from the
same initial weights in eval mode (dropout off: eager and compiled draw dropout masks differently); compiled must
match eager within a relative 2e-2 (bf16). MDLM's output layer and adaLN start at zero, which makes that loss
(1 - eps) ln V whatever the blocks compute, so the benchmark first moves them off zero (N(0, 0.02)); that changes
no timing.

ATAT variants (`atat`, `atat-compiled`): the same step with ATAT's work added, as the trainer does it: the
importance estimator (default size: 128 wide, 2 blocks) on the clean tokens, the tilted masks (fixed beta0 = 0.5,
the hard stage), the 1/p-corrected NELBO, the rank-percentile targets and the estimator's BCE loss, one backward
for both, clipping and AdamW over both parameter groups: the same `Run.train_step`. The issue's budget: ATAT step <= 1.10 x MDLM step.

CPU smoke test (seconds):
    python benchmarks/train_step.py --device cpu --hidden-dim 64 --num-layers 2 --num-heads 2 \
        --seq-len 64 --batch-size 4 --vocab-size 1000 --steps 3 --warmup 1 --variants eager
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mdlm_atat.config import MODEL_SIZES, ModelConfig
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective, mask_draws
from mdlm_atat.diffusion.schedule import LogLinearSchedule
from mdlm_atat.models.dit import DiT, count_parameters
from mdlm_atat.run import Run, Vocab
from mdlm_atat.runtime import autocast_for, precision_name, resolve_device
from mdlm_atat.train import distributed
from common import (  # noqa: E402 (benchmarks/ is on sys.path when run as a script)
    H100_BF16_DENSE_FLOPS, fmt, matmul_parameters, model_config, move_zero_init_off_zero, peak_flops, print_profile,
    print_table, profile_calls, run_config, run_facts, synchronize, write_json,
)

VARIANTS = ("eager", "compiled", "atat", "atat-compiled")
LOSS_PATHS = ("fused", "rows", "full")
LOSS_PATH_NAMES = {
    "fused": "fused with the output layer, masked rows only (no logits)",
    "rows": "logits of the masked rows only",
    "full": "logits of every position",
}
LOSS_RTOL = 2e-2  # bf16 keeps 8 mantissa bits: ~4e-3 per rounding
NUM_DISTINCT_BATCHES = 4  # cycled, so that no step reuses the previous step's masks
FLOPS_FORMULA = (
    "6 * N_matmul + 12 * num_layers * seq_len * hidden_dim per token per training step; "
    "N_matmul = blocks' attn_qkv + attn_out + mlp weights + output layer weight"
)


# ATAT at the hard stage's tilt from the first step: beta = +beta0 fixed, no uniform-masking warm-up.
ATAT_OVERRIDES = ("curriculum.variant=none", "atat.estimator_warmup_steps=0")


@dataclass
class Batch:
    x0: torch.Tensor  # (B, L) clean tokens in [0, vocab_size)
    t: torch.Tensor  # (B,) diffusion times, stratified as in training (the loss check's; a step draws its own)
    uniform_noise: torch.Tensor  # (B, L) in [0, 1): which tokens get masked


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(MODEL_SIZES), help="preset (hidden, layers, heads); default small")
    p.add_argument("--hidden-dim", type=int, help="overrides the preset's")
    p.add_argument("--num-layers", type=int, help="overrides the preset's")
    p.add_argument("--num-heads", type=int, help="overrides the preset's")
    p.add_argument("--cond-dim", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1, help="MDLM trains with 0.1")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50257, help="real tokens; MASK is appended (GPT-2: 50257)")
    p.add_argument("--pad-vocab-multiple", type=int, default=ModelConfig.pad_vocab_multiple,
                   help="model.pad_vocab_multiple: vocabulary rows padded to a multiple of this (1: none)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--variants", default="eager,compiled", help="comma-separated: eager, compiled")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--peak-flops",
        type=float,
        help=f"device peak FLOP/s for MFU; default {H100_BF16_DENSE_FLOPS:.0e} (H100 bf16) on CUDA, none on CPU",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--loss",
        choices=LOSS_PATHS,
        default="fused",
        help="fused: the loss fused with the output layer, as training; rows: (M, V) logits of the masked rows; "
        "full: (B, L, V) logits of every position",
    )
    p.add_argument("--full-logits", dest="loss", action="store_const", const="full", help="alias of --loss full")
    p.add_argument(
        "--sdpa",
        choices=("default", "cudnn", "flash", "efficient", "math"),
        default="default",
        help="restrict scaled_dot_product_attention to one backend (default: PyTorch's choice)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile N more steps (torch.profiler) and report each variant's top kernels by time",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=0,
        metavar="LIMIT",
        help="CUDA only: after timing, find each variant's largest batch (sequences of --seq-len) whose training "
        "step fits in memory, doubling from --batch-size up to LIMIT, then bisecting to a multiple of 8",
    )
    p.add_argument(
        "--start-with",
        type=int,
        default=1,
        metavar="N",
        help="jobs sharing the device: after its warm-up each waits for N jobs in --barrier-dir before timing, so "
        "their timed windows overlap (benchmarks/shared_gpu.py combines them)",
    )
    p.add_argument("--barrier-dir", type=Path, help="the folder the --start-with jobs meet in (one file each)")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.start_with > 1 and args.barrier_dir is None:
        p.error("--start-with: needs --barrier-dir, the folder the jobs meet in")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if args.max_batch and args.device == "cpu":
        p.error("--max-batch: needs a CUDA device (it searches for the batch that runs out of GPU memory)")
    for name in ("batch_size", "seq_len", "steps", "pad_vocab_multiple"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.warmup < 0:
        p.error("--warmup: must be >= 0")
    return args


def flops_per_token(model: DiT, cfg: ModelConfig, seq_len: int) -> int:
    return 6 * matmul_parameters(model) + 12 * cfg.num_layers * seq_len * cfg.hidden_dim


def make_batches(
    objective: MaskedDiffusionObjective, args: argparse.Namespace, device: torch.device
) -> list[Batch]:
    """Random tokens (not zeros: they could take faster paths) from a seeded CPU generator, same on any device."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(NUM_DISTINCT_BATCHES):
        x0 = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        t = objective.sample_t(args.batch_size, "cpu", gen)
        noise = mask_draws((args.batch_size, args.seq_len), generator=gen)
        batches.append(Batch(x0.to(device), t.to(device), noise.to(device)))
    return batches


def build_run(variant: str, reference: DiT, cfg: ModelConfig, objective: MaskedDiffusionObjective,
              args: argparse.Namespace, device: torch.device) -> Run:
    """The trainer's run (mdlm_atat.run.Run) for a variant: the reference's weights, the chosen loss path, constant
    LR, no EMA; ATAT's estimator (with a made-up unigram table) for the atat variants."""
    atat = variant.startswith("atat")
    run_cfg = run_config(cfg, [
        f"data.batch_size={args.batch_size}", f"data.max_length={args.seq_len}", f"atat.enabled={atat}",
        *(ATAT_OVERRIDES if atat else ()), f"training.compile={variant.endswith('compiled')}",
        "training.warmup_steps=0", "training.ema_decay=0", "training.mixed_precision=bf16", f"training.seed={args.seed}",
    ])
    counts = torch.randint(0, 1000, (args.vocab_size,), generator=torch.Generator().manual_seed(args.seed))
    vocab = Vocab(num_tokens=args.vocab_size + 1, mask_id=args.vocab_size)  # MASK is the last id
    run = Run.build(run_cfg, vocab, distributed.DistEnv(device=device), counts if atat else None, objective=objective)
    run.model.load_state_dict(reference.state_dict())  # every variant starts from the same weights
    return run


@torch.no_grad()
def check_loss(model, objective, batch: Batch, autocast) -> float:
    """The first batch's loss in eval mode (no dropout), for comparing variants."""
    was_training = model.training
    model.eval()
    with autocast:
        loss = objective(model, batch.x0, t=batch.t, uniform_noise=batch.uniform_noise).loss
    model.train(was_training)
    return loss.item()


class StepTimer:
    """Per-step wall time: CUDA events on the GPU (no sync inside the loop), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[tuple[Any, Any]] = []

    def start(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((event, None))
        else:
            self.marks.append((time.perf_counter(), None))

    def stop(self) -> None:
        begin, _ = self.marks[-1]
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.marks[-1] = (begin, end)

    def seconds(self) -> list[float]:
        if self.cuda:
            synchronize(self.device)
            return [begin.elapsed_time(end) / 1e3 for begin, end in self.marks]
        return [end - begin for begin, end in self.marks]


def wait_for_jobs(folder: Path, jobs: int, name: str, timeout_s: float = 600.0) -> None:
    """Leave a file named `name` in `folder`, then wait until `jobs` files are there (each job's)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).touch()
    deadline = time.monotonic() + timeout_s
    while sum(1 for _ in folder.iterdir()) < jobs:
        if time.monotonic() > deadline:
            raise SystemExit(f"--start-with {jobs}: only {sum(1 for _ in folder.iterdir())} jobs reached "
                             f"{folder} within {timeout_s:.0f} s; start the others with the same --barrier-dir")
        time.sleep(0.05)


def run_variant(
    variant: str,
    reference: DiT,
    cfg: ModelConfig,
    objective: MaskedDiffusionObjective,
    batches: list[Batch],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    torch._dynamo.reset()  # drop an earlier variant's compiled graphs and what they hold on to
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed)  # same dropout stream start for each variant
    run = build_run(variant, reference, cfg, objective, args, device)
    module, model = run.model, run.parallel.model
    autocast = autocast_for(device, "bf16")

    clock = time.perf_counter()
    loss_first_batch = check_loss(model, objective, batches[0], autocast)
    check_s = time.perf_counter() - clock  # includes compiling the eval graph

    model.train()
    losses = []

    def step(i: int) -> None:
        losses.append(run.train_step(iter([batches[i % len(batches)].x0]), autocast).nelbo)

    first_step_s = None
    for i in range(args.warmup):
        clock = time.perf_counter()
        step(i)
        if i == 0:
            synchronize(device)
            first_step_s = time.perf_counter() - clock  # includes compiling the training graphs
    synchronize(device)
    if args.start_with > 1:
        wait_for_jobs(args.barrier_dir / variant, args.start_with, str(os.getpid()))

    timer = StepTimer(device)
    timed_from = time.time()
    for i in range(args.warmup, args.warmup + args.steps):
        timer.start()
        step(i)
        timer.stop()
    step_s = timer.seconds()
    timed_window = [timed_from, time.time()]  # wall clock (Unix s): whether jobs sharing the device overlapped
    losses_cpu = torch.stack(losses).float().cpu()

    median_s = statistics.median(step_s)
    tokens_per_step = args.batch_size * args.seq_len
    tokens_per_s = tokens_per_step / median_s
    flops = flops_per_token(module, cfg, args.seq_len)
    peak = peak_flops(args, device)
    result = {
        "variant": variant,
        "median_step_s": median_s,
        "min_step_s": min(step_s),
        "max_step_s": max(step_s),
        "step_s": step_s,
        "timed_window": timed_window,
        "tokens_per_s": tokens_per_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "num_parameters": count_parameters(module),
        "num_matmul_parameters": matmul_parameters(module),
        "achieved_flops_per_s": flops * tokens_per_s,
        "mfu": flops * tokens_per_s / peak if peak else None,
        "first_step_s": first_step_s,
        "check_s": check_s,
        "loss_first_batch": loss_first_batch,
        "losses_finite": bool(torch.isfinite(losses_cpu).all()),
        "last_loss": float(losses_cpu[-1]),
    }
    if args.profile:
        start = args.warmup + args.steps
        result["profile"] = profile_calls(step, range(start, start + args.profile), device)
    if args.max_batch and device.type == "cuda":

        def probe(batch_size: int) -> float | None:
            """Peak GiB of two training steps at this batch size, or None when they run out of memory."""
            probe_args = argparse.Namespace(**{**vars(args), "batch_size": batch_size})
            data = dataclasses.replace(run.cfg.data, batch_size=batch_size)
            probe_run = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, data=data))  # same modules
            try:
                batch = make_batches(objective, probe_args, device)[0]
                torch.cuda.reset_peak_memory_stats(device)
                for _ in range(2):
                    probe_run.train_step(iter([batch.x0]), autocast)
                synchronize(device)
                return torch.cuda.max_memory_allocated(device) / 2**30
            except torch.OutOfMemoryError:
                run.optimizer.zero_grad(set_to_none=True)
                return None
            finally:
                batch = None
                gc.collect()
                torch.cuda.empty_cache()

        result["largest_batch"] = largest_batch(probe, args.batch_size, args.max_batch)
    return result


def largest_batch(probe, start: int, limit: int, multiple: int = 8) -> dict[str, Any]:
    """The largest batch size <= limit for which `probe(batch_size)` returns a peak memory (not None).

    Doubles from `start` until a probe fails or `limit` is passed, then bisects between the last size that fit
    and the first that did not, down to a step of `multiple`. Assumes memory grows with the batch size.
    """
    tried: dict[int, float | None] = {}
    fits, fails = None, None
    size = start
    while size <= limit:
        tried[size] = probe(size)
        if tried[size] is None:
            fails = size
            break
        fits, size = size, size * 2
    if fits is not None and fails is None and fits < limit:  # the doubling stepped past the limit: try it
        tried[limit] = probe(limit)
        fits, fails = (limit, None) if tried[limit] is not None else (fits, limit)
    while fits is not None and fails is not None and fails - fits > multiple:
        middle = max(fits + multiple, (fits + fails) // 2 // multiple * multiple)
        if middle >= fails:
            break
        tried[middle] = probe(middle)
        fits, fails = (middle, fails) if tried[middle] is not None else (fits, middle)
    return {
        "largest": fits,
        "peak_memory_gib": tried.get(fits) if fits is not None else None,
        "smallest_failing": fails,  # None: everything up to the limit fitted
        "limit": limit,
        "probes": [{"batch_size": b, "peak_memory_gib": m} for b, m in sorted(tried.items())],
    }


def sdpa_backend(name: str):
    """A context restricting SDPA to one backend, or nothing for PyTorch's own choice."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def print_results(results: list[dict[str, Any]]) -> None:
    header = ("variant", "step ms", "tokens/s", "peak GiB", "params M", "MFU %", "1st step s", "loss[0]")
    rows = [
        (
            r["variant"],
            fmt(r["median_step_s"] * 1e3, ".2f"),
            fmt(r["tokens_per_s"], ",.0f"),
            fmt(r["peak_memory_gib"], ".2f"),
            fmt(r["num_parameters"] / 1e6, ".2f"),
            fmt(r["mfu"] * 100 if r["mfu"] is not None else None, ".1f"),
            fmt(r["first_step_s"], ".2f"),
            fmt(r["loss_first_batch"], ".5f"),
        )
        for r in results
    ]
    print_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, size_label = model_config(args, args.dropout)
    device = resolve_device(args.device)
    num_tokens = args.vocab_size + 1  # MASK is the last id
    objective = MaskedDiffusionObjective(
        LogLinearSchedule(1e-3), mask_id=args.vocab_size, rows_only=args.loss == "rows", fused=args.loss == "fused"
    )

    torch.manual_seed(args.seed)
    reference = DiT(cfg, num_tokens)  # built on CPU once, so every variant starts from the same weights
    move_zero_init_off_zero(reference, torch.Generator().manual_seed(args.seed))
    batches = make_batches(objective, args, device)
    flops = flops_per_token(reference, cfg, args.seq_len)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(
        f"DiT {size_label}: hidden {cfg.hidden_dim}, layers {cfg.num_layers}, heads {cfg.num_heads}, "
        f"{count_parameters(reference) / 1e6:.2f}M parameters ({matmul_parameters(reference) / 1e6:.2f}M in matmuls), "
        f"{num_tokens} tokens incl. MASK"
    )
    print(
        f"batch {args.batch_size} x seq {args.seq_len}, {args.warmup} warm-up + {args.steps} timed steps, "
        f"{precision_name(device, 'bf16')} on {device} ({device_name}), torch {torch.__version__}"
    )
    print(f"FLOP per token = {FLOPS_FORMULA} = {flops / 1e9:.3f} GFLOP")
    print(f"loss: {LOSS_PATH_NAMES[args.loss]}; SDPA backend: {args.sdpa}")

    results = []
    for variant in args.variants:
        print(f"[{variant}] running ...", flush=True)
        with sdpa_backend(args.sdpa):
            results.append(run_variant(variant, reference, cfg, objective, batches, args, device))
        results[-1].update(sdpa=args.sdpa, loss=args.loss)
        r = results[-1]
        print(f"[{variant}] loss on the first batch (eval mode): {r['loss_first_batch']:.6f}", flush=True)

    ok = all(r["losses_finite"] for r in results)
    numerics: dict[str, Any] = {"tolerance_rel": LOSS_RTOL}
    by_name = {r["variant"]: r for r in results}
    if "eager" in by_name and "compiled" in by_name:
        eager, compiled = by_name["eager"]["loss_first_batch"], by_name["compiled"]["loss_first_batch"]
        rel = abs(compiled - eager) / abs(eager)
        numerics.update(eager_loss=eager, compiled_loss=compiled, rel_diff=rel, ok=rel <= LOSS_RTOL)
        ok &= numerics["ok"]
        verdict = "OK" if numerics["ok"] else "MISMATCH"
        print(f"numerics: eager {eager:.6f}  compiled {compiled:.6f}  rel diff {rel:.2e} (tol {LOSS_RTOL}) {verdict}")
    for plain, with_atat in (("eager", "atat"), ("compiled", "atat-compiled")):
        if plain in by_name and with_atat in by_name:
            ratio = by_name[with_atat]["median_step_s"] / by_name[plain]["median_step_s"]
            numerics[f"{with_atat}_over_{plain}"] = ratio
            print(f"ATAT step / MDLM step ({plain}): {ratio:.3f} (budget 1.10)")
    if not all(r["losses_finite"] for r in results):
        print("non-finite training loss in: " + ", ".join(r["variant"] for r in results if not r["losses_finite"]))

    peak = peak_flops(args, device)
    if device.type == "cuda" and args.peak_flops is None and "H100" not in device_name and "H200" not in device_name:
        print(f"note: MFU uses the H100's bf16 peak {H100_BF16_DENSE_FLOPS:.3e}; pass --peak-flops for {device_name}")
    for r in results:
        print_profile(r.get("profile"), f"[{r['variant']}] kernels per step against the median step",
                      r["median_step_s"] * 1e3)
        if "largest_batch" in r:
            lb = r["largest_batch"]
            print(f"[{r['variant']}] largest batch that fits: {lb['largest']} x {args.seq_len} tokens "
                  f"(peak {fmt(lb['peak_memory_gib'], '.2f')} GiB; first failing: {lb['smallest_failing']}, "
                  f"limit {lb['limit']})")
    print()
    print_results(results)

    if args.output is not None:
        report = {
            **run_facts(device, device_name, precision_name(device, "bf16")),
            "model": {**vars(cfg), "size": size_label, "num_tokens": num_tokens},
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "tokens_per_step": args.batch_size * args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
            "flops_formula": FLOPS_FORMULA,
            "flops_per_token": flops,
            "peak_flops": peak,
            "numerics": numerics,
            "ok": ok,
            "results": results,
        }
        write_json(args.output, report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
