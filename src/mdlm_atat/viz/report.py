"""`atat report RUN_DIR`: PNG plots of a run and one HTML page that shows them with the config and final numbers.

Everything comes from the run folder: `metrics.jsonl` (the trainer's records: `train` every log step, `val` and
`atat_val` at each evaluation, `masking_profile` with ATAT's diagnostics), `config.yaml`, and any `atat eval`
JSON written there. A step logged twice (a run killed after its last checkpoint re-runs those steps on resume)
counts once, the later record winning. Plots whose records a run lacks (an MDLM run has no curriculum) are left
out and the page says so. Rendered with matplotlib's Agg canvas through the object API (no pyplot, no display).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mdlm_atat.train.checkpoint import RunDirError

STAGE_COLOURS = {
    "warmup": "#d9d9d9", "easy": "#b7e4c7", "medium": "#ffe8a3", "hard": "#f4b6b6", "fixed": "#cdd7f6",
    "uniform": "#eeeeee",
}
DPI = 100


class ReportError(RunDirError):
    """The report cannot be made (no metrics in the folder, matplotlib missing); the message says what to do."""


@dataclass
class RunRecords:
    """A run's metrics.jsonl, one record per (event, step), in step order."""

    run_dir: Path
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    starts: list[dict[str, Any]] = field(default_factory=list)  # start and resume records, in order
    skipped_lines: int = 0
    is_ar: bool = False  # the AR baseline: its validation number is an exact NLL, not a bound

    @property
    def method(self) -> str:
        method = next((s.get("method") for s in reversed(self.starts) if s.get("method")), "")
        if self.is_ar and not method.startswith("ar"):  # runs from before the AR baseline was named as such
            return "ar (autoregressive baseline)"
        return method

    @property
    def val_name(self) -> str:
        return "NLL" if self.is_ar else "NELBO"

    @property
    def ppl_relation(self) -> str:
        return "=" if self.is_ar else "<="

    def get(self, event: str) -> list[dict[str, Any]]:
        return self.events.get(event, [])

    def series(self, event: str, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of `key` over the records of `event` that hold a finite number for it."""
        steps, values = [], []
        for r in self.get(event):
            value = r.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps.append(r["step"])
                values.append(float(value))
        return steps, values

    def tokens_at(self, steps: list[float]) -> list[float]:
        """Tokens seen at each step: from the train records (interpolated), else steps x tokens_per_step."""
        known_steps, known_tokens = self.series("train", "tokens_seen")
        if len(known_steps) >= 2:
            import numpy as np

            return list(np.interp(steps, [0, *known_steps], [0, *known_tokens]))
        per_step = next((s.get("tokens_per_step") for s in reversed(self.starts) if s.get("tokens_per_step")), 0)
        return [step * per_step for step in steps]


def read_metrics(run_dir: str | Path) -> RunRecords:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl here; pass a run folder (the --log-dir of atat train)")
    records = RunRecords(run_dir)
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            records.skipped_lines += int(bool(line.strip()))
            continue
        if not isinstance(record, dict) or "event" not in record:
            continue
        if record["event"] in ("start", "resume"):
            records.starts.append(record)
        else:
            by_key[(record["event"], int(record.get("step", 0)))] = record
    for (event, _), record in sorted(by_key.items(), key=lambda item: item[0][1]):
        records.events.setdefault(event, []).append(record)
    if not records.starts and not records.events:
        raise ReportError(f"{path}: no records yet; has the run logged its first step?")
    records.is_ar = _model_name(run_dir) == "ar" or any(
        str(s.get("method", "")).startswith("ar") for s in records.starts)
    return records


def _model_name(run_dir: Path) -> str | None:
    try:
        import yaml

        return (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("model", {}).get("name")
    except Exception:  # noqa: BLE001 - no config.yaml, or one that is not ours: the records decide
        return None


# ----------------------------------------------------------------------------------------------------------
# Plots: each draws on the axes it is given and returns False when the run has nothing to show.


def plot_loss(ax, run: RunRecords) -> bool:
    steps, loss = run.series("train", "loss")
    vsteps, vloss = run.series("val", "val_nelbo")
    if not steps and not vsteps:
        return False
    _, stderr = run.series("val", "val_stderr")
    ax.plot(run.tokens_at(steps), loss, color="#4c72b0", lw=1.2, label="train loss (per log step)")
    if vsteps:
        errors = stderr if len(stderr) == len(vloss) else None
        label = "validation NLL (EMA, exact)" if run.is_ar else "validation NELBO (EMA, uniform masking)"
        ax.errorbar(run.tokens_at(vsteps), vloss, yerr=errors, color="#dd8452", marker="o", ms=4, lw=1.5,
                    capsize=3, label=label)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("nats / token")
    ax.set_title("Loss")
    ax.legend(fontsize=8)
    _tokens_axis(ax)
    return True


def plot_ppl(ax, run: RunRecords) -> bool:
    steps, loss = run.series("train", "loss")
    vsteps, vppl = run.series("val", "val_ppl")
    if not steps and not vsteps:
        return False
    ax.plot(run.tokens_at(steps), [math.exp(min(x, 700)) for x in loss], color="#4c72b0", lw=1.2, label="train")
    if vsteps:
        ax.plot(run.tokens_at(vsteps), vppl, color="#dd8452", marker="o", ms=4, lw=1.5,
                label="validation (exact)" if run.is_ar else "validation (bound)")
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("perplexity = exp(nats / token)")
    ax.set_title("Perplexity (validation: exact)" if run.is_ar else "Perplexity (validation: an upper bound)")
    ax.legend(fontsize=8)
    _tokens_axis(ax)
    return True


def plot_lr(ax, run: RunRecords) -> bool:
    steps, lr = run.series("train", "lr")
    if not steps:
        return False
    ax.plot(steps, lr, color="#55a868", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate (denoiser group)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return True


def plot_grad_norm(ax, run: RunRecords) -> bool:
    steps, norm = run.series("train", "grad_norm")
    if not steps:
        return False
    ax.plot(steps, norm, color="#8172b3", lw=1.2)
    nonfinite = [r["step"] for r in run.get("nonfinite")]
    for i, step in enumerate(nonfinite):
        ax.axvline(step, color="red", lw=0.8, alpha=0.6, label="non-finite step (skipped)" if i == 0 else None)
    if nonfinite:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (before clipping)")
    ax.set_title("Gradient norm")
    return True


def plot_throughput(ax, run: RunRecords) -> bool:
    steps, rate = run.series("train", "tokens_per_s")
    if len(steps) < 2:
        return False
    ax.plot(steps[1:], rate[1:], color="#937860", lw=1.2)  # the first log includes start-up
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_title("Throughput")
    ax.set_ylim(bottom=0)
    return True


def plot_curriculum(ax, run: RunRecords) -> bool:
    train = [r for r in run.get("train") if "stage" in r]
    if not train:
        return False
    steps = [r["step"] for r in train]
    betas = [r.get("beta", 0.0) for r in train]
    _stage_spans(ax, train)
    ax.step(steps, betas, where="post", color="black", lw=1.5, label="beta (tilt of the masks)")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("beta")
    ax.set_title("Curriculum: stage and beta")
    _stage_legend(ax, train, extra=True)
    return True


def plot_masking(axes, run: RunRecords) -> bool:
    """Mean masking probability vs t per frequency bin, one panel per stage (the last evaluation's estimator)."""
    profiles = run.get("masking_profile")
    if not profiles:
        return False
    profile = profiles[-1]
    stages = list(profile["by_stage"])
    t, rate = profile["t"], profile["rate"]
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    for ax, stage in zip(axes, stages):
        rows = profile["by_stage"][stage]  # [T][bins]
        num_bins = len(rows[0])
        ax.plot(t, rate, color="grey", ls="--", lw=1.2, label="MDLM (uniform)")
        for b in range(num_bins):
            label = frequency_bin_name(b, num_bins)
            ax.plot(t, [row[b] for row in rows], color=cmap(b / max(1, num_bins - 1) * 0.85), lw=1.4, label=label)
        ax.set_title(f"{stage} (beta = {profile['beta'][stage]:+.2f})")
        ax.set_xlabel("t")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("mean masking probability")
    axes[0].legend(fontsize=7, title="tokens by training frequency", title_fontsize=7)
    for ax in axes[len(stages):]:
        ax.set_visible(False)
    return True


def masking_panels(run: RunRecords) -> int:
    profiles = run.get("masking_profile")
    return len(profiles[-1]["by_stage"]) if profiles else 0


def plot_importance(ax, run: RunRecords) -> bool:
    """Importance s per stage: the logged 10/50/90% quantiles, averaged over each stage's log steps."""
    train = [r for r in run.get("train") if "importance_q50" in r]
    if not train:
        return False
    stages = [s for s in dict.fromkeys(r.get("stage", "all") for r in train)]
    for i, stage in enumerate(stages):
        rows = [r for r in train if r.get("stage", "all") == stage]
        q10, q50, q90, mean = (sum(r[k] for r in rows) / len(rows) for k in
                               ("importance_q10", "importance_q50", "importance_q90", "importance_mean"))
        colour = STAGE_COLOURS.get(stage, "#cccccc")
        ax.bar(i, q90 - q10, bottom=q10, width=0.6, color=colour, edgecolor="black", lw=0.8)
        ax.hlines(q50, i - 0.3, i + 0.3, color="black", lw=2)
        ax.plot(i, mean, marker="D", color="#c44e52", ms=5)
        ax.text(i, q90 + 0.02, f"{len(rows)} logs", ha="center", fontsize=7)
    ax.plot([], [], marker="D", color="#c44e52", ls="", label="mean")
    ax.plot([], [], color="black", lw=2, label="median")
    from matplotlib.patches import Patch

    handles = ax.get_legend_handles_labels()[0] + [Patch(facecolor="white", edgecolor="black", label="10% - 90%")]
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("predicted difficulty s")
    ax.set_title("Importance distribution per stage")
    ax.legend(handles=handles, fontsize=7, loc="upper center", ncol=3)
    return True


def plot_nelbo_by_frequency(ax, run: RunRecords) -> bool:
    evals = [r for r in run.get("atat_val") if r.get("nelbo_by_frequency_bin")]
    if not evals:
        return False
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for i, r in enumerate(evals):
        values = r["nelbo_by_frequency_bin"]
        ax.plot(range(len(values)), values, marker="o", ms=4, color=cmap(i / max(1, len(evals) - 1) * 0.9),
                label=f"step {r['step']}" if i in (0, len(evals) - 1) or len(evals) <= 4 else None)
    n = len(evals[-1]["nelbo_by_frequency_bin"])
    ax.set_xticks(range(n), [frequency_bin_name(b, n) for b in range(n)])
    ax.set_xlabel("token-frequency bin (fifths of training tokens)")
    ax.set_ylabel("validation NELBO (nats / token)")
    ax.set_title("NELBO by token frequency")
    ax.legend(fontsize=7)
    return True


def frequency_bin_name(b: int, num_bins: int) -> str:
    """Bin b of num_bins training-frequency bins (fifths): one naming in every legend and axis."""
    what = {5: "fifth", 4: "quarter", 10: "tenth"}.get(num_bins, "bin")
    extreme = " (rarest)" if b == 0 else " (commonest)" if b == num_bins - 1 else ""
    return f"{what} {b + 1}{extreme}"


def plot_estimator(ax, run: RunRecords) -> bool:
    steps, est = run.series("atat_val", "spearman_estimator")
    if not steps:
        return False
    bsteps, base = run.series("atat_val", "spearman_frequency_baseline")
    ax.plot(steps, est, marker="o", ms=4, color="#c44e52", label="importance estimator")
    ax.plot(bsteps, base, marker="s", ms=4, ls="--", color="#4c72b0", label="unigram-surprisal baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("Spearman rho with per-token loss")
    ax.set_title("Estimator vs observed difficulty (validation)")
    ax.legend(fontsize=8)
    return True


def _tokens_axis(ax) -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _stage_spans(ax, train: list[dict[str, Any]]) -> None:
    start_step, stage = 0, train[0]["stage"]
    for r in train[1:] + [None]:
        if r is None or r["stage"] != stage:
            end = train[-1]["step"] if r is None else r["step"]
            ax.axvspan(start_step, end, color=STAGE_COLOURS.get(stage, "#eeeeee"), alpha=0.8, lw=0)
            if r is not None:
                start_step, stage = r["step"], r["stage"]


def _stage_legend(ax, train: list[dict[str, Any]], extra: bool = False) -> None:
    from matplotlib.patches import Patch

    stages = list(dict.fromkeys(r["stage"] for r in train))
    handles = [Patch(color=STAGE_COLOURS.get(s, "#eeeeee"), label=s) for s in stages]
    if extra:
        handles = ax.get_legend_handles_labels()[0] + handles
    ax.legend(handles=handles, fontsize=8, loc="best")


# ----------------------------------------------------------------------------------------------------------
# Figures and the page


@dataclass
class Figure:
    name: str  # file stem
    title: str
    caption: str
    panels: list[Callable]  # each takes (ax, run); one axes per panel, in a row


FIGURES = [
    Figure("loss", "Loss and perplexity vs tokens",
           "Training loss (the NELBO estimate at the step's sampled t; the AR baseline's next-token loss) and the "
           "validation number (EMA weights, mean +- standard error: MDLM's bound under uniform masking, the AR "
           "baseline's exact NLL); perplexity = exp(loss).", [plot_loss, plot_ppl]),
    Figure("optimisation", "Learning rate, gradient norm, throughput",
           "The LR schedule, the gradient norm before clipping (red lines: non-finite steps, skipped) and "
           "training tokens per second.", [plot_lr, plot_grad_norm, plot_throughput]),
    Figure("curriculum", "Curriculum stage and beta",
           "The tilt beta of the adaptive masks over training, with the stage shaded (README: The method).",
           [plot_curriculum]),
    Figure("importance", "Importance distribution per stage",
           "The estimator's predicted difficulty s over training tokens: 10/50/90% quantiles and mean, averaged "
           "over each stage's logged steps.", [plot_importance]),
    Figure("nelbo_by_frequency", "NELBO by token frequency",
           "The validation bound restricted to tokens of each training-frequency fifth, at each evaluation.",
           [plot_nelbo_by_frequency]),
    Figure("estimator", "Estimator correlation over time",
           "Spearman correlation (within sequences) of the estimator's s with the denoiser's observed per-token "
           "loss on validation data, against the unigram-surprisal baseline (README: The method).", [plot_estimator]),
]
MASKING = Figure("masking", "Masking rate vs t",
                 "Mean masking probability p_i(t) of the tokens of each training-frequency fifth under each stage's "
                 "beta, with the last evaluation's estimator; dashed: MDLM's uniform rate (README: The method).", [])


def _new_figure(num_panels: int, height: float = 3.6):
    from matplotlib.figure import Figure as MplFigure

    width = {1: 6.4, 2: 11.0, 3: 14.5}.get(num_panels, 4.2 * num_panels)
    fig = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, num_panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, list(axes)


def render_figures(run: RunRecords, out_dir: Path) -> tuple[list[tuple[Figure, Path]], list[Figure]]:
    """Write each figure the run has data for; returns (written, missing)."""
    written, missing = [], []
    for spec in FIGURES:
        fig, axes = _new_figure(len(spec.panels))
        shown = [panel(ax, run) for panel, ax in zip(spec.panels, axes)]
        if not any(shown):
            missing.append(spec)
            continue
        for ax, ok in zip(axes, shown):
            ax.set_visible(ok)
        path = out_dir / f"{spec.name}.png"
        fig.savefig(path)
        written.append((spec, path))
    panels = masking_panels(run)
    if panels:
        fig, axes = _new_figure(panels, height=3.4)
        plot_masking(axes, run)
        path = out_dir / f"{MASKING.name}.png"
        fig.savefig(path)
        after = next((i + 1 for i, (spec, _) in enumerate(written) if spec.name == "curriculum"), len(written))
        written.insert(after, (MASKING, path))
    else:
        missing.append(MASKING)
    summary = render_summary(run, out_dir / "summary.png")
    if summary is not None:
        written.insert(0, (Figure("summary", "Summary", "The run at a glance: the loss, then the curriculum, masking "
                                  "and estimator where the run has them, else perplexity and optimisation.", []),
                           summary))
    return written, missing


def render_summary(run: RunRecords, path: Path) -> Path | None:
    """A 2 x 2 overview: loss vs tokens, then the curriculum, masking rate vs t (rarest tokens per stage) and the
    estimator's correlation; a panel the run lacks (MDLM, the AR baseline) gives its place to the next of
    perplexity, gradient norm, throughput and LR, so that no panel is blank."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(11.0, 7.2), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    if not plot_loss(axes[0], run):
        return None
    queue = [plot_curriculum, _plot_masking_overlay, plot_estimator, plot_ppl, plot_grad_norm, plot_throughput,
             plot_lr]
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[1:]:
        shown = False
        while queue and not shown:
            shown = queue.pop(0)(ax, run)
        ax.set_visible(shown)
    fig.suptitle(f"{run.run_dir.name}: {run.method}", fontsize=11)
    fig.savefig(path)
    return path


def _plot_masking_overlay(ax, run: RunRecords) -> bool:
    profiles = run.get("masking_profile")
    if not profiles:
        return False
    profile = profiles[-1]
    t, rate = profile["t"], profile["rate"]
    for stage, rows in profile["by_stage"].items():
        colour = {"easy": "#2a9d8f", "medium": "#e9c46a", "hard": "#e76f51"}.get(stage, "#264653")
        label = f"{stage} (beta = {profile['beta'][stage]:+.2f})"
        ax.plot(t, [row[0] for row in rows], color=colour, lw=1.8, label=label)
    ax.plot(t, rate, color="grey", ls="--", lw=1.2, label="MDLM (uniform)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("t")
    ax.set_ylabel("mean masking probability")
    ax.set_title("Masking rate of the rarest fifth of tokens vs t")
    ax.legend(fontsize=8, title="stage", title_fontsize=8)
    return True


def final_numbers(run: RunRecords) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    start = run.starts[0] if run.starts else {}
    if start:
        rows.append(("method", run.method))
        estimator = start.get("estimator_parameters", 0)
        rows.append(("parameters", f"{start.get('parameters', 0):,} (estimator {estimator:,})"))
        rows.append(("device / precision", f"{start.get('device', '?')} / {start.get('precision', '?')}"))
    train = run.get("train")
    if train:
        first, last = train[0], train[-1]
        rows.append(("steps", f"{last['step']:,}"))
        rows.append(("tokens seen", f"{last.get('tokens_seen', 0):,}"))
        rows.append(("training loss (first -> last log)", f"{first['loss']:.4f} -> {last['loss']:.4f} nats/token"))
    val = run.get("val")
    if val:
        last = val[-1]
        rows.append((f"validation {run.val_name} (last)", f"{last['val_nelbo']:.4f} +- "
                     f"{last.get('val_stderr', math.nan):.4f} nats/token, PPL {run.ppl_relation} {last['val_ppl']:.2f} "
                     f"(step {last['step']}, {last.get('val_tokens', 0):,} tokens)"))
        best = min(val, key=lambda r: r["val_nelbo"])
        rows.append((f"validation {run.val_name} (best)", f"{best['val_nelbo']:.4f} (step {best['step']})"))
    atat = run.get("atat_val")
    if atat and "spearman_estimator" in atat[-1]:
        a = atat[-1]
        rows.append(("estimator Spearman (last)", f"{a['spearman_estimator']:.4f} vs unigram baseline "
                     f"{a.get('spearman_frequency_baseline', math.nan):.4f}"))
    times = [r["time"] for event in run.events.values() for r in event if "time" in r]
    times += [s["time"] for s in run.starts if "time" in s]
    if len(times) >= 2:
        rows.append(("wall time (first to last record)", _duration(max(times) - min(times))))
    if len(run.starts) > 1:
        rows.append(("resumed", f"{len(run.starts) - 1} time(s)"))
    nonfinite = run.get("nonfinite")
    if nonfinite:
        rows.append(("non-finite steps (skipped)", str(len(nonfinite))))
    for r in run.get("stopped"):
        rows.append(("stopped", f"by {r.get('signal')} at step {r['step']}"))
    return rows


def eval_results(run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """`atat eval` JSON files in the run folder: {file: result}, for a single dataset or several."""
    found = []
    for path in sorted(run_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "nelbo" in data:
            found.append((path.name, data))
        elif isinstance(data, dict) and data and all(isinstance(v, dict) and "nelbo" in v for v in data.values()):
            found.extend((f"{path.name}: {entry}", result) for entry, result in data.items())
    return found


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m} min" if hours else f"{m} min {s} s"


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
  body {{ font-family: system-ui, sans-serif; max-width: 76rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }}
  h1 {{ font-size: 1.4rem; }} h2 {{ font-size: 1.1rem; margin-top: 2rem; }}
  table {{ border-collapse: collapse; font-size: .9rem; }}
  td, th {{ padding: .25rem .8rem; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }}
  figure {{ margin: 1rem 0 2rem; }} img {{ max-width: 100%; border: 1px solid #eee; }}
  figcaption {{ color: #555; font-size: .85rem; margin-top: .3rem; }}
  pre {{ background: #f7f7f7; padding: .8rem; font-size: .8rem; overflow-x: auto; }}
  .note {{ color: #777; font-size: .85rem; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="note">{subtitle}</p>
<h2>Final numbers</h2>
<table>{numbers}</table>
{evals}
<h2>Plots</h2>
{figures}
{missing}
<h2>Config</h2>
<pre>{config}</pre>
</body>
</html>
"""


def write_page(run: RunRecords, out_dir: Path, written, missing) -> Path:
    esc = html.escape
    numbers = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in final_numbers(run))
    evals = eval_results(run.run_dir)
    eval_html = ""
    if evals:
        columns = ("file", "dataset / split", f"{run.val_name} (nats/token)", "PPL =" if run.is_ar else "PPL &le;",
                   "tokens", "step")
        head = "<tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
        body = "".join(
            f"<tr><td>{esc(name)}</td><td>{esc(str(r.get('dataset')))} / {esc(str(r.get('split')))}</td>"
            f"<td>{r['nelbo']:.4f} &plusmn; {r.get('stderr', math.nan):.4f}</td><td>{r.get('ppl', math.nan):.2f}</td>"
            f"<td>{r.get('num_tokens', 0):,}</td><td>{esc(str(r.get('step')))}</td></tr>"
            for name, r in evals
        )
        eval_html = f"<h2>Evaluations (atat eval)</h2><table>{head}{body}</table>"
    figures = "\n".join(
        f'<figure><img src="{esc(path.name)}" alt="{esc(spec.title)}"><figcaption><b>{esc(spec.title)}.</b> '
        f"{esc(spec.caption)}</figcaption></figure>"
        for spec, path in written
    )
    titles = esc(", ".join(s.title for s in missing))
    missing_html = f'<p class="note">Not in this run\'s records: {titles}.</p>' if missing else ""
    config_path = run.run_dir / "config.yaml"
    config = config_path.read_text(errors="replace") if config_path.is_file() else "(no config.yaml in the run folder)"
    subtitle = f"run folder {run.run_dir.resolve()}"
    if run.skipped_lines:
        subtitle += f"; {run.skipped_lines} unreadable line(s) of metrics.jsonl skipped"
    page = _PAGE.format(
        title=esc(f"atat report: {run.run_dir.name}"), subtitle=esc(subtitle), numbers=numbers, evals=eval_html,
        figures=figures, missing=missing_html, config=esc(config),
    )
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Render the run's plots and page into `out_dir` (default RUN_DIR/report). Returns the paths written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(
            "atat report needs matplotlib: pip install matplotlib (or pip install -e '.[report]')"
        ) from None
    run = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written, missing = render_figures(run, out)
    page = write_page(run, out, written, missing)
    return {"page": str(page), "figures": [str(path) for _, path in written], "missing": [s.name for s in missing]}
