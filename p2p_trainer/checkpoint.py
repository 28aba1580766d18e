"""Atomic local checkpoints: temp file, fsync, rename, keep the last N.

A checkpoint is one state file (see ``swarm.state_format``): θ, the outer momentum, the residual
and the inner moments laid out like θ, so a peer with any number of local ranks resumes it, and
the run's fingerprint, config and data position in its metadata. A process killed in the middle
of a save leaves at most a stray temp file; the previous checkpoint stays whole because it is never
opened for writing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from p2p_trainer.swarm.state_format import MAX_LOCAL_HEADER, StateFile

_NAME = re.compile(r"^ckpt-(\d{8})\.safetensors$")


def checkpoint_path(folder: str | Path, outer_step: int) -> Path:
    return Path(folder) / f"ckpt-{outer_step:08d}.safetensors"


def save_checkpoint(
    folder: str | Path, outer_step: int, write: Callable[[BinaryIO], object], keep: int = 2
) -> Path:
    """Write the checkpoint of `outer_step` atomically (``write`` streams it into a file), then drop
    all but the newest `keep` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, outer_step)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-ckpt-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temp files of interrupted saves are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_checkpoint(path: str | Path, numel: int | None = None) -> StateFile:
    """A checkpoint, its header checked (θ of ``numel`` values, if given)."""
    try:
        return StateFile(path, numel, max_header=MAX_LOCAL_HEADER)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None


def run_metadata(data: dict, config: dict, fingerprint: dict) -> dict[str, str]:
    """What a checkpoint keeps beside the state (see ``extra``): the data stream's position, the
    config and the run fingerprint."""
    return {"data": json.dumps(data), "config": json.dumps(config), "fingerprint": json.dumps(fingerprint)}


def extra(file: StateFile, key: str) -> Any:
    """What the run stored in a checkpoint's metadata under ``key`` (JSON)."""
    return json.loads(file.metadata[f"extra.{key}"])
