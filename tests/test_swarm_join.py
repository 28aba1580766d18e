"""Getting into the swarm: multiaddr checks, unreachable initial peers, joining through the stock
`hivemind-dht` CLI, the run fingerprint, persistent identities, the daemon's cores, and
progress-record validation."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from p2p_trainer.contracts import first_difference
from p2p_trainer.swarm import (
    MultiaddrError,
    Observer,
    ProgressRecord,
    SwarmError,
    SwarmPeer,
    procs,
    swarm_outer_step,
)
from p2p_trainer.testing import swarm as st

PEER = "QmXGaG9yZ1hJ4R4mV3PR3rQJ4C8hLZNVn8d3ZGgN5Gbp8S"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("initial_peers", "/ip4/1.2.3/tcp/31337/p2p/" + PEER),  # not an IPv4 address
        ("initial_peers", "/ip4/127.0.0.1/tcp/31337"),  # no /p2p/<peer id>
        ("initial_peers", "127.0.0.1:31337"),
        ("host_maddrs", "/ip4/0.0.0.0/tcp/99999"),
        ("announce_maddrs", "/ip4/1.2.3.4/tcp/0"),  # others cannot dial port 0
    ],
)
def test_malformed_multiaddr_is_named_in_a_one_line_error(field, bad):
    cfg = st.local_config("bad-maddr", **{field: [bad]})
    with pytest.raises(MultiaddrError) as info:
        SwarmPeer(cfg, {})
    message = str(info.value)
    assert bad in message and field in message and "\n" not in message
    assert isinstance(info.value, ValueError)


@pytest.mark.timeout(30)
def test_unreachable_initial_peer_fails_with_a_clear_error_after_join_timeout():
    maddr = f"/ip4/127.0.0.1/tcp/9/p2p/{PEER}"  # discard port: nobody listens there
    started = time.monotonic()
    with pytest.raises(SwarmError) as info:
        SwarmPeer(st.local_config("unreachable", [maddr], join_timeout=1.5), {})
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert maddr in message and "reachable" in message and "\n" not in message
    assert 1.5 <= elapsed < 10


def _start_stock_dht() -> tuple[subprocess.Popen, str]:
    cli = os.path.join(os.path.dirname(sys.executable), "hivemind-dht")
    proc = subprocess.Popen(
        [cli, "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--refresh_period", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: we can stop it and its p2pd together
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in list(lines):
            found = re.search(r"--initial_peers (\S+/p2p/\S+)", line)
            if found:
                return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("hivemind-dht did not print its multiaddr:\n" + "".join(lines))


@pytest.mark.timeout(90)
def test_join_through_stock_hivemind_dht_and_check_the_fingerprint():
    proc, maddr = _start_stock_dht()
    peers: list[SwarmPeer] = []
    try:
        fingerprint = {"model": {"hidden_size": 128, "num_layers": 4}, "codec": "fp32"}
        peers = st.start_peers(2, "via-stock", initial_peers=[maddr], fingerprint=fingerprint)
        # both joined only through the stock node, yet they see each other and can average
        st.announce_step(peers, 3)
        assert swarm_outer_step(peers[1].swarm_records()) == 3
        results = st.run_round(peers, 3, [torch.ones(1000), torch.zeros(1000)], [1.0, 3.0])
        assert all(r is not None and r.group_size == 2 for r in results)
        assert torch.equal(results[0].average, torch.full((1000,), 0.25))

        # an observer (what `p2p-trainer status` needs) sees the run without publishing anything
        with Observer(st.local_config("via-stock", [maddr], client_mode=True)) as observer:
            assert observer.run_fingerprint() == fingerprint
            assert set(observer.swarm_records()) == {p.peer_id for p in peers}

        other = {"model": {"hidden_size": 256, "num_layers": 4}, "codec": "fp32"}
        with pytest.raises(SwarmError, match=r"model\.hidden_size: the swarm has 128, this peer has 256"):
            SwarmPeer(st.local_config("via-stock", [maddr]), other)
    finally:
        for peer in peers:
            peer.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI shuts down cleanly on SIGTERM
        try:
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(30)
def test_identity_file_keeps_the_peer_id_across_restarts(tmp_path):
    cfg = st.local_config("identity", identity=str(tmp_path / "peer.key"))
    with SwarmPeer(cfg, {}) as peer:
        first = peer.peer_id
        assert all(m.endswith("/p2p/" + first) for m in peer.visible_maddrs)
    with SwarmPeer(cfg, {}) as peer:
        assert peer.peer_id == first


_INTERRUPTED_JOIN = """
import json, os, signal, threading, time
from p2p_trainer.swarm import SwarmPeer, procs
from p2p_trainer.testing import swarm
seen = []

def fire_once_p2pd_runs():
    while True:
        table = procs.process_table()
        daemons = [pid for pid in procs.descendants(os.getpid(), table) if table[pid][2] == "p2pd"]
        if daemons:  # each with the DHT process that started it
            seen.extend({*daemons, *(table[pid][0] for pid in daemons)} - {os.getpid()})
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        time.sleep(0.005)

def interrupt(*_):
    raise KeyboardInterrupt

signal.signal(signal.SIGUSR1, interrupt)
threading.Thread(target=fire_once_p2pd_runs, daemon=True).start()
try:
    SwarmPeer(swarm.local_config("interrupted", [%r], join_timeout=30), {})
    print(json.dumps({"interrupted": False}))
except KeyboardInterrupt:
    left = [(pid, procs.command_line(pid).decode(errors="replace")[:80]) for pid in seen if procs.alive(pid)]
    print(json.dumps({"interrupted": True, "seen": seen, "left": left}))
"""


@pytest.mark.timeout(60)
def test_an_interrupted_join_leaves_no_dht_process_or_p2pd_behind():
    """Ctrl+C or SIGTERM (the trainer raises KeyboardInterrupt while joining) that lands while the DHT
    process is starting: by the time the exception reaches the peer, that process and its p2pd are
    gone. (In a process of its own: a process stopped mid-start may take a lock it shares with its
    parent along, see ``procs.abandon``.)"""
    maddr = f"/ip4/127.0.0.1/tcp/9/p2p/{PEER}"  # the start fails, and is retried, until join_timeout
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_JOIN % maddr], capture_output=True, text=True,
                          timeout=50)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["interrupted"] and result["seen"], result  # the interrupt came while p2pd ran
    assert result["left"] == [], "left behind"


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.decode().partition("=") for item in f.read().split(b"\0") if item]
    return {key: value for key, _, value in pairs}


@pytest.mark.timeout(30)
def test_p2pd_runs_on_the_configured_number_of_cores():
    with SwarmPeer(st.local_config("daemon-threads", daemon_threads=3), {}):
        daemons = [pid for pid in procs.descendants(os.getpid()) if procs.command_name(pid) == "p2pd"]
        assert daemons, "no p2pd under this process"
        assert {_environ(pid).get("GOMAXPROCS") for pid in daemons} == {"3"}
    assert "GOMAXPROCS" not in os.environ  # the setting is the daemon's, not the training process's


def _record(**changes):
    wire = dict(
        peer_id="Qm",
        outer_step=3,
        tokens=10,
        tokens_per_s=1.5,
        loss=2.0,
        params_sha256="",
        client_mode=False,
        time=1.0,
    )
    wire.update(changes)
    return wire


@pytest.mark.parametrize(
    "changes",
    [
        {"outer_step": 3.0},  # type conversions are refused
        {"tokens": -1},
        {"params_sha256": "xyz"},
        {"extra": 1},
        {"loss": "2.0"},
    ],
)
def test_malformed_progress_records_are_refused(changes):
    with pytest.raises(ValueError):
        ProgressRecord.from_wire(_record(**changes))


def test_progress_record_round_trip_and_swarm_step_is_a_median():
    record = ProgressRecord.from_wire(_record(loss=None))
    assert ProgressRecord.from_wire(record.to_wire()) == record
    records = {
        str(i): ProgressRecord.from_wire(_record(outer_step=s)) for i, s in enumerate([4, 5, 5, 10**6])
    }
    assert swarm_outer_step(records) == 5  # one peer claiming a huge step does not drag the swarm along


def test_first_difference_names_the_field():
    assert (
        first_difference({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
        == "b.c: the swarm has 2, this peer has 3"
    )
    assert first_difference({"a": 1}, {"a": 1}) is None


_CRASHING_PEER = """
import os, time
from p2p_trainer.swarm import procs
from p2p_trainer.testing import swarm
peer = swarm.start_peers(1, "crash")[0]
print(" ".join(str(p) for p in procs.descendants(os.getpid())), flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_a_killed_peer_leaves_no_dht_process_or_p2pd_behind():
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_PEER], stdout=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        children += [int(pid) for pid in proc.stdout.readline().split()]
        names = {procs.command_name(pid) for pid in children}
        assert "p2pd" in names, names
        proc.kill()  # SIGKILL: no cleanup code of the peer runs
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(procs.alive(pid) for pid in children):
            time.sleep(0.1)
        assert not [pid for pid in children if procs.alive(pid)], "orphans left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in children:
            if procs.alive(pid):
                os.kill(pid, signal.SIGKILL)

