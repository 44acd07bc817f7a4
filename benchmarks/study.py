"""Does ATAT help? Train MDLM and ATAT arms x seeds on the same data and tokens, score each with MDLM's uniform
NELBO bound, and write docs/results.md from what the runs wrote (issue 9).

    # on the GPU machine: every (arm, seed) job, one per GPU at a time
    python benchmarks/study.py run --out study/prose_tiny --arms mdlm,atat --seeds 0,1
    # here: the table, the curves and the conclusion, from the run folders alone
    python benchmarks/study.py report --out benchmarks/results/study_prose_tiny --doc docs/results.md

`run` trains each job with `atat train --config configs/study/prose_tiny.yaml` plus the arm's overrides (the
ablation table of docs/ablations.md) and `training.seed`, on the four prose corpora of ../shared/corpora (sotu,
brown, austen, kjv: their training splits, through a folder of links) with the GPT-2 tokenizer, then scores the
final EMA weights with `atat eval` on each corpus's validation split and zero-shot on python_docs. A job whose
eval.json exists is skipped and a job with a checkpoint is resumed, so the same command finishes a study over
several sessions. Each run folder keeps what the runs wrote: config.yaml, metrics.jsonl (the validation curve),
eval.json (bounds with the config hash, step and tokens), study.json (the exact commands and timings).

`report` reads those files only; every number in docs/results.md comes from them.

CPU smoke test (a minute; what tests/test_study.py runs):
    python benchmarks/study.py run --out /tmp/study --gpus cpu --arms mdlm,atat --seeds 0 --num-t 2 \\
        model.hidden_dim=32 model.num_layers=1 model.num_heads=2 data.max_length=64 training.total_steps=4 ...
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import os
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "study" / "prose_tiny.yaml"
PROSE = ("sotu", "brown", "austen", "kjv")  # trained on (train splits), scored on (validation splits)
ZERO_SHOT = ("python_docs",)  # scored only: never seen in training
BASELINE = "mdlm"

# Each arm is a set of overrides on the study config (docs/ablations.md); everything else is shared.
ARMS: dict[str, list[str]] = {
    "mdlm": ["atat.enabled=false"],
    "atat": [],  # the config's ATAT: importance mode full, importance masking, default curriculum, corrected loss
    "learned_only": ["atat.importance_mode=learned_only"],
    "frequency_only": ["atat.importance_mode=frequency_only"],
    "importance_none": ["atat.importance_mode=none"],
    "inverse": ["atat.masking=inverse"],
    "balanced": ["atat.masking=balanced"],
    "curriculum_early": ["curriculum.variant=early"],
    "curriculum_late": ["curriculum.variant=late"],
    "curriculum_none": ["curriculum.variant=none"],
    "focus": ["atat.correction=false"],
    "uniform_masking": ["atat.masking=uniform"],
    # The autoregressive baseline: the same blocks with causal attention, scored by its exact NLL at its best
    # validation point (best.pt).
    "ar": ["model.name=ar", "atat.enabled=false"],
    # Hypotheses about MDLM's early plateau (issue 15, goal 3), one change each against the mdlm arm.
    "mdlm_gate_open": ["atat.enabled=false", "model.gate_init=1.0"],
    "mdlm_lr_low": ["atat.enabled=false", "training.learning_rate=3e-4"],
    "mdlm_lr_high": ["atat.enabled=false", "training.learning_rate=3e-3"],
    "mdlm_no_dropout": ["atat.enabled=false", "model.dropout=0.0"],
    "mdlm_time_cond": ["atat.enabled=false", "model.time_conditioning=true"],
    "mdlm_iid_t": ["atat.enabled=false", "diffusion.antithetic=false"],
    "mdlm_warmup_long": ["atat.enabled=false", "training.warmup_steps=1000"],
    "mdlm_warmup_short": ["atat.enabled=false", "training.warmup_steps=50"],
}
SCORED_AT_BEST = {"ar"}  # arms scored at their best validation checkpoint rather than their last


class StudyError(RuntimeError):
    """A problem the user can fix (missing corpora, unknown arm, no runs to report); the message says how."""


# ----------------------------------------------------------------------------------------------------------
# run


@dataclass
class Job:
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


def cli(*args: str) -> list[str]:
    """The `atat` command, run from this checkout's sources whether or not the package is installed."""
    return [sys.executable, "-m", "mdlm_atat", *args]


def shown(cmd: list[str]) -> str:
    """A command as a reader would type it from the checkout: `python`, paths relative to the repository."""
    text = shlex.join(["python", *cmd[1:]])
    return text.replace(f"{REPO}/", "").replace(f"{REPO.parent}/shared/", "../shared/")


def subprocess_env(device: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    if device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def link_corpora(corpora: Path, data_dir: Path) -> tuple[Path, dict[str, Path]]:
    """A folder holding links to the four prose corpora (the training data) and the paths of every scored corpus."""
    prose = data_dir / "prose"
    prose.mkdir(parents=True, exist_ok=True)
    for name in PROSE:
        link = prose / f"{name}.jsonl"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((corpora / f"{name}.jsonl").resolve())
    scored = {name: prose / f"{name}.jsonl" for name in PROSE}
    scored.update({name: (corpora / f"{name}.jsonl").resolve() for name in ZERO_SHOT})
    return prose, scored


def run_logged(
    cmd: list[str], log: Path, env: dict[str, str], seconds: float | None = None
) -> tuple[int, float, bool]:
    """Run cmd with its output appended to log; after `seconds`, SIGTERM (atat train then saves and exits 0).
    -> (exit code, seconds taken, whether the time limit stopped it)."""
    clock = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {shown(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        stopped = False
        try:
            rc = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            rc, stopped = proc.wait(), True
            out.write(f"(stopped by the time limit, --train-seconds {seconds:g})\n")
    return rc, time.perf_counter() - clock, stopped


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def run_job(job: Job, device: str, args: argparse.Namespace, common: list[str], scored: dict[str, Path]) -> bool:
    run_dir = args.out / "runs" / job.name
    if (run_dir / "eval.json").is_file():
        print(f"[{job.name}] done before (eval.json exists): skipped", flush=True)
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    env = subprocess_env(device)
    device_overrides = ["training.device=cpu"] if device == "cpu" else []
    steps = [f"training.total_steps={args.steps}"] if args.steps else []
    overrides = [*common, *steps, *ARMS[job.arm], f"training.seed={job.seed}", *device_overrides, *args.overrides]
    train_cmd = cli("train", "--config", str(args.config), "--log-dir", str(run_dir), "--resume", *overrides)
    print(f"[{job.name}] training on {device} ...", flush=True)
    rc, train_s, stopped = run_logged(train_cmd, run_dir / "train.log", env, args.train_seconds)
    if rc != 0:
        print(f"[{job.name}] training failed (exit {rc}); the end of {run_dir / 'train.log'}:\n{tail(run_dir / 'train.log')}")
        return False
    # Training time over every invocation that trained this run (a run may span several calls: --resume-later).
    spent = run_dir / "train_seconds.json"
    train_s += json.loads(spent.read_text())["seconds"] if spent.is_file() else 0.0
    spent.write_text(json.dumps({"seconds": train_s}) + "\n")  # also when scoring fails next: a retry adds to it
    if stopped and args.resume_later:
        print(f"[{job.name}] stopped by --train-seconds after {train_s:.0f} s of training in all; not scored: the "
              "same command resumes it from its checkpoint", flush=True)
        return True
    entries = ",".join(f"{path}:validation" for path in scored.values())
    scored_checkpoint = run_dir / "checkpoints" / "best.pt" if job.arm in SCORED_AT_BEST else run_dir
    eval_cmd = cli(
        "eval", "--checkpoint", str(scored_checkpoint), "--datasets", entries, "--num-t", str(args.num_t),
        "--device", "cpu" if device == "cpu" else "cuda", "--max-batches", str(args.max_batches),
        "--output", str(run_dir / "eval.partial.json"),
    )
    print(f"[{job.name}] trained in {train_s:.0f} s; scoring ...", flush=True)
    rc, eval_s, _ = run_logged(eval_cmd, run_dir / "eval.log", env)
    if rc != 0:
        print(f"[{job.name}] evaluation failed (exit {rc}); the end of {run_dir / 'eval.log'}:\n{tail(run_dir / 'eval.log')}")
        return False
    record = {
        "arm": job.arm,
        "seed": job.seed,
        "arm_overrides": ARMS[job.arm],
        "device": device_name(device),
        "torch": torch_version(),
        "date": datetime.date.today().isoformat(),
        "train_seconds": round(train_s, 1),
        "train_seconds_limit": args.train_seconds,
        "eval_seconds": round(eval_s, 1),
        "train_command": shown(train_cmd),
        "eval_command": shown(eval_cmd),
        "scored": {name: str(path) for name, path in scored.items()},
    }
    (run_dir / "study.json").write_text(json.dumps(record, indent=2) + "\n")
    (run_dir / "eval.partial.json").replace(run_dir / "eval.json")  # last: marks the job done
    print(f"[{job.name}] done: train {train_s:.0f} s, eval {eval_s:.0f} s", flush=True)
    return True


def device_name(device: str) -> str:
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(int(device))


def torch_version() -> str:
    import torch

    return torch.__version__


def visible_gpus() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] or ["cpu"]


def cmd_run(args: argparse.Namespace) -> int:
    unknown = [arm for arm in args.arms if arm not in ARMS]
    if unknown:
        raise StudyError(f"--arms: unknown arm {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if not args.config.is_file():
        raise StudyError(f"--config {args.config}: no such file")
    missing = [name for name in (*PROSE, *ZERO_SHOT) if not (args.corpora / f"{name}.jsonl").is_file()]
    if missing:
        raise StudyError(
            f"--corpora {args.corpora}: no {', '.join(m + '.jsonl' for m in missing)} there; pass the folder of the "
            "offline corpora (../shared/corpora beside the checkout)"
        )
    tokenizer = []  # else the config's data.tokenizer (e.g. a BPE trained on the training split)
    if args.tokenizer is not None:
        if not (args.tokenizer / "vocab.json").is_file():
            raise StudyError(f"--tokenizer {args.tokenizer}: no GPT-2 vocab.json there; pass ../shared/tokenizers/gpt2")
        tokenizer = [f"data.tokenizer={args.tokenizer.resolve()}"]
    args.out.mkdir(parents=True, exist_ok=True)
    prose, scored = link_corpora(args.corpora, args.out / "data")
    cache = args.out / "cache"
    common = [f"data.dataset_name={prose}", f"data.cache_dir={cache}", *tokenizer]
    devices = args.gpus or visible_gpus()

    # Tokenize every corpus once before the jobs start, so that parallel jobs only read the stores.
    prepare = cli(
        "prepare", "--config", str(args.config), "--datasets", ",".join([str(prose), *map(str, scored.values())]),
        "--splits", "train,validation", "--no-progress", *common, *args.overrides,
    )
    rc, prepare_s, _ = run_logged(prepare, args.out / "prepare.log", subprocess_env("cpu"))
    if rc != 0:
        raise StudyError(f"tokenizing the corpora failed; the end of {args.out / 'prepare.log'}:\n{tail(args.out / 'prepare.log')}")
    print(
        f"stores ready in {prepare_s:.0f} s; {len(args.arms) * len(args.seeds)} jobs on {', '.join(devices)}, "
        f"{args.jobs_per_gpu} at a time on each",
        flush=True,
    )

    jobs: queue.Queue[Job] = queue.Queue()
    for seed in args.seeds:  # seed-major: an interrupted study holds whole seeds of every arm
        for arm in args.arms:
            jobs.put(Job(arm, seed))
    failed: list[str] = []

    def worker(device: str) -> None:
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                return
            if not run_job(job, device, args, common, scored):
                failed.append(job.name)

    threads = [threading.Thread(target=worker, args=(device,)) for device in devices for _ in range(args.jobs_per_gpu)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log = args.out / "study_run.json"  # every invocation of `run` on this study folder, in order
    invocations = json.loads(log.read_text())["invocations"] if log.is_file() else []
    invocations.append({
        "command": shown([sys.executable, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "devices": [device_name(d) for d in devices],
        "jobs_per_gpu": args.jobs_per_gpu,
        "failed": failed,
    })
    log.write_text(json.dumps({"invocations": invocations}, indent=2) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)} (their logs are in the run folders); the same command retries them")
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------
# report


@dataclass
class Run:
    arm: str
    seed: int
    folder: Path
    study: dict[str, Any]
    evals: dict[str, dict[str, Any]]  # corpus name -> atat eval's JSON
    curve: tuple[list[float], list[float]]  # (tokens seen, validation NELBO) of the trainer's evaluations
    records: Any = None

    @functools.cached_property
    def config(self) -> tuple[str, dict[str, Any]]:
        """(the run's saved config.yaml text, the config) as the run wrote it; read once."""
        import yaml

        path = self.folder / "config.yaml"
        text = path.read_text() if path.is_file() else ""
        return text, (yaml.safe_load(text) if text else {})

    def nelbo(self, corpus: str) -> float:
        return self.evals[corpus]["nelbo"]

    @property
    def prose_nelbo(self) -> float:
        """The four prose corpora together: their NELBOs weighted by scored tokens (a pooled bound per token)."""
        num = sum(self.evals[c]["nelbo"] * self.evals[c]["num_tokens"] for c in PROSE)
        return num / sum(self.evals[c]["num_tokens"] for c in PROSE)

    @property
    def tokens(self) -> int:
        return self.evals[PROSE[0]]["tokens_seen"]

    @functools.cached_property
    def plateau_exit(self) -> float | None:
        """Training tokens at which the trainer-side bound first fell below PLATEAU_EXIT (None: never)."""
        return crossing(self.curve, PLATEAU_EXIT)


def load_runs(out: Path) -> list[Run]:
    sys.path.insert(0, str(REPO / "src"))
    from mdlm_atat.viz.report import read_metrics

    runs = []
    for study_file in sorted((out / "runs").glob("*/study.json")):
        folder = study_file.parent
        eval_file = folder / "eval.json"
        if not eval_file.is_file():
            continue
        study = json.loads(study_file.read_text())
        raw = json.loads(eval_file.read_text())
        evals = {Path(entry.rsplit(":", 1)[0]).stem: result for entry, result in raw.items()}
        missing = [c for c in (*PROSE, *ZERO_SHOT) if c not in evals]
        if missing:
            raise StudyError(f"{eval_file}: no result for {', '.join(missing)}; re-run its job")
        records = read_metrics(folder)
        steps, values = records.series("val", "val_nelbo")
        curve = (records.tokens_at(steps), values)
        runs.append(Run(study["arm"], study["seed"], folder, study, evals, curve, records))
    if not runs:
        raise StudyError(f"{out}/runs: no finished run (a folder with study.json and eval.json); run the study first")
    return runs


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_mean_sd(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if not math.isnan(v)]  # NaN: undefined (a Spearman rho of constant importance)
    if not values:
        return "undefined"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def crossing(curve: tuple[list[float], list[float]], target: float) -> float | None:
    """Tokens at which a validation curve first reaches `target` (linear between evaluations), or None."""
    tokens, values = curve
    for i, (x, y) in enumerate(zip(tokens, values)):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = tokens[i - 1], values[i - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
    return None


def by_arm(runs: list[Run]) -> dict[str, list[Run]]:
    arms: dict[str, list[Run]] = {}
    for arm in ARMS:  # the order of ARMS: baseline first
        chosen = sorted((r for r in runs if r.arm == arm), key=lambda r: r.seed)
        if chosen:
            arms[arm] = chosen
    return arms


def plot_curves(arms: dict[str, list[Run]], path: Path, weights: str) -> None:
    """Every run's validation curve, one colour per arm and one line style per seed; the legend names the arms
    (and the seeds while few runs are drawn), outside the axes so that many arms do not cover the curves."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    num_runs = sum(len(rs) for rs in arms.values())
    per_seed = num_runs <= 16
    palette = colormaps["tab10" if len(arms) <= 10 else "tab20"]
    fig = Figure(figsize=(12.0, 4.2), dpi=100, layout="constrained")
    full, zoom = fig.subplots(1, 2)
    for i, (arm, runs) in enumerate(arms.items()):
        for ax in (full, zoom):
            for j, run in enumerate(runs):
                tokens, values = run.curve
                label = None
                if ax is full and per_seed:
                    label = f"{arm} (seed {run.seed})"
                elif ax is full and j == 0:
                    label = f"{arm} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
                ax.plot([t / 1e6 for t in tokens], values, color=palette(i), alpha=0.85,
                        linestyle=("-", "--", ":", "-.")[j % 4], label=label)
    last = [v for runs in arms.values() for r in runs for v in r.curve[1][len(r.curve[1]) // 2:]]
    if last:
        zoom.set_ylim(min(last) - 0.02, max(last) + 0.02)
        zoom.set_xlim(max(r.curve[0][len(r.curve[0]) // 2] for runs in arms.values() for r in runs) / 1e6, None)
    full.set_title(f"Prose validation bound during training, {weights}", fontsize=10)
    zoom.set_title("Second half, zoomed", fontsize=10)
    for ax in (full, zoom):
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("NELBO, nats per token")
        ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


# Two-sided 97.5% quantiles of Student's t by degrees of freedom (beyond the table, the normal's 1.96).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}
CONVERGED = 0.01  # nats: a run has converged when its bound moved less than this over its last 10% of tokens
PLATEAU_EXIT = 6.0  # nats: the bound first below this has left the unigram-level plateau (about 6.7 on prose)


def mean_ci(values: list[float]) -> tuple[float, float | None, float | None]:
    """Mean, standard error and 95% half-width (Student's t) of values; None for the spread of a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    se = statistics.stdev(values) / math.sqrt(len(values))
    return mean, se, T975.get(len(values) - 1, 1.96) * se


def paired(runs: list[Run], base: list[Run], value) -> list[float]:
    """value(run, base_run) for each seed both arms have: same initial weights and data order."""
    base_by_seed = {r.seed: r for r in base}
    return [value(r, base_by_seed[r.seed]) for r in runs if r.seed in base_by_seed]


def verdict(arm: str, runs: list[Run], base: list[Run]) -> tuple[str, float, float | None]:
    """A plain sentence on arm vs the baseline's pooled prose bound: the mean paired difference and its standard
    error over seeds (pairs share initial weights and data order)."""
    diffs = paired(runs, base, lambda r, b: r.prose_nelbo - b.prose_nelbo)
    if not diffs:
        return f"{arm} shares no seed with MDLM: no paired comparison", math.nan, None
    diff, se, _ = mean_ci(diffs)
    direction = "lower (better)" if diff < 0 else "higher (worse)"
    text = (f"{arm}'s pooled prose bound is {abs(diff):.4f} nats per token {direction} than MDLM's over "
            f"{len(diffs)} paired seeds (perplexity bound {(math.exp(diff) - 1) * 100:+.2f}%)")
    if se is None:
        text += "; one seed, so no spread to compare it with"
    elif abs(diff) > 2 * se:
        text += f", more than twice the standard error of the paired difference ({se:.4f})"
    else:
        text += f", within twice the standard error of the paired difference ({se:.4f}): no measurable difference"
    return text, diff, se


def last_tenth_movement(curve: tuple[list[float], list[float]]) -> float | None:
    """How much the bound fell over the last 10% of a run's tokens (linear between evaluations), or None."""
    tokens, values = curve
    if len(tokens) < 2:
        return None
    at = 0.9 * tokens[-1]
    for (x0, y0), (x1, y1) in zip(zip(tokens, values), zip(tokens[1:], values[1:])):
        if x0 <= at <= x1:
            return y0 + (y1 - y0) * (at - x0) / (x1 - x0) - values[-1]
    return None


def describe_setting(cfg: dict[str, Any]) -> str:
    d, m, t = cfg.get("data", {}), cfg.get("model", {}), cfg.get("training", {})
    tokenizer = d.get("tokenizer", "?")
    if tokenizer == "bpe":
        tokenizer = f"a {d.get('tokenizer_vocab_size'):,}-token BPE trained on the training split"
    elif "gpt2" in str(tokenizer):
        tokenizer = "GPT-2's tokenizer"
    schedule = t.get("lr_schedule")
    if schedule == "cosine":
        schedule = f"cosine to {t.get('min_lr_ratio')} x after {t.get('warmup_steps')} warm-up steps"
    return (f"DiT {m.get('hidden_dim')} wide x {m.get('num_layers')} blocks, {tokenizer}, {d.get('max_length')}-token "
            f"packed blocks, batch {d.get('batch_size')}, lr {t.get('learning_rate')} ({schedule}), "
            + (f"EMA {t.get('ema_decay')}" if uses_ema(cfg) else "no EMA"))


def fmt_ci(values: list[float], digits: int = 4, sign: str = "") -> str:
    """mean ± standard error (95% interval); sign="+" for differences."""
    mean, se, half = mean_ci(values)
    f = f"{sign}.{digits}f"
    if se is None:
        return f"{mean:{f}} (one seed)"
    return f"{mean:{f}} ± {se:.{digits}f} (95%: {mean - half:{f}} to {mean + half:{f}})"


def pilot_lines(pilot: Path) -> list[str]:
    runs = load_runs(pilot)
    marks = (500, 1000, 2000, 3000)
    lines = [
        "## Pilot (seed 0, time-limited: not part of the comparison)",
        "",
        f"From `{pilot}`: every job trained for {runs[0].study.get('train_seconds_limit')} s of wall time on a shared "
        "GPU, constant LR; the trainer-side bound on the pooled prose validation split at a few steps, the last "
        "step reached, and the final scored pooled bound. Its purpose: the budget, and one test each of the "
        "plateau hypotheses (docs/study_plan.md has the predictions, written before).",
        "",
        "| run | overrides | " + " | ".join(f"bound at {m:,}" for m in marks) + " | last step | final pooled bound |",
        "| --- | --- | " + " | ".join("---:" for _ in marks) + " | ---: | ---: |",
    ]
    for r in sorted(runs, key=lambda r: list(ARMS).index(r.arm)):
        steps, values = r.records.series("val", "val_nelbo")
        at = dict(zip(steps, values))
        cells = [f"{at[m]:.3f}" if m in at else "-" for m in marks]
        overrides = " ".join(f"`{o}`" for o in ARMS[r.arm]) or "(the config's)"
        lines.append(f"| {r.folder.name} | {overrides} | " + " | ".join(cells)
                     + f" | {r.evals[PROSE[0]]['step']:,} | {r.prose_nelbo:.4f} |")
    return lines + [""]


def without_arm_overrides(run: Run, base: dict[str, Any]) -> dict[str, Any]:
    """The run's config with every key its arm overrides put back to the baseline's value (or dropped): what an
    arm changes on purpose (mdlm_warmup_long's warm-up) is its treatment, not a different setting."""
    cfg = copy.deepcopy(run.config[1])
    for override in ARMS[run.arm]:
        section, name = override.split("=", 1)[0].split(".")  # an override is section.key=value
        mine, theirs = cfg.get(section) or {}, base.get(section) or {}
        if name in theirs:
            mine[name] = theirs[name]
        else:
            mine.pop(name, None)
    return cfg


def one_setting(runs: list[Run], what: str) -> tuple[str, dict[str, Any]]:
    """The training setting every run of a comparison shares, apart from what each arm's overrides change; runs
    trained differently are never pooled."""
    base = next((r for r in runs if r.arm == BASELINE), runs[0])
    settings: dict[str, list[str]] = {}
    for r in runs:
        cfg = without_arm_overrides(r, base.config[1])
        key = describe_setting(cfg) + f", {cfg.get('training', {}).get('total_steps')} steps"
        settings.setdefault(key, []).append(str(r.folder))
    if len(settings) > 1:
        listed = "; ".join(f"{key}: {', '.join(folders[:2])}{' ...' if len(folders) > 2 else ''}"
                           for key, folders in settings.items())
        raise StudyError(f"{what}: runs of different settings would be pooled ({listed}); give each setting's "
                         "study folders to its own option (--out for the comparison, --screen for a screen, --also for "
                         "another setting)")
    return base.config


def uses_ema(cfg: dict[str, Any]) -> bool:
    return float(cfg.get("training", {}).get("ema_decay", 0) or 0) > 0


def comparison(
    runs: list[Run], cfg: dict[str, Any], level: str, image: Path, doc: Path
) -> tuple[list[str], list[str]]:
    """One comparison's tables (the claims, the final bounds, every run), its curves and its conclusions; `cfg` is
    the setting its runs share (`one_setting`), `level` the markdown heading prefix of its subsections."""
    arms = by_arm(runs)
    weights = "EMA weights" if uses_ema(cfg) else "raw weights (no EMA)"
    plot_curves(arms, image, weights)
    base = arms.get(BASELINE, [])
    lines: list[str] = []
    if base:
        ratios = {arm: paired(rs, base, lambda r, b: r.prose_nelbo / b.prose_nelbo) for arm, rs in arms.items()}
        diffs = {arm: paired(rs, base, lambda r, b: r.prose_nelbo - b.prose_nelbo) for arm, rs in arms.items()}

        def token_fraction(r: Run, b: Run) -> float:
            x = crossing(r.curve, b.curve[1][-1])
            return math.nan if x is None else x / b.curve[0][-1]

        fractions = {arm: paired(rs, base, token_fraction) for arm, rs in arms.items()}
        lines += [
            f"{level} The seed's two claims",
            "",
            "Per seed against MDLM at the same seed: the ratio of pooled prose bounds (claim: 0.90, from test PPL 20.7 "
            "vs 23.0 on OpenWebText), and the tokens a run takes to reach that MDLM run's final trainer-side bound as a "
            "fraction of MDLM's tokens (claim: 0.83; 'not reached' counts as a failure to reach it).",
            "",
            "| arm | seeds | bound ratio to MDLM | bound difference (nats) | tokens to MDLM's final bound |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for arm in arms:
            if arm == BASELINE or not ratios[arm]:
                continue
            reached = [f for f in fractions[arm] if not math.isnan(f)]
            frac = (fmt_ci(reached, 3) if len(reached) == len(fractions[arm]) else
                    f"reached in {len(reached)} of {len(fractions[arm])}" + (f"; {fmt_ci(reached, 3)}" if reached else ""))
            lines.append(f"| {arm} | {len(ratios[arm])} | {fmt_ci(ratios[arm])} | {fmt_ci(diffs[arm], sign='+')} | {frac} |")
        lines += [""]
        lines += per_corpus_differences(arms, base, level)
    lines += [
        f"{level} Final bound (nats per token; lower is better)",
        "",
        "| arm | overrides | seeds | " + " | ".join(PROSE) + " | prose (pooled) | prose PPL bound | python_docs (zero-shot) |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in PROSE) + " | ---: | ---: | ---: |",
    ]
    for arm, rs in arms.items():
        cells = [fmt_mean_sd([r.nelbo(c) for r in rs]) for c in PROSE]
        pooled = [r.prose_nelbo for r in rs]
        ppl = fmt_mean_sd([math.exp(v) for v in pooled], 1)
        overrides = " ".join(f"`{o}`" for o in ARMS[arm]) or "(the config's)"
        label = arm_label(arm)
        lines.append(
            f"| {label} | {overrides} | {len(rs)} | " + " | ".join(cells)
            + f" | **{fmt_mean_sd(pooled, 4)}** | {ppl} | {fmt_mean_sd([r.nelbo('python_docs') for r in rs])} |"
        )
    lines += ["", "Per run (pooled prose bound, its standard error over sequences, python_docs; `last 10%`: how much "
              f"the trainer-side bound fell over the run's last 10% of tokens, converged below {CONVERGED}; `plateau "
              f"exit`: the training tokens at which the trainer-side bound first fell below {PLATEAU_EXIT} nats, "
              "interpolated between evaluations):", ""]
    lines += ["| run | prose | stderr | python_docs | config hash | step | tokens | last 10% | plateau exit | train s "
              "| tokens/s (median) |",
              "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    movements = []
    for arm, rs in arms.items():
        for r in rs:
            stderr = math.sqrt(sum((r.evals[c]["stderr"] * r.evals[c]["num_tokens"]) ** 2 for c in PROSE)) / sum(
                r.evals[c]["num_tokens"] for c in PROSE)
            speeds = [x["tokens_per_s"] for x in r.records.get("train") if x.get("tokens_per_s")]
            moved = last_tenth_movement(r.curve)
            if arm not in SCORED_AT_BEST and moved is not None:
                movements.append(moved)
            exit_tokens = r.plateau_exit
            lines.append(
                f"| {r.folder.name} | {r.prose_nelbo:.4f} | {stderr:.4f} | {r.nelbo('python_docs'):.4f} | "
                f"`{r.evals[PROSE[0]]['config_hash']}` | {r.evals[PROSE[0]]['step']} | {r.tokens:,} | "
                f"{'-' if moved is None else f'{moved:.3f}'} | "
                f"{'not left' if exit_tokens is None else f'{exit_tokens / 1e6:.1f}M'} | {r.study['train_seconds']:.0f} | "
                f"{statistics.median(speeds) if speeds else float('nan'):,.0f} |"
            )
    lines += ["", f"![validation bound vs training tokens]({os.path.relpath(image, doc.parent)})", ""]
    conclusions = []
    for arm, rs in arms.items():
        if arm != BASELINE and base and arm not in SCORED_AT_BEST:
            conclusions.append(verdict(arm, rs, base)[0])
    plateau = plateau_sentence(arms, base)
    if plateau:
        conclusions.append(plateau)
    if movements:
        converged = sum(m < CONVERGED for m in movements)
        conclusions.append(
            f"Convergence: {converged} of {len(movements)} diffusion runs moved less than {CONVERGED} nats over their "
            f"last 10% of tokens (they fell {min(movements):.3f} to {max(movements):.3f}): "
            + ("the runs converged" if converged == len(movements) else
               "these are fixed-budget comparisons of runs that had not converged")
        )
    atat_rows = [(arm, rs) for arm, rs in arms.items() if any(r.records.get("atat_val") for r in rs)]
    if atat_rows:
        lines += [
            f"{level} What the estimator learned (last evaluation)",
            "",
            "Spearman correlation, within each sequence, between a token's importance and the denoiser's observed "
            "loss on it, next to the unigram-surprisal baseline's (`atat_val` records):",
            "",
            "| arm | estimator | unigram baseline |",
            "| --- | ---: | ---: |",
        ]
        for arm, rs in atat_rows:
            est = [r.records.get("atat_val")[-1]["spearman_estimator"] for r in rs]
            uni = [r.records.get("atat_val")[-1]["spearman_frequency_baseline"] for r in rs]
            lines.append(f"| {arm} | {fmt_mean_sd(est)} | {fmt_mean_sd(uni)} |")
        lines += [""]
    return lines, conclusions


def per_corpus_differences(arms: dict[str, list[Run]], base: list[Run], level: str) -> list[str]:
    """Each arm's paired difference from MDLM on every corpus it was scored on: mean and standard error."""
    corpora = [*PROSE, *ZERO_SHOT]
    lines = [
        f"{level} Paired differences per corpus (nats per token, arm - MDLM at the same seed, ± standard error)",
        "",
        "| arm | seeds | " + " | ".join(c + (" (zero-shot)" if c in ZERO_SHOT else "") for c in corpora) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in corpora) + " |",
    ]
    rows = []
    for arm, rs in arms.items():
        if arm == BASELINE:
            continue
        diffs = [paired(rs, base, lambda r, b, c=c: r.nelbo(c) - b.nelbo(c)) for c in corpora]
        if not diffs[0]:
            continue
        cells = []
        for values in diffs:
            mean, se, _ = mean_ci(values)
            cells.append(f"{mean:+.4f}" + ("" if se is None else f" ± {se:.4f}"))
        rows.append(f"| {arm_label(arm)} | {len(diffs[0])} | " + " | ".join(cells) + " |")
    return [*lines, *rows, ""] if rows else []


def arm_label(arm: str) -> str:
    """An arm as the tables name it: one scored by its exact NLL says so."""
    return f"{arm} (exact NLL)" if arm in SCORED_AT_BEST else arm


def plateau_sentence(arms: dict[str, list[Run]], base: list[Run]) -> str | None:
    """How much of the paired differences the plateau's timing explains: over every diffusion arm's pairs with
    MDLM, the correlation between the difference in plateau exit (tokens) and the difference in final bound."""
    exits, bounds = [], []
    for arm, rs in arms.items():
        if arm == BASELINE or arm in SCORED_AT_BEST or not base:
            continue
        for r, b in paired(rs, base, lambda r, b: (r, b)):
            x, y = r.plateau_exit, b.plateau_exit
            if x is not None and y is not None:
                exits.append((x - y) / 1e6)
                bounds.append(r.prose_nelbo - b.prose_nelbo)
    if len(exits) < 3 or len(set(exits)) < 2 or len(set(bounds)) < 2:
        return None
    r = statistics.correlation(exits, bounds)
    return (f"Plateau: over {len(exits)} pairs with MDLM, leaving the plateau (bound below {PLATEAU_EXIT}) later than "
            f"the MDLM run of the same seed goes with a higher final bound: correlation {r:+.2f} between the "
            f"difference in exit (tokens, {min(exits):+.1f}M to {max(exits):+.1f}M) and the difference in bound")


def diffusion_run(runs: list[Run]) -> Run:
    """A run that trained the whole budget and was scored by the bound (not an AR run scored at its best step)."""
    return next((r for r in runs if r.arm not in SCORED_AT_BEST), runs[0])


def setup_lines(runs: list[Run], cfg: dict[str, Any], what: str) -> list[str]:
    arms = by_arm(runs)
    first = diffusion_run(runs)
    devices = sorted({r.study["device"] for r in runs})
    dates = sorted({r.study["date"] for r in runs})
    weights = "final EMA weights" if uses_ema(cfg) else "final weights (no EMA)"
    return [
        f"- {what}: {len(runs)} runs ({', '.join(f'{arm} x {len(rs)}' for arm, rs in arms.items())}), on "
        f"{', '.join(devices)}, {', '.join(dates)}, torch {first.study['torch']}.",
        f"- Setting: {describe_setting(cfg)}; {first.tokens / 1e6:.1f}M tokens ({first.evals[PROSE[0]]['step']:,} "
        "steps) for every arm; arms differ only in the overrides listed (docs/ablations.md). Scored with the "
        f"{weights}.",
    ]


@dataclass
class Section:
    """One setting's comparison in the report: its study folders, runs and shared config."""
    title: str
    intro: str
    folders: list[Path]
    runs: list[Run]
    cfg: dict[str, Any]
    image: str

    @property
    def names(self) -> str:
        return ", ".join(f.name for f in self.folders)

    @property
    def short_title(self) -> str:
        """The title without its parenthesis: how the setup and the conclusion name the section."""
        return self.title.split(" (")[0]


def load_setting(folders: list[Path], option: str) -> tuple[list[Run], tuple[str, dict[str, Any]]]:
    """Every finished run of `folders` and the one setting they share (`one_setting`; `option` names them)."""
    runs = [run for out in folders for run in load_runs(out)]
    return runs, one_setting(runs, option)


def sections(args: argparse.Namespace) -> tuple[str, list[Section]]:
    """The comparison (--out), then each other setting (--also, in the order given), then the screen (--screen);
    each checked to hold one setting. Returns the comparison's config text too."""
    runs, (cfg_text, cfg) = load_setting(args.out, "--out")
    found = [Section("The comparison", "", args.out, runs, cfg, "results_curves.png")]
    groups = [(group, "--also", f"Another setting: {', '.join(f.name for f in group)}",
               "; never pooled with the comparison above.", "_".join(f.name for f in group)) for group in args.also]
    if args.screen:
        groups.append((args.screen, "--screen", "The screen (ablations, a shorter setting named as a screen)", ".",
                       "screen"))
    for group, option, title, tail, stem in groups:
        runs, (_, cfg) = load_setting(group, option)
        intro = f"Its own setting ({describe_setting(cfg)}), each arm against the MDLM runs of that setting{tail}"
        found.append(Section(title, intro, group, runs, cfg, f"results_{stem}_curves.png"))
    return cfg_text, found


def report_command(args: argparse.Namespace) -> str:
    def folders(option: str, outs: list[Path]) -> str:
        return f" {option} " + " ".join(str(out) for out in outs)

    return ("python benchmarks/study.py report" + folders("--out", args.out)
            + "".join(folders("--also", group) for group in args.also)
            + (folders("--screen", args.screen) if args.screen else "")
            + f" --doc {args.doc}"
            + (f" --pilot {args.pilot}" if args.pilot else "")
            + (f" --discussion {args.discussion}" if args.discussion else ""))


def cmd_report(args: argparse.Namespace) -> int:
    cfg_text, found = sections(args)
    main = found[0]
    doc: Path = args.doc
    folders = [folder for section in found for folder in section.folders]
    invocations = []
    for out in folders:
        log = out / "study_run.json"
        invocations += json.loads(log.read_text())["invocations"] if log.is_file() else []
    report_cmd = report_command(args)
    lines = [
        "# Does ATAT help? MDLM vs ATAT on the prose corpora",
        "",
        f"Written by `{report_cmd}` from the run folders under "
        f"{', '.join(f'`{out}/runs`' for out in folders)} (each holds the config.yaml, metrics.jsonl, eval.json and "
        "study.json its run wrote); do not edit by hand. The plan, written before the runs: "
        "[study_plan.md](study_plan.md).",
        "",
        "## Setup",
        "",
        *[line for s in found for line in setup_lines(s.runs, s.cfg, s.short_title)],
        "- Both: the training splits of sotu, brown, austen and kjv (../shared/corpora); the same initial weights "
        "and data order for every arm at one seed. Scored: MDLM's uniform-masking NELBO bound (nats per token, an "
        f"upper bound on the NLL), {diffusion_run(main.runs).evals[PROSE[0]]['num_t']} stratified t per sequence, "
        "on each corpus's whole validation split, and zero-shot on python_docs (reStructuredText: never trained on). "
        "The AR baseline is scored by its exact NLL at its best validation checkpoint. The curves are the trainer's "
        "periodic bound on the pooled prose validation split (4 t per sequence).",
        "- Spread: ± in the arm table is the sample standard deviation over seeds; differences are paired by seed "
        "and given with their standard error (± in the comparison) and a 95% t interval.",
        "- Timings (train s, tokens/s) are each run's own, measured while other jobs of the study shared its GPU: "
        "they are not single-run speeds.",
        "",
    ]
    conclusions: list[tuple[Section, list[str]]] = []
    for section in found:
        lines += [f"## {section.title}", ""] + ([section.intro, ""] if section.intro else [])
        body, said = comparison(section.runs, section.cfg, "###", args.images / section.image, doc)
        lines += body
        conclusions.append((section, said))
    if args.pilot:
        lines += pilot_lines(args.pilot)
    lines += ["## Conclusion", ""]
    lines += [f"- {c}." for c in conclusions[0][1]] or ["- No MDLM baseline among the runs: nothing to compare."]
    for section, said in conclusions[1:]:
        if said:
            lines += ["", f"{section.short_title}:", ""] + [f"- {c}." for c in said]
    lines += [
        "",
        "These are small models trained for minutes on 4.8M tokens of prose; what holds here need not hold at "
        "OpenWebText scale, in either direction.",
        *(["", "## Discussion (written by hand, from the numbers above)", "", args.discussion.read_text().strip()]
          if args.discussion else []),
        "",
        "## Commands",
        "",
        "```bash",
        *[i["command"] for i in invocations],
        report_cmd,
        "```",
        "",
        "Each run's own commands (training, then scoring), from its study.json:",
        "",
        "```bash",
    ]
    for section in found:
        for r in section.runs:
            lines += [r.study["train_command"], r.study["eval_command"]]
    lines += ["```", "", "The comparison's config, as its MDLM run saved it:", "", "```yaml", cfg_text.rstrip(), "```", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
    print(f"wrote {doc}")
    for section, said in conclusions:
        for c in said:
            print(c if section is main else f"[{section.names}] {c}")
    return 0


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run", help="train and score every (arm, seed) job not yet done")
    r.add_argument("--out", type=Path, required=True, help="study folder: runs/<arm>-s<seed>, data links, caches")
    r.add_argument("--arms", default="mdlm,atat", help=f"comma-separated, from: {', '.join(ARMS)}")
    r.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    r.add_argument("--gpus", help="comma-separated CUDA device indices, one job on each at a time, or 'cpu' "
                                  "(default: every visible GPU, else the CPU)")
    r.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    r.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    r.add_argument("--tokenizer", type=Path,
                   help="a GPT-2 tokenizer folder (../shared/tokenizers/gpt2) replacing the config's data.tokenizer")
    r.add_argument("--steps", type=int, help="training.total_steps for every job (the study's fixed budget)")
    r.add_argument("--train-seconds", type=float,
                   help="stop each job's training after this many seconds (it saves, then is scored): for pilots")
    r.add_argument("--resume-later", action="store_true",
                   help="with --train-seconds: a job the limit stops is saved but not scored, and the same command "
                        "(in a later call) resumes it from its checkpoint; without, a stopped job is scored as it is "
                        "(a pilot's time-limited run)")
    r.add_argument("--num-t", type=int, default=16, help="stratified t per sequence in the final scoring")
    r.add_argument("--max-batches", type=int, default=0, help="score at most this many batches per corpus (0 = all)")
    r.add_argument("--jobs-per-gpu", type=int, default=1,
                   help="jobs sharing one device at a time (2 overlaps one job's compilation and evaluation with "
                        "the other's training)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every job (e.g. for a smoke test)")
    rep = sub.add_parser("report", help="write the results page from the finished run folders")
    rep.add_argument("--out", type=Path, nargs="+", required=True,
                     help="the study folders given to run (their runs are reported together)")
    rep.add_argument("--screen", type=Path, nargs="*", default=[],
                     help="study folders of a screen in a setting of its own (e.g. a shorter budget): reported as a "
                          "separate comparison against that setting's MDLM runs")
    rep.add_argument("--also", type=Path, nargs="+", action="append", default=[], metavar="FOLDER",
                     help="study folders of a comparison in another setting (e.g. an earlier budget), reported in a "
                          "section of its own after the comparison; repeat for several settings")
    rep.add_argument("--pilot", type=Path, help="a study folder of pilot runs, reported in a section of their own")
    rep.add_argument("--doc", type=Path, default=REPO / "docs" / "results.md")
    rep.add_argument("--images", type=Path, help="where the PNG goes (default: docs/images beside --doc)")
    rep.add_argument("--discussion", type=Path, help="a markdown file of interpretation to include, marked as such")
    args = p.parse_args(argv)
    if args.verb == "run":
        args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        try:
            args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            p.error(f"--seeds: integers, comma-separated (got {args.seeds!r})")
        args.gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else None
    else:
        args.images = args.images or args.doc.parent / "images"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return cmd_run(args) if args.verb == "run" else cmd_report(args)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
