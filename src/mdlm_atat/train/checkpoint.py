"""Checkpoints: one file holds everything needed to resume exactly (STYLE principle 5).

Written atomically (temporary file, fsync, rename), so a crash while saving leaves the previous file intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint; the message names the file and what to do."""


class RunDirError(ValueError):
    """The run folder is in a state the command cannot use; the message says what to do."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def resolve_checkpoint(path: str | Path) -> Path:
    """A .pt file, or a run folder (its checkpoints/last.pt)."""
    path = Path(path)
    if path.is_dir():
        candidate = checkpoint_dir(path) / "last.pt"
        if not candidate.is_file():
            raise CheckpointError(f"{path}: no checkpoints/last.pt in this run folder; has it saved a checkpoint yet?")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass a .pt file or a run folder")
    return path


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        # weights_only: a checkpoint is data, never code; our payload is tensors, dicts, lists and numbers.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_python_state(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a host with more GPUs (torchrun's rank 0 saw them all) resumes on fewer.
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _numpy_state() -> tuple:
    # As plain types and a tensor, so the checkpoint loads with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _as_python_state(state: Any) -> tuple:
    # torch.load(weights_only=True) returns the tuple's inner tuple as a list.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
