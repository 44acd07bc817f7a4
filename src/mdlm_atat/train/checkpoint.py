"""Checkpoints: one file holds everything needed to resume exactly (STYLE principle 5).

Written atomically (temporary file, fsync, rename), so a crash or a full disk while saving leaves the previous
file intact. Each file gets a sha256 sidecar (`last.pt.sha256`, in `sha256sum -c` format) that loading checks, so
a damaged or truncated file is named as such instead of half-loading. `last.pt` keeps its previous version as
`last.prev.pt` (a hard link, so no copy): resuming falls back to it when `last.pt` is unreadable. The sidecar is
removed before the file it describes is replaced and written after, so a sidecar never describes another file; a
file without one (a crash between the two renames) is loaded unverified, and torch's zip format still catches
truncation.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
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


EXPORT_MARKERS = ("config.json", "model.safetensors")  # what `atat export` writes (export.py)


def is_export_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in EXPORT_MARKERS)


def resolve_checkpoint(path: str | Path) -> Path:
    """A .pt file, a run folder (its checkpoints/last.pt), or a folder written by `atat export` (itself)."""
    path = Path(path)
    if is_export_dir(path):
        return path
    if path.is_dir():
        candidate = checkpoint_dir(path) / "last.pt"
        if not candidate.is_file():
            raise CheckpointError(f"{path}: no checkpoints/last.pt in this run folder; has it saved a checkpoint yet?")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass a .pt file, a run folder or an exported folder")
    return path


LAST, PREVIOUS = "last.pt", "last.prev.pt"


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class _HashingWriter:
    """A file wrapper for torch.save that hashes the bytes on their way to disk (no second read)."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: Path, payload: dict[str, Any], keep_previous: bool | None = None) -> None:
    """Write `payload` to `path` atomically with its sha256 sidecar. `keep_previous` (default: for last.pt) first
    keeps the file being replaced as last.prev.pt. Any OSError (a full disk, a lost mount) leaves what was there
    intact and is raised as a CheckpointError naming the file."""
    path = Path(path)
    keep_previous = path.name == LAST if keep_previous is None else keep_previous
    tmp, sidecar_tmp = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.sha256.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(payload, writer)
            f.flush()
            os.fsync(f.fileno())
        _write_durably(sidecar_tmp, f"{writer.sha.hexdigest()}  {path.name}\n")
        if keep_previous and path.is_file():
            _keep_as_previous(path, path.with_name(PREVIOUS))
        checksum_path(path).unlink(missing_ok=True)  # never let the old sidecar describe the new file
        os.replace(tmp, path)
        os.replace(sidecar_tmp, checksum_path(path))
        _fsync_dir(path.parent)
    except OSError as err:
        for leftover in (tmp, sidecar_tmp):
            leftover.unlink(missing_ok=True)
        raise CheckpointError(
            f"{path}: could not write the checkpoint ({err.strerror or err}); the checkpoint already there is "
            "intact: free space (or fix the folder) and continue with --resume"
        ) from None


def _keep_as_previous(path: Path, previous: Path) -> None:
    checksum_path(previous).unlink(missing_ok=True)
    link = previous.with_name(f".{previous.name}.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)  # the same bytes under a second name: no copy, no extra space
    except OSError:
        shutil.copyfile(path, link)  # a filesystem without hard links
    os.replace(link, previous)
    sidecar = checksum_path(path)
    if sidecar.is_file():
        digest = sidecar.read_text().split()[0]
        _write_durably(checksum_path(previous), f"{digest}  {previous.name}\n")


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def verify_checkpoint(path: Path) -> None:
    """Check `path` against its sha256 sidecar; no sidecar, nothing to check (older or interrupted saves)."""
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return
    expected = (sidecar.read_text().split() or [""])[0]
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: checksum mismatch with {sidecar.name} ({path.stat().st_size} bytes, sha256 {actual[:12]}..., "
            f"expected {expected[:12]}...): the file is damaged or truncated"
        )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    verify_checkpoint(path)
    try:
        # weights_only: a checkpoint is data, never code; our payload is tensors, dicts, lists and numbers.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if path.suffix == ".ckpt":  # most likely a Lightning checkpoint of MDLM's training (mdlm_import.py)
            raise CheckpointError(
                f"{path}: not an atat checkpoint (a pickle of other classes); a Lightning .ckpt of MDLM's training "
                f"is converted once with `atat import --mdlm {path} --out DIR`"
            ) from None
        # Not torch's own message: it advises weights_only=False, which runs whatever code the file holds.
        raise CheckpointError(
            f"{path}: not a readable checkpoint (not a torch file of tensors and plain data: text, a pickled object "
            "or a damaged file); pass a .pt file written by atat train, a run folder or an atat export folder"
        ) from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {reason})") from None


BEST = "best.pt"
RESUME_ORDER = (LAST, PREVIOUS, BEST)  # newest first; best.pt is a full checkpoint too, kept at the best step


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run folder holds a checkpoint to resume from (last.pt, the previous one it keeps, best.pt)."""
    folder = checkpoint_dir(run_dir)
    return any((folder / name).is_file() for name in RESUME_ORDER)


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
