"""What a week-long run on shared machines meets: pre-emption signals, non-finite steps, unusable paths.

- `GracefulStop`: SIGTERM (a scheduler's pre-emption notice) and SIGINT (Ctrl-C) set a flag instead of killing
  the process; the trainer finishes the step in progress, writes checkpoints/last.pt and returns normally, so the
  command exits 0 and `--resume` continues exactly. A second Ctrl-C aborts at once (KeyboardInterrupt) for a user
  who does not want to wait for the save. Kill -9 cannot be caught: the atomic checkpoints (checkpoint.py) and the
  exact resume cover it.
- `NonFiniteGuard`: a step whose loss or gradient norm is NaN or inf is skipped (no optimiser or EMA update; the
  step still counts, so the data position, LR schedule and curriculum stay those of the step number), counted,
  logged as an `event: nonfinite` line, and after `training.max_nonfinite_steps` such steps in a row the run stops
  with a message saying what to try. Deciding needs the values on the host: one device sync per step.
- `check_writable`: the folders a run writes to, checked at start-up so that an unusable path is one line naming
  the key instead of a traceback later.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from mdlm_atat.config import ConfigError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager: while active, SIGTERM / SIGINT set `requested` (the signal's name) instead of killing.

    Handlers can only be installed from the main thread; elsewhere (a trainer called from a worker thread) this is
    a no-op and signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> GracefulStop:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def agreed(self, env: Any = None) -> str | None:
        """The stop request as every rank sees it: under torchrun each process gets the signal at its own moment,
        and all must stop after the same step (the checkpoint gathers are collectives)."""
        if any_rank([self.requested is not None], env)[0]:
            return self.requested or "SIGTERM"
        return None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        if self.requested is None:
            self.requested = name
            hint = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
            # os.write, not print: a handler may run in the middle of another write to the same stream.
            os.write(2, f"\n{name}: finishing this step, then saving a checkpoint and stopping{hint}\n".encode())


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the message names the steps, the checkpoint left and what to try."""


class NonFiniteGuard:
    """Counts non-finite steps; its counters live in the trainer's state (checkpointed, so resume is exact)."""

    def __init__(self, max_in_a_row: int, metrics: Any, last_checkpoint: Path) -> None:
        self.max_in_a_row = max_in_a_row
        self.metrics = metrics
        self.last_checkpoint = last_checkpoint

    def check(self, state: Any, loss: float, grad_norm: float, env: Any = None) -> bool:
        """True to apply the update of step `state.step + 1`; False to skip it (counted and logged). Raises
        NonFiniteError at `max_in_a_row` skipped steps in a row. Under torchrun the ranks decide together (a
        rank's own loss may be the only non-finite number), so their weights stay equal."""
        if not any_rank([not (math.isfinite(loss) and math.isfinite(grad_norm))], env)[0]:
            state.nonfinite_in_a_row = 0
            return True
        step = state.step + 1
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        self.metrics.write(
            {
                "event": "nonfinite",
                "step": step,
                "loss": loss,
                "grad_norm": grad_norm,
                "in_a_row": state.nonfinite_in_a_row,
                "total": state.nonfinite_steps,
                "action": "update skipped",
            }
        )
        if state.nonfinite_in_a_row >= self.max_in_a_row:
            first = step - state.nonfinite_in_a_row + 1
            raise NonFiniteError(
                f"training.max_nonfinite_steps: the loss or gradients were NaN/inf in {state.nonfinite_in_a_row} steps "
                f"in a row (steps {first}-{step}; updates skipped, weights still finite); stopped. Continue from "
                f"{self.last_checkpoint} with --resume after lowering training.learning_rate, checking the data, or "
                "raising training.max_nonfinite_steps"
            )
        return False


def any_rank(flags: list[bool], env: Any = None) -> list[bool]:
    """Each flag OR-ed over the ranks of a torchrun job (one all-reduce of a few numbers); as given for one process.
    `env` is the trainer's DistEnv (its `distributed` and `device`), or None."""
    if env is None or not getattr(env, "distributed", False):
        return list(flags)
    import torch
    import torch.distributed as dist

    values = torch.tensor([float(f) for f in flags], device=env.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def check_writable(folder: str | Path, key: str) -> Path:
    """Create `folder` if needed and check that files can be written there; a ConfigError naming `key` if not."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{key}: cannot write to {str(folder)!r} ({err.strerror or err}); choose a folder you can write to"
        ) from None
    return folder
