"""Helpers of the volunteer tests (client mode, notebook, status): a swarm whose first peer has a
known address before it starts, so that every process of a test can start at once."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# every peer of these tests: short rounds, no held-out evaluation
ROUND_ARGS = ("--inner.steps_per_round", "5", "--log.eval_every", "0")
# a tiny model for tests about the swarm rather than the model: its steps take milliseconds
TINY_MODEL = (
    "--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "4",
    "--model.intermediate_size", "128", "--model.seq_len", "64", "--data.batch_size", "8",
    "--data.micro_batch_size", "8",
)  # fmt: skip
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_first_peer(tmp: Path, name: str) -> tuple[list[str], str]:
    """`train` arguments that pin a first peer's identity and port, and the multiaddr others pass
    to `--initial-peers` (it ends with the peer id)."""
    from p2p_trainer.swarm.identity import load_identity

    key = tmp / f"{name}.key"
    peer_id = load_identity(str(key)).peer_id  # creates the key file
    host = f"/ip4/127.0.0.1/tcp/{free_port()}"
    return ["--identity", str(key), "--host-maddrs", host], f"{host}/p2p/{peer_id}"


def peer_id_of(key: Path) -> str:
    from p2p_trainer.swarm.identity import load_identity

    return load_identity(str(key)).peer_id


def wait_until(check: Callable[[], T], timeout: float, what: str, period: float = 0.5) -> T:
    """The first truthy value of ``check()``; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(period)


def stop_all(procs: dict[str, subprocess.Popen], timeout: float = 30.0) -> dict[str, int]:
    """SIGINT to every process at once (each may be mid-round), then their exit codes; one that
    does not exit in time is killed and reports -9."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    codes = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = proc.wait()
    return codes
