"""Metrics: one JSON object per line in the run folder, a short console line, and optional TensorBoard / W&B.

`metrics.jsonl` is the record of a run (the report reads it): every line has an `event` (start, resume, train,
val, atat_val, nonfinite, stopped), the `step` and a wall-clock `time` (unix seconds). The same records go to the
sinks that `build_sinks` opens on rank 0: TensorBoard (`logging.tensorboard`, when the `tensorboard` package is
installed) and Weights & Biases (when `logging.wandb_project` is set; `WANDB_MODE=offline` logs locally). A
missing package or a sink that fails is a one-line note, never the end of a run.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Protocol, TextIO

from tqdm import tqdm

from mdlm_atat.config import Config


TEXT_EVENTS = ("start", "resume", "stopped")  # descriptions, not curves
TABLE_EVENTS = ("masking_profile",)  # tables for the report (viz/report.py): too many numbers for a dashboard


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    def __init__(self, path: Path, sinks: list[Sink] | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(path, "a", buffering=1)  # line-buffered: a crash loses at most one line
        self.sinks = list(sinks or [])

    def write(self, record: dict[str, Any], console: bool = True) -> None:
        self._file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        if console:
            tqdm.write(console_line(record))
        for sink in list(self.sinks):
            try:
                sink.write(record)
            except Exception as err:  # noqa: BLE001 - a logging service must never end a training run
                note(f"{type(sink).__name__} stopped logging ({type(err).__name__}: {err}); metrics.jsonl continues")
                self.sinks.remove(sink)

    def close(self) -> None:
        self._file.close()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001
                note(f"{type(sink).__name__}: closing failed ({type(err).__name__}: {err})")
        self.sinks = []


def format_record(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            text = f"{value:.3e}" if (value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5)) else f"{value:.4f}"
            if math.isnan(value):
                text = "nan"
            parts.append(f"{key}={text}")
        elif isinstance(value, dict):
            continue  # tables (e.g. the masking profile) are for the file and the report, not the console
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def console_line(record: dict[str, Any]) -> str:
    """The console's short form of a record (about 100 characters; metrics.jsonl keeps every number): train and
    validation lines name the numbers a person watches, other events are shown whole without their tables."""
    r, event = record, record.get("event")
    if event == "train":
        line = (f"step {r['step']:>6}  loss {_num(r.get('loss'), '.4f')}  lr {_num(r.get('lr'), '.2e')}  "
                f"grad {_num(r.get('grad_norm'), '.3f')}  {_num(r.get('tokens_per_s'), ',.0f')} tok/s")
        if "stage" in r:  # ATAT: the curriculum and what the masks did
            line += (f"  | {r['stage']} beta {_num(r.get('beta'), '+.2f')} mask {_num(r.get('mask_rate'), '.3f')}"
                     f"/{_num(r.get('mask_rate_expected'), '.3f')} est {_num(r.get('estimator_loss'), '.3f')}")
        if r.get("nonfinite_steps"):
            line += f"  nonfinite {r['nonfinite_steps']}"
        return line
    if event == "val":
        best = "  (best)" if r.get("best") else ""
        return (f"step {r['step']:>6}  validation {_num(r.get('val_nelbo'), '.4f')} +- "
                f"{_num(r.get('val_stderr'), '.4f')} nats/token, PPL {_num(r.get('val_ppl'), ',.2f')} ({r.get('val_tokens', 0):,} tokens){best}")
    if event == "atat_val":
        return (f"step {r['step']:>6}  estimator Spearman {_num(r.get('spearman_estimator'), '.3f')} vs unigram "
                f"{_num(r.get('spearman_frequency_baseline'), '.3f')}")
    return format_record({k: v for k, v in record.items() if not isinstance(v, (list, dict))})


def _num(value: Any, spec: str) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "n/a"
    return "nan" if value != value else format(value, spec)


def note(message: str) -> None:
    tqdm.write(f"note: {message}", file=sys.stderr)


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The record's numbers as (name, value): lists as name/0, name/1...; dicts as name/key; no strings, bools,
    `event`, `step` or `time`."""
    for key, value in record.items():
        if not prefix and key in ("event", "step", "time"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, (int, float)):
            yield name, float(value)
        elif isinstance(value, (list, tuple)):
            yield from scalars({str(i): v for i, v in enumerate(value)}, f"{name}/")
        elif isinstance(value, dict):
            yield from scalars(value, f"{name}/")


class TensorBoardSink:
    """Scalars as `<event>/<key>` against the step (train/loss, val/val_nelbo, atat_val/spearman_estimator...)."""

    def __init__(self, log_dir: Path, cfg: Config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.writer.add_text("config", "```yaml\n" + cfg.to_yaml() + "```")

    def write(self, record: dict[str, Any]) -> None:
        event, step = record.get("event"), record.get("step", 0)
        if event in TEXT_EVENTS:
            self.writer.add_text(event, format_record(record), step)
            return
        if event in TABLE_EVENTS:
            return
        for name, value in scalars(record):
            self.writer.add_scalar(f"{event}/{name}", value, step)
        if event != "train":
            self.writer.flush()  # evaluations are rare: show them at once

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Each record as one `wandb.log` call with `<event>/<key>` names and the training step as the x axis (a
    metric of its own, so that steps re-logged after a resume do not collide with W&B's internal counter)."""

    def __init__(self, run: Any):
        self.run = run
        run.define_metric("step")
        run.define_metric("*", step_metric="step")

    def write(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event in TEXT_EVENTS or event in TABLE_EVENTS:
            return
        self.run.log({"step": record.get("step", 0), **{f"{event}/{k}": v for k, v in scalars(record)}})

    def close(self) -> None:
        self.run.finish()


def build_sinks(cfg: Config, run_dir: Path, is_rank0: bool = True) -> list[Sink]:
    """The optional sinks the config asks for (rank 0 only: other ranks log nothing)."""
    if not is_rank0:
        return []
    sinks: list[Sink] = []
    if cfg.logging.tensorboard:
        try:
            sinks.append(TensorBoardSink(run_dir / "tensorboard", cfg))
        except ImportError:
            note("TensorBoard logging is off: the tensorboard package is not installed (pip install tensorboard, or "
                 "set logging.tensorboard=false to silence this)")
    if cfg.logging.wandb_project:
        run = _open_wandb(cfg, run_dir)
        if run is not None:
            sinks.append(WandbSink(run))
    return sinks


def _open_wandb(cfg: Config, run_dir: Path) -> Any:
    try:
        import wandb
    except ImportError:
        note(f"logging.wandb_project={cfg.logging.wandb_project!r} but the wandb package is not installed (pip "
             "install wandb); logging to metrics.jsonl only")
        return None
    # One W&B run per run folder: the id is kept in the folder, so a resumed run continues the same W&B run.
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if not run_id:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
    try:
        return wandb.init(
            project=cfg.logging.wandb_project,
            entity=cfg.logging.wandb_entity,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=cfg.to_dict(),
        )
    except Exception as err:  # noqa: BLE001 - no network, no login...: say so, keep training
        note(f"W&B did not start ({type(err).__name__}: {err}); set WANDB_MODE=offline to log locally and "
             "`wandb sync` later; logging to metrics.jsonl only")
        return None
