"""Progress bars, on a terminal only: redirected to a file, a bar's carriage-return redraws fill the log with
copies of itself (the metrics lines still go to stdout, one per log step)."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(*args: Any, disable: bool = False, **kwargs: Any):
    """tqdm(...), disabled unless its stream (stderr by default) is a terminal."""
    from tqdm import tqdm

    return tqdm(*args, disable=disable or not interactive(kwargs.get("file") or sys.stderr), **kwargs)


def interactive(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())
