# ---- swarm: leftover child processes (owned by the swarm tests; keep this section small) ----
import os
import signal
import time

import pytest

from p2p_trainer.swarm import procs

_SESSION_HELPERS = (b"resource_tracker", b"forkserver", b"torch_shm_manager")  # meant to outlive a test


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one process group per worker: the sweep below takes the
        os.setpgid(0, 0)  # p2p daemons of its own group only, never another worker's


def _ours() -> set[int]:
    """Our descendants, plus orphans of our process group (p2p daemons whose parent died)."""
    table, me, pgid = procs.process_table(), os.getpid(), os.getpgrp()
    found = set(procs.descendants(me, table))
    found |= {
        pid for pid, (ppid, group, name) in table.items() if group == pgid and (name == "p2pd" or ppid == 1)
    }
    return found - {me}


def _reap(pids: set[int]) -> None:
    for pid in pids:  # our own children would otherwise linger as zombies
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _is_session_helper(pid: int) -> bool:
    cmdline = procs.command_line(pid)
    return any(marker in cmdline for marker in _SESSION_HELPERS)


def _kill_new(before: set[int]) -> None:
    leftovers = {p for p in _ours() - before if procs.alive(p) and not _is_session_helper(p)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in leftovers:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(procs.alive(p) for p in leftovers):
            _reap(leftovers)
            time.sleep(0.05)
        _reap(leftovers)
        leftovers = {p for p in leftovers if procs.alive(p)}
        if not leftovers:
            return


@pytest.fixture(autouse=True, scope="module")
def _kill_module_leftovers():
    before = _ours()
    yield
    _kill_new(before)


@pytest.fixture(autouse=True)
def _kill_test_leftovers():
    before = _ours()  # taken after module fixtures started their processes, so those survive
    yield
    _kill_new(before)


# ---- end of swarm section ----
