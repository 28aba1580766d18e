"""Helpers for end-to-end tests: real `p2p-trainer` processes on loopback, read through their output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2p_trainer.cli", *args]


def start(args: list[str], log: Path, *, threads: int = 1) -> subprocess.Popen:
    """``threads``: torch's intra-op threads (1 where several peers share the cores)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def wait_for_line(log: Path, prefix: str, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The rest of the first line of `log` that starts with `prefix`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no line {prefix!r} in {log}:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def train_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return cli(
        "train",
        "--config",
        "configs/debug.toml",
        "--host-maddrs",
        LOOPBACK,
        "--metrics",
        str(tmp / f"{name}.jsonl"),
        "--log.progress_bar",
        "false",
        *extra,
    )
