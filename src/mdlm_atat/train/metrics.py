"""Metrics: one JSON object per line in the run folder, plus a short console line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm


class MetricsLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(path, "a", buffering=1)  # line-buffered: a crash loses at most one line

    def write(self, record: dict[str, Any], console: bool = True) -> None:
        self._file.write(json.dumps(record) + "\n")
        if console:
            tqdm.write(format_record(record))

    def close(self) -> None:
        self._file.close()


def format_record(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            text = f"{value:.3e}" if (value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5)) else f"{value:.4f}"
            if math.isnan(value):
                text = "nan"
            parts.append(f"{key}={text}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)
