"""The run folder: who may write it, what a new run may find there, what a resumed run may change.

- `RunLock`: one `atat train` per run folder. A lock file (`RUN/.atat.lock`) names its holder (PID, host, start
  time) and is held with `flock`, which the kernel releases when the holder dies, even by kill -9: a second
  command on the same folder gets one line naming the holder, and a folder whose holder is gone is taken over
  with a note. A holder on another host (a shared filesystem, where `flock` may not reach across hosts) refreshes
  the file's time every `HEARTBEAT_S`; its lock counts as stale once that stops for `STALE_S`.
- `check_new_run_dir`: a new run never writes into a folder that already holds a run's files.
- `check_resume_config`: a resumed run keeps the model its checkpoint holds; an override that would change it
  is refused before anything is written.
- `trim_metrics`: on resume, metrics.jsonl drops the records of steps after the checkpoint (they are run again,
  to the same numbers) and any line a kill cut short.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mdlm_atat.config import Config, ConfigError
from mdlm_atat.train.checkpoint import RunDirError

LOCK_NAME = ".atat.lock"
HEARTBEAT_S = 60.0
STALE_S = 600.0
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "tensorboard", "wandb_run_id")  # what a run writes

try:
    import fcntl
except ImportError:  # Windows: the holder's PID and host decide alone
    fcntl = None


def _flock(fd: int) -> bool | None:
    """True: locked; False: another live process holds it; None: this filesystem has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK / EOPNOTSUPP: some network filesystems
        return None


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    try:
        holder = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"


class RunLock:
    """Held from `acquire` to `release`; the file is removed on release."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="atat-run-lock", daemon=True)
        self._beat.start()

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the run folder's lock, or raise RunDirError naming the live holder."""
        path = Path(run_dir) / LOCK_NAME
        host = socket.gethostname()
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _flock(fd)
                holder = _read_holder(fd)
                if locked is False:
                    raise RunDirError(_in_use(run_dir, holder, path))
                try:
                    if os.stat(path).st_ino != os.fstat(fd).st_ino:
                        raise FileNotFoundError  # released and removed between our open and our lock: try again
                except FileNotFoundError:
                    os.close(fd)
                    continue
                if holder:
                    same_host = holder.get("host") == host
                    pid = holder.get("pid")
                    if same_host and locked is None and _pid_alive(pid) and pid != os.getpid():  # no flock here
                        raise RunDirError(_in_use(run_dir, holder, path))
                    if not same_host and time.time() - os.fstat(fd).st_mtime < STALE_S:
                        raise RunDirError(_in_use(run_dir, holder, path))
                    print(f"note: {path}: taking over the lock of {_describe(holder)}, which is no longer running",
                          file=sys.stderr)
                record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "command": " ".join(sys.argv)}
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(record) + "\n").encode())
                os.fsync(fd)
                return cls(path, fd)
            except BaseException:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                raise

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.fd < 0:
            return
        self._stop.set()
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()  # before closing: a waiter that opened this file sees it gone and retries
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _in_use(run_dir: Path, holder: dict[str, Any], path: Path) -> str:
    return (
        f"{run_dir}: in use by another atat train ({_describe(holder)}); wait for it to finish or stop it, or choose "
        f"another --log-dir (if that process is gone for good, delete {path})"
    )


def check_new_run_dir(run_dir: Path) -> None:
    """A new run starts in a new or empty folder, never over another run's config, metrics or checkpoints."""
    found = [name for name in RUN_FILES if (Path(run_dir) / name).exists()]
    if found:
        raise RunDirError(
            f"{run_dir}: already holds a run ({', '.join(found)}); add --resume to continue it, or choose another "
            "--log-dir"
        )


# Keys a checkpoint's tensors (or their meaning) depend on: a resumed run cannot change them.
FIXED_ON_RESUME = (
    *(f"model.{key}" for key in ("name", "size", "hidden_dim", "num_layers", "num_heads", "cond_dim", "mlp_ratio",
                                 "time_conditioning", "vocab_size", "pad_vocab_multiple")),
    "data.tokenizer", "data.tokenizer_vocab_size", "data.max_length", "data.framing",
    "atat.enabled", "atat.importance_mode", "atat.estimator_hidden_dim", "atat.estimator_num_layers",
    "atat.estimator_num_heads", "atat.estimator_cond_dim",
)


def check_resume_config(saved: dict[str, Any], cfg: Config, checkpoint: Path) -> None:
    """A ConfigError naming the first key where `cfg` (the saved config plus overrides) changes the model."""
    new = cfg.to_dict()
    for key in FIXED_ON_RESUME:
        section, name = key.split(".")
        old_value = (saved.get(section) or {}).get(name)
        if name not in (saved.get(section) or {}):
            continue  # a key older checkpoints did not record
        if key == "model.vocab_size" and new[section][name] is None:
            continue  # null: the tokenizer's, which the checkpoint's tokenizer gives
        if new[section][name] != old_value:
            raise ConfigError(
                f"{key}: {new[section][name]!r} differs from {old_value!r} in {checkpoint}; a resumed run keeps the "
                "model its checkpoint holds: drop the override, or start a new run in another --log-dir"
            )


def trim_metrics(path: Path, step: int) -> int:
    """Keep the records of steps <= `step` (the checkpoint resumed from) and drop lines cut short; returns how
    many lines were dropped. Written atomically: a crash here leaves the file as it was."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += int(bool(line.strip()))
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped or not path.read_bytes().endswith(b"\n") and path.stat().st_size:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped
