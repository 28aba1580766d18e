"""Atomic local checkpoints: temp file, fsync, rename, keep the last N.

A process killed in the middle of a save leaves at most a stray temp file; the previous
checkpoint stays whole because it is never opened for writing.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def checkpoint_path(folder: str | Path, outer_step: int) -> Path:
    return Path(folder) / f"ckpt-{outer_step:08d}.pt"


def save_checkpoint(folder: str | Path, outer_step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` for `outer_step` atomically, then drop all but the newest `keep` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, outer_step)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-ckpt-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
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


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
