"""The FLOP floor of a `sample_speed.py` result: per sampler, the work its network calls did (whole sequences
through the DiT's trunk, plus each decoded token's projection) and the seconds that work takes at a peak rate.
It reads the JSON only (older results hold no FLOP counts), so it says how far any sampler making those calls
can go, for a goal such as "64 x 1024 tokens in 1000 steps within 15 s".

    python benchmarks/sampling_floor.py benchmarks/results/sample_speed_small_h100_2026-11-25.json [--peak-flops F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mdlm_atat.config import ModelConfig
from mdlm_atat.models.dit import DiT
from common import H100_BF16_DENSE_FLOPS, sampling_flops  # noqa: E402 (benchmarks/ is on sys.path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", type=Path, help="a JSON written by sample_speed.py --output")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE_FLOPS,
                   help=f"the peak rate (default {H100_BF16_DENSE_FLOPS:.0e}: H100/H200 dense bf16, datasheet)")
    args = p.parse_args(argv)
    run = json.loads(args.result.read_text())
    m = run["model"]
    cfg = ModelConfig(hidden_dim=m["hidden_dim"], num_layers=m["num_layers"], num_heads=m["num_heads"],
                      cond_dim=m["cond_dim"], mlp_ratio=m["mlp_ratio"])
    with torch.device("meta"):
        model = DiT(cfg, m["num_tokens"])
    decoded = run["batch_size"] * (run["seq_len"] - 2)  # [BOS] content [EOS]
    print(f"{args.result}: {run['device_name']}, {run['batch_size']} x {run['seq_len']} tokens, {run['steps']} steps")
    for r in run["sampling"]:
        flops = sampling_flops(model, r["num_sequence_evals"], run["seq_len"], decoded)
        print(f"  {r['sampler']}: {r['num_sequence_evals']:,} sequence evaluations, {flops / 1e15:.2f} PFLOP; "
              f"measured {r['seconds']:.1f} s ({flops / r['seconds'] / 1e12:.0f} TFLOP/s, "
              f"{100 * flops / r['seconds'] / args.peak_flops:.0f}% of peak); at {args.peak_flops / 1e12:.0f} TFLOP/s: "
              f"{flops / args.peak_flops:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
