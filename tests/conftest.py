# ---- swarm: leftover child processes (owned by the swarm tests; keep this section small) ----
import os
import signal
import time

import pytest


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, command name), from /proc (empty where there is none)."""
    table = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return table
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[2]), name)
    return table


def _ours() -> set[int]:
    """Our descendants, plus orphans of our process group (p2p daemons whose parent died)."""
    table, me, pgid = _process_table(), os.getpid(), os.getpgrp()
    found, todo = set(), [me]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    found |= {
        pid for pid, (ppid, group, name) in table.items() if group == pgid and (name == "p2pd" or ppid == 1)
    }
    return found - {me}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pids: set[int]) -> None:
    for pid in pids:  # our own children would otherwise linger as zombies
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


_SESSION_HELPERS = (b"resource_tracker", b"forkserver", b"torch_shm_manager")  # meant to outlive a test


def _is_session_helper(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return any(marker in cmdline for marker in _SESSION_HELPERS)


def _kill_new(before: set[int]) -> None:
    leftovers = {p for p in _ours() - before if _alive(p) and not _is_session_helper(p)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in leftovers:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(_alive(p) for p in leftovers):
            _reap(leftovers)
            time.sleep(0.05)
        _reap(leftovers)
        leftovers = {p for p in leftovers if _alive(p)}
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
