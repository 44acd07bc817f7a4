"""Combined training throughput of jobs that shared one device: `train_step.py` runs started together with
`--start-with N --barrier-dir DIR` (each waits for the others after its warm-up, so the timed windows overlap).

    python benchmarks/shared_gpu.py A.json B.json [--output combined.json]

Combined tokens/s = every job's timed tokens over the wall time from the first job's start to the last one's end
(a job that finishes early leaves the device to the others for the rest: the figure counts that as shared time).
Each job's own median rate and how much of its window the others overlapped are printed beside it; windows that
overlap less than --min-overlap of each job's are refused, since their sum would not be a shared-device rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import print_table, shown_command, write_json


def combine(reports: list[dict[str, Any]], min_overlap: float) -> dict[str, Any]:
    """The combined rate of one timed variant per report (the first), and each job's share of the overlap."""
    jobs = []
    for report in reports:
        r = report["results"][0]
        start, end = r["timed_window"]
        jobs.append({"variant": r["variant"], "start": start, "end": end, "tokens": report["tokens_per_step"] *
                     len(r["step_s"]), "median_tokens_per_s": r["tokens_per_s"]})
    first, last = min(j["start"] for j in jobs), max(j["end"] for j in jobs)
    overlap = max(0.0, min(j["end"] for j in jobs) - max(j["start"] for j in jobs))
    for j in jobs:
        j["overlapped"] = overlap / (j["end"] - j["start"])
    return {
        "jobs": jobs,
        "wall_s": last - first,
        "combined_tokens_per_s": sum(j["tokens"] for j in jobs) / (last - first),
        "sum_of_medians": sum(j["median_tokens_per_s"] for j in jobs),
        "ok": all(j["overlapped"] >= min_overlap for j in jobs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", type=Path, help="train_step.py JSON files, one per job")
    p.add_argument("--min-overlap", type=float, default=0.9, help="least fraction of each job's window overlapped")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    if len(args.reports) < 2:
        p.error("give two or more reports: one job alone shares nothing")
    reports = []
    for path in args.reports:
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            p.error(f"{path}: cannot read a train_step.py report ({exc})")
        if "timed_window" not in reports[-1]["results"][0]:
            p.error(f"{path}: no timed_window (written before train_step.py recorded it); run it again")
    result = combine(reports, args.min_overlap)
    print_table(("job", "variant", "median tokens/s", "window s", "overlapped"),
                [(str(path), j["variant"], f"{j['median_tokens_per_s']:,.0f}", f"{j['end'] - j['start']:.2f}",
                  f"{j['overlapped']:.0%}") for path, j in zip(args.reports, result["jobs"])])
    print(f"combined: {result['combined_tokens_per_s']:,.0f} tokens/s over {result['wall_s']:.2f} s "
          f"({len(reports)} jobs; their medians sum to {result['sum_of_medians']:,.0f})")
    if not result["ok"]:
        print(f"windows overlap less than {args.min_overlap:.0%} of a job's: not a shared-device rate; start the "
              "jobs with --start-with and one --barrier-dir")
    if args.output:
        facts = {key: reports[0].get(key) for key in ("date", "torch_version", "device_name", "precision")}
        write_json(args.output, {"command": shown_command(), **facts, "reports": [str(r) for r in args.reports],
                                 **result})
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
