"""Sampling speed, ancestral vs ancestral-cache, and evaluation throughput of a DiT (issue 5).

Sampling: `--batch-size` sequences of `--seq-len` tokens ([BOS] content [EOS], as `atat sample` frames a packed
block) with `--steps` steps of `mdlm_atat.diffusion.samplers.generate`, for each sampler of `--samplers`, from
the same seed. Reported per sampler: seconds (wall time of the whole generation, synchronised), network calls,
sequences through the network (the cache skips unchanged sequences, so this is its real saving), sampled tokens
per second, peak GPU memory, and the speed-up of each sampler over `ancestral`. Both samplers draw the same
random numbers in the same order, so in fp32 they give the same samples; under bf16 a sub-batch can round
differently from the full batch, so the report gives the fraction of tokens that agree instead of asserting it.

Evaluation: `evaluate_bound` (the NELBO of `atat eval`: uniform masking, `--num-t` stratified t per sequence,
the SUBS loss fused with the output layer as `atat eval` computes it)
on `--eval-batches` batches of random tokens; reported as tokens scored per second (each token is scored
num_t times: forward tokens/s = num_t x that).

The model is untrained, with the zero-initialised adaLN and output layer moved off zero (N(0, 0.02)) so that
every layer does real work; without time conditioning (MDLM's default, the cache's condition). Which positions
unmask at each step does not depend on the model, so the cache's saving is that of a trained model too.

CPU smoke test (seconds; its timings mean nothing):
    python benchmarks/sample_speed.py --device cpu --hidden-dim 64 --num-layers 2 --num-heads 2 \\
        --seq-len 64 --batch-size 4 --steps 50 --vocab-size 1000 --eval-batches 2

On a GPU (the issue's shape: small DiT, GPT-2 vocabulary, 64 x 1024 tokens, 1000 steps; add --compile for the
compiled blocks, as `atat sample --compile` and `atat eval --compile` have them, in sampling and evaluation):
    python benchmarks/sample_speed.py --size small --batch-size 64 --seq-len 1024 --steps 1000 \\
        --output benchmarks/results/sample_speed_small.json
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mdlm_atat.config import MODEL_SIZES
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective
from mdlm_atat.diffusion.samplers import generate
from mdlm_atat.diffusion.schedule import LogLinearSchedule
from mdlm_atat.eval.likelihood import evaluate_bound
from mdlm_atat.models.dit import DiT, count_parameters
from mdlm_atat.runtime import autocast_for, precision_name, resolve_device
from common import (  # noqa: E402 (benchmarks/ is on sys.path when run as a script)
    H100_BF16_DENSE_FLOPS, fmt, forward_flops_per_sequence, model_config, move_zero_init_off_zero, peak_flops,
    print_profile, print_table, profile_calls, run_facts, sampling_flops, synchronize, write_json,
)

SAMPLERS = ("ancestral", "ancestral-cache", "confidence")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(MODEL_SIZES), help="preset (hidden, layers, heads); default small")
    p.add_argument("--hidden-dim", type=int, help="overrides the preset's")
    p.add_argument("--num-layers", type=int, help="overrides the preset's")
    p.add_argument("--num-heads", type=int, help="overrides the preset's")
    p.add_argument("--cond-dim", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64, help="sequences sampled at once")
    p.add_argument("--seq-len", type=int, default=1024, help="L, framing included")
    p.add_argument("--vocab-size", type=int, default=50257, help="real tokens; MASK is appended (GPT-2: 50257)")
    p.add_argument("--steps", type=int, default=1000, help="sampling steps")
    p.add_argument("--samplers", default="ancestral,ancestral-cache", help=f"comma-separated: {', '.join(SAMPLERS)}")
    p.add_argument("--eval-batches", type=int, default=8, help="batches for the evaluation throughput (0: skip)")
    p.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    p.add_argument("--num-t", type=int, default=4, help="stratified t per sequence in the evaluation (atat eval's default)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast on CUDA; CPU is fp32")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT's trunk (embedding and blocks; dynamic shapes, since the cache passes "
        "sub-batches of varying size), as `atat sample/eval --compile`: sampling and evaluation; the output layer "
        "stays eager",
    )
    p.add_argument("--peak-flops", type=float,
                   help=f"device peak FLOP/s for MFU and the floor; default {H100_BF16_DENSE_FLOPS:.0e} (H100 bf16) on "
                        "CUDA, none on CPU")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing the evaluation, profile N more of its batches (torch.profiler): the top kernels")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    for s in args.samplers:
        if s not in SAMPLERS:
            p.error(f"--samplers: unknown sampler {s!r}; choose from {', '.join(SAMPLERS)}")
    for name in ("batch_size", "steps", "num_t"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.seq_len < 3:
        p.error("--seq-len: must be >= 3 (BOS, content, EOS)")
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    return args


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_sampler(sampler: str, model: DiT, args, device, autocast, mask_id: int, bos: int, eos: int) -> tuple[dict, torch.Tensor]:
    content = args.seq_len - 2
    canvas = torch.full((args.batch_size, content), mask_id, dtype=torch.long, device=device)
    kwargs = dict(sampler=sampler, schedule=LogLinearSchedule(1e-3), mask_id=mask_id, head=[bos], tail=[eos],
                  autocast=autocast)
    # Warm-up (kernels, allocator): a 2-step run, untimed.
    generate(model, canvas, num_steps=2, generator=torch.Generator(device=device).manual_seed(args.seed), **kwargs)
    reset_memory(device)
    synchronize(device)
    clock = time.perf_counter()
    out = generate(model, canvas, num_steps=args.steps,
                   generator=torch.Generator(device=device).manual_seed(args.seed), **kwargs)
    synchronize(device)
    seconds = time.perf_counter() - clock
    # The trunk's work (what the cache saves is whole sequences of it) plus projecting each decoded token; the
    # floor is that work at the peak rate: how far any sampler of these network calls can go.
    flops = sampling_flops(model, out.num_sequence_evals, args.seq_len, args.batch_size * content)
    peak = peak_flops(args, device)
    result = {
        "sampler": sampler,
        "seconds": seconds,
        "forward_flops": flops,
        "achieved_flops_per_s": flops / seconds,
        "mfu": flops / seconds / peak if peak else None,
        "seconds_at_peak": flops / peak if peak else None,
        "num_network_calls": out.num_network_calls,
        "num_sequence_evals": out.num_sequence_evals,
        "cache": out.cache,
        "sampled_tokens_per_s": args.batch_size * content / seconds,
        "peak_memory_gib": peak_gib(device),
        "mask_left": int((out.tokens == mask_id).sum()),
    }
    return result, out.tokens.cpu()


def run_eval(model: DiT, args, device, autocast, mask_id: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [torch.randint(0, args.vocab_size, (args.eval_batch_size, args.seq_len), generator=gen)
               for _ in range(args.eval_batches)]
    # As `atat eval` scores (run.make_objective): the loss fused with the output layer, no (M, V) logits.
    objective = MaskedDiffusionObjective(LogLinearSchedule(1e-3), mask_id=mask_id, fused=True)

    def score(selected: list[torch.Tensor]):
        return evaluate_bound(model, objective, selected, num_t=args.num_t, device=device, autocast=autocast)

    score(batches[:1])  # warm-up
    reset_memory(device)
    synchronize(device)
    clock = time.perf_counter()
    result = score(batches)
    synchronize(device)
    seconds = time.perf_counter() - clock
    # The trunk's work only (the output layer's, on the masked rows, is left out): a lower bound on the MFU.
    flops = forward_flops_per_sequence(model, args.seq_len) * result.num_sequences * args.num_t
    peak = peak_flops(args, device)
    return {
        "seconds": seconds,
        "num_tokens": result.num_tokens,
        "num_t": args.num_t,
        "tokens_per_s": result.num_tokens / seconds,
        "forward_tokens_per_s": result.num_tokens * args.num_t / seconds,
        "trunk_flops": flops,
        "trunk_mfu": flops / seconds / peak if peak else None,
        "peak_memory_gib": peak_gib(device),
        "nelbo": result.nelbo,
        "profile": (profile_calls(lambda i: score([batches[i % len(batches)]]), range(args.profile), device)
                    if args.profile else None),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, size_label = model_config(args, 0.0)
    device = resolve_device(args.device)
    mask_id = args.vocab_size  # MASK is the last id
    bos = eos = 0
    torch.manual_seed(args.seed)
    model = DiT(cfg, args.vocab_size + 1)
    move_zero_init_off_zero(model, torch.Generator().manual_seed(args.seed))
    model.to(device).eval()
    if args.compile:
        model.compile_blocks()  # as `atat sample --compile` and `atat eval --compile`: sampling and evaluation
    autocast = autocast_for(device, args.precision)
    precision = precision_name(device, args.precision)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(
        f"DiT {size_label}: hidden {cfg.hidden_dim}, layers {cfg.num_layers}, heads {cfg.num_heads}, "
        f"{count_parameters(model) / 1e6:.2f}M parameters, {args.vocab_size + 1} tokens incl. MASK, no time conditioning"
    )
    print(f"sampling {args.batch_size} x {args.seq_len} tokens, {args.steps} steps; {precision} on {device} "
          f"({device_name}), torch {torch.__version__}", flush=True)

    results, samples = [], {}
    for sampler in args.samplers:
        print(f"[{sampler}] running ...", flush=True)
        result, tokens = run_sampler(sampler, model, args, device, autocast, mask_id, bos, eos)
        results.append(result)
        samples[sampler] = tokens
    base = next((r for r in results if r["sampler"] == "ancestral"), None)
    for r in results:
        r["speedup_vs_ancestral"] = base["seconds"] / r["seconds"] if base else None
        if base is not None and r["sampler"] == "ancestral-cache":
            r["tokens_equal_to_ancestral"] = float((samples[r["sampler"]] == samples["ancestral"]).double().mean())

    header = ("sampler", "seconds", "net calls", "seq evals", "tokens/s", "speed-up", "peak GiB", "MFU %", "s at peak")
    rows = [(r["sampler"], fmt(r["seconds"], ".2f"), str(r["num_network_calls"]), str(r["num_sequence_evals"]),
             fmt(r["sampled_tokens_per_s"], ",.0f"), fmt(r["speedup_vs_ancestral"], ".2f"),
             fmt(r["peak_memory_gib"], ".2f"), fmt(r["mfu"] and 100 * r["mfu"], ".1f"),
             fmt(r["seconds_at_peak"], ".2f")) for r in results]
    print()
    print_table(header, rows)
    for r in results:
        if "tokens_equal_to_ancestral" in r:
            print(f"ancestral-cache vs ancestral, same seed: {100 * r['tokens_equal_to_ancestral']:.2f}% of tokens equal")
        if r["mask_left"]:
            print(f"ERROR: {r['sampler']} left {r['mask_left']} MASK tokens")

    evaluation = None
    if args.eval_batches > 0:
        print(f"\n[eval] {args.eval_batches} x {args.eval_batch_size} x {args.seq_len} tokens, num_t {args.num_t} ...",
              flush=True)
        evaluation = run_eval(model, args, device, autocast, mask_id)
        print(f"eval: {evaluation['tokens_per_s']:,.0f} tokens/s scored ({evaluation['forward_tokens_per_s']:,.0f} "
              f"forward tokens/s at num_t {args.num_t}), {evaluation['seconds']:.2f} s, "
              f"peak {fmt(evaluation['peak_memory_gib'], '.2f')} GiB, trunk MFU "
              f"{fmt(evaluation['trunk_mfu'] and 100 * evaluation['trunk_mfu'], '.1f')}%")
        print_profile(evaluation["profile"], f"[eval] kernels per batch of {args.eval_batch_size}",
                      evaluation["seconds"] / args.eval_batches * 1e3)

    ok = all(r["mask_left"] == 0 for r in results)
    if args.output is not None:
        report = {
            **run_facts(device, device_name, precision),
            "model": {**vars(cfg), "size": size_label, "num_tokens": args.vocab_size + 1,
                      "num_parameters": count_parameters(model)},
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "seed": args.seed,
            "compiled": args.compile,
            "sampling": results,
            "eval": evaluation,
            "ok": ok,
        }
        write_json(args.output, report)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
