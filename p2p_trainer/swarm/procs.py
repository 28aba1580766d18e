"""Child-process hygiene: no p2pd or DHT process may outlive the peer that started it, even when
that peer is killed with SIGKILL (hivemind's DHT process is a plain daemon child: it survives its
parent's hard death, and so does its p2pd)."""

from __future__ import annotations

import os
import signal
import threading
import time


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, command name) of every process, from /proc (empty where
    there is no /proc)."""
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
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[2]), stat[stat.find("(") + 1 : stat.rfind(")")])
    return table


def descendants(pid: int, table: dict[int, tuple[int, int, str]] | None = None) -> list[int]:
    """Child processes of ``pid`` (and theirs); empty where /proc is unavailable."""
    children: dict[int, list[int]] = {}
    for child, (ppid, _, _) in (process_table() if table is None else table).items():
        children.setdefault(ppid, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie that its parent has not reaped yet does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def command_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def command_line(pid: int) -> bytes:
    """The NUL-separated argv of ``pid`` (empty when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def kill_p2pd_children(pid: int, sig: int = signal.SIGTERM) -> None:
    for child in descendants(pid):
        if command_name(child) == "p2pd":
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass


def stop_dht(dht) -> None:
    """Shut a hivemind DHT down and make sure its p2pd went with it (it normally does, not always)."""
    helpers = descendants(dht.pid) if dht.pid else []
    dht.shutdown()
    for pid in helpers:
        if command_name(pid) == "p2pd":
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def abandon(process, grace: float = 5.0) -> None:
    """Stop a child process that may be stuck (e.g. a DHT process whose start was interrupted) and
    its p2pd: SIGTERM, then SIGKILL after ``grace`` seconds; returns once it is gone. A process
    stopped this way may die holding a lock it shares with its parent (hivemind's ``MPFuture``
    locks): only for a process we leave behind on our way out, or one that did not leave by itself."""
    if not process.is_alive():
        return
    kill_p2pd_children(process.pid, signal.SIGKILL)
    process.terminate()
    process.join(grace)
    if process.is_alive():
        process.kill()
        process.join(grace)


def die_with_parent(parent_pid: int, period: float = 1.0) -> None:
    """In a child process: exit, taking our p2pd along, when the parent dies or on SIGTERM.

    Polls ``getppid`` from a daemon thread instead of using PR_SET_PDEATHSIG, which fires when the
    parent *thread* exits and would kill the DHT of a peer that was created in a worker thread."""

    def leave(signum: int = signal.SIGTERM, frame: object = None) -> None:
        kill_p2pd_children(os.getpid())
        os._exit(128 + signum)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(period)
        leave()

    signal.signal(signal.SIGTERM, leave)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
