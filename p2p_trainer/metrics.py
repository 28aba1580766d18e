"""Metrics records: one JSON object per line, as the design's contract names them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO


class MetricsWriter:
    """Appends records to a JSONL file (or nowhere); each line is flushed so readers can follow it."""

    def __init__(self, path: str | Path | None):
        self._file: TextIO | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)

    def write(self, event: str, **fields: Any) -> dict:
        record = {"event": event, **fields, "time": time.time()}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path, event: str | None = None) -> list[dict]:
    """All records of a metrics file (optionally of one event), skipping a torn last line."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event is None or record.get("event") == event:
            records.append(record)
    return records
