"""Elastic membership with real `p2p-trainer` processes on loopback. One swarm (a bootstrap peer and
two trainers) lives through the whole module, in this order: the bootstrap peer is killed, a peer of
another run is refused, a late joiner downloads the state and joins, that joiner is killed with
SIGKILL in the middle of an all-reduce, a trainer leaves on SIGTERM and comes back with --resume.
On the side, SIGTERM stops a lone peer stuck in matchmaking and one stuck retrying an unreachable
initial peer."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from p2p_trainer.metrics import read_metrics
from p2p_trainer.swarm import procs
from tests.e2e import LOOPBACK, cli, start, train_args, wait_for_line

ALLREDUCE_TIMEOUT = 6.0
UNREACHABLE = "QmXGaG9yZ1hJ4R4mV3PR3rQJ4C8hLZNVn8d3ZGgN5Gbp8S"  # nobody listens on the discard port
STALL_S = 3.0  # the joiner sends its parts this late: a window to kill it inside an all-reduce
DEADLINE_FLOOR = STALL_S + 1.5  # the swarm's learned deadlines wait for the joiner's stalled parts
# a tiny model whose steps mostly sleep (the test entry point's --slowdown): rounds of about a
# second, little CPU
COMMON = [
    "--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "4",
    "--model.intermediate_size", "128", "--model.seq_len", "64", "--data.batch_size", "8",
    "--data.micro_batch_size", "8", "--inner.steps_per_round", "5",
    "--log.eval_every", "0", "--swarm.matchmaking_timeout", "5",
    "--swarm.allreduce_timeout", str(ALLREDUCE_TIMEOUT), "--swarm.deadline_floor", str(DEADLINE_FLOOR),
    "--swarm.record_ttl", "10",
    "--swarm.join_timeout", "20", "--swarm.state_timeout", "20", "--swarm.download_inner_state", "true",
]  # fmt: skip



def _test_peer(args: list[str], *faults: str) -> list[str]:
    """``args`` (python -m p2p_trainer.cli ...) through the test entry point: steps 4x as long, and
    the given fault hooks (e.g. every all-reduce part STALL_S late)."""
    assert args[1:3] == ["-m", "p2p_trainer.cli"], args
    return [args[0], "-m", "p2p_trainer.testing.peer", "--slowdown", "4", *faults, *args[3:]]


def _wait(what: str, predicate, timeout: float, logs: list[Path] = ()):
    """The first true value of ``predicate()``; AssertionError (with the logs' tails) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def _outer(tmp: Path, name: str) -> dict[int, dict]:
    path = tmp / f"{name}.jsonl"
    return {r["outer_step"]: r for r in read_metrics(path, "outer_step")} if path.exists() else {}


def _last_step(tmp: Path, name: str) -> int:
    return max(_outer(tmp, name), default=0)


def _both_past(tmp: Path, step: int) -> bool:
    return min(_last_step(tmp, "p0"), _last_step(tmp, "p1")) >= step


def _new_lines(log: Path, seen: int) -> list[str]:
    return log.read_text().splitlines()[seen:]


def _children(pid: int) -> dict[int, str]:
    """The process tree under ``pid``: pid -> command name (the DHT process, p2pd, ...)."""
    return {child: procs.command_name(child) or "?" for child in procs.descendants(pid)}


def _gone(pids, timeout: float) -> list[int]:
    """Wait up to ``timeout`` for ``pids`` to exit; those still alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(map(procs.alive, pids)):
        time.sleep(0.1)
    return [pid for pid in pids if procs.alive(pid)]


def _joined_at(tmp: Path, name: str) -> tuple[dict, dict[int, dict]]:
    """The download a peer joined with (the last before its first round) and its outer-step records."""
    mine = _outer(tmp, name)
    downloads = read_metrics(tmp / f"{name}.jsonl", "state_download")
    downloads = [d for d in downloads if d["outer_step"] < min(mine)]
    assert downloads, f"{name} did not download the state before its first round"
    return downloads[-1], mine


def _peer_id(maddr: str) -> str:
    return maddr.rsplit("/p2p/", 1)[1]


class Swarm:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.maddr: dict[str, str] = {}

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def start_trainer(self, name: str, *extra: str, via: str, slow: bool = False) -> None:
        args = train_args(self.tmp, name, "--initial-peers", via, *COMMON, *extra)
        faults = ["--fault", f"stall:{STALL_S}"] if slow else []
        self.procs[name] = start(_test_peer(args, *faults), self.log(name))

    def address(self, name: str) -> str:
        if name not in self.maddr:
            self.maddr[name] = wait_for_line(self.log(name), "peer address:", self.procs[name], timeout=90)
        return self.maddr[name]

    def logs(self) -> list[Path]:
        return [self.log(n) for n in self.procs]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    s = Swarm(tmp)
    try:
        s.procs["boot"] = start(cli("bootstrap", "--host-maddrs", LOOPBACK), s.log("boot"))
        # the lone peer (its own run) starts now, to share the start-up time with the swarm
        s.procs["lone"] = start(_test_peer(
            train_args(tmp, "lone", *COMMON, "--run-id", "elastic-lone", "--swarm.min_group_size", "2",
                       "--swarm.matchmaking_timeout", "600")), s.log("lone"))  # fmt: skip
        # ... and so does one that keeps retrying an unreachable initial peer
        s.procs["stuck"] = start(_test_peer(
            train_args(tmp, "stuck", *COMMON, "--swarm.join_timeout", "600", "--initial-peers",
                       f"/ip4/127.0.0.1/tcp/9/p2p/{UNREACHABLE}")), s.log("stuck"))  # fmt: skip
        boot = wait_for_line(s.log("boot"), "initial peer:", s.procs["boot"])
        s.start_trainer("p0", "--checkpoint.dir", str(tmp / "ckpt0"), "--checkpoint.keep", "2", via=boot)
        s.start_trainer("p1", via=boot)
        _wait("two rounds", lambda: _both_past(tmp, 2), 120, s.logs())
        yield s
    finally:
        for proc in s.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.timeout(180)
def test_training_goes_on_when_the_bootstrap_peer_is_killed(swarm):
    tmp = swarm.tmp
    swarm.procs["boot"].kill()
    swarm.procs["boot"].wait()
    killed_at = max(_last_step(tmp, "p0"), _last_step(tmp, "p1"))
    target = killed_at + 3
    _wait("3 rounds without the bootstrap peer", lambda: _both_past(tmp, target), 60, swarm.logs())
    p0, p1 = _outer(tmp, "p0"), _outer(tmp, "p1")
    for step in range(killed_at + 1, target + 1):
        assert p0[step]["params_sha256"] == p1[step]["params_sha256"], step
        assert p0[step]["group_size"] == 2


@pytest.mark.timeout(120)
def test_sigterm_during_a_blocking_round_exits_zero_within_10s(swarm):
    """The lone peer waits for a partner (min_group_size 2) that never comes: SIGTERM must not wait
    out its 600 s matchmaking timeout."""
    proc, log = swarm.procs["lone"], swarm.log("lone")
    _wait("the lone peer in matchmaking", lambda: "round 0: looking for a group" in log.read_text(), 90)
    time.sleep(0.5)
    children = _children(proc.pid)
    assert "p2pd" in children.values(), children
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log.read_text()[-3000:]
    assert time.monotonic() - sent < 10
    assert not _gone(children, 5), "left behind"
    assert "round 0 abandoned" in log.read_text()


@pytest.mark.timeout(120)
def test_sigterm_while_joining_exits_zero_within_10s(swarm):
    """A peer retrying an unreachable initial peer (for up to join_timeout) stops at once."""
    proc, log = swarm.procs["stuck"], swarm.log("stuck")
    _wait("the peer to retry its join", lambda: "initial peers unreachable" in log.read_text(), 90)
    children = _children(proc.pid)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log.read_text()[-3000:]
    assert time.monotonic() - sent < 10
    assert not _gone(children, 5), "left behind"


@pytest.mark.timeout(120)
def test_a_peer_of_another_run_is_refused_with_one_line_and_exit_2(swarm):
    args = train_args(swarm.tmp, "wrong", "--initial-peers", swarm.address("p0"), *COMMON,
                      "--model.hidden_size", "96")  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(_test_peer(args), capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("p2p-trainer train: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "model.hidden_size: the swarm has 64, this peer has 96" in errors[0]
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def joined(swarm):
    """A late joiner (the slow peer) comes in through a trainer's address, not the bootstrap's."""
    swarm.start_trainer("j", via=swarm.address("p1"), slow=True)
    tmp = swarm.tmp
    _wait("the joiner's first outer step", lambda: _outer(tmp, "j"), 120, swarm.logs())
    return swarm


@pytest.mark.timeout(180)
def test_a_late_joiner_downloads_the_state_and_then_agrees_with_everyone(joined):
    tmp = joined.tmp
    download, mine = _joined_at(tmp, "j")
    step = download["outer_step"]
    assert step >= 5 and download["donor"] in {_peer_id(joined.address(n)) for n in ("p0", "p1")}
    assert download["inner_optimizer"]  # the donor's AdamW state came along (download_inner_state)
    # it took over the schedule position too: its first inner step continues the donor's count
    first_inner = [r for r in read_metrics(tmp / "j.jsonl", "inner_step") if r["outer_step"] == step][0]
    assert first_inner["step"] == download["inner_step"] + 1
    # ... which is the donor's own count when it reached that step (a round may close after fewer
    # than H steps when the swarm moves on, so it need not be 5 * step)
    donor = next(n for n in ("p0", "p1") if _peer_id(joined.address(n)) == download["donor"])
    donor_inner = read_metrics(tmp / f"{donor}.jsonl", "inner_step")
    donor_steps = [r["step"] for r in donor_inner if r["outer_step"] < step]
    assert download["inner_step"] == donor_steps[-1] >= step, (download, donor_steps[-6:])
    # it joined the very next round, and after it holds exactly the others' θ
    assert min(mine) == step + 1 and mine[step + 1]["group_size"] == 3, mine[min(mine)]
    _wait("the others' record of that round",
          lambda: step + 1 in _outer(tmp, "p0") and step + 1 in _outer(tmp, "p1"), 30)  # fmt: skip
    for other in ("p0", "p1"):
        assert _outer(tmp, other)[step + 1]["params_sha256"] == mine[step + 1]["params_sha256"]
    assert "θ matches the hash" in joined.log("j").read_text()


@pytest.fixture(scope="module")
def crashed(joined):
    """SIGKILL the joiner while its all-reduce is under way (its parts are on hold for STALL_S)."""
    tmp, victim = joined.tmp, joined.procs["j"]
    seen = len(joined.log("j").read_text().splitlines())

    def round_started() -> int | None:
        for line in _new_lines(joined.log("j"), seen):
            if ": all-reduce in group " in line:
                return int(line.split("round ")[1].split(":")[0])
        return None

    step = _wait("the joiner's next all-reduce", round_started, 60, joined.logs())
    children = _children(victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _wait("the survivors' round and 3 more", lambda: _both_past(tmp, step + 4), 90, joined.logs())
    return joined, step, children, _gone(children, 15)


@pytest.mark.timeout(180)
def test_a_peer_killed_mid_round_is_left_out_and_training_goes_on(crashed):
    swarm, step, children, left = crashed
    tmp, victim_id = swarm.tmp, _peer_id(swarm.address("j"))
    p0, p1 = _outer(tmp, "p0"), _outer(tmp, "p1")
    # the round it died in completed without it, within the all-reduce bound
    for records in (p0, p1):
        done = records[step + 1]
        assert done["group_size"] == 3 and victim_id in done["excluded"], done
        assert done["allreduce_s"] < ALLREDUCE_TIMEOUT + 2
    for s in range(step + 1, step + 5):
        assert p0[s]["params_sha256"] == p1[s]["params_sha256"], s
        assert p0[s]["params_finite"] and p1[s]["params_finite"]
        assert math.isfinite(p0[s]["loss"]) and math.isfinite(p1[s]["loss"])
    assert "p2pd" in children.values(), children
    assert not left, f"the killed peer left processes behind: {left}"


@pytest.fixture(scope="module")
def resumed(crashed):
    """p0 leaves on SIGTERM while it looks for a group, then comes back with --resume."""
    swarm = crashed[0]
    tmp, p0 = swarm.tmp, swarm.procs["p0"]
    seen = len(swarm.log("p0").read_text().splitlines())
    in_matchmaking = lambda: any(": looking for a group" in x for x in _new_lines(swarm.log("p0"), seen))
    _wait("p0 in matchmaking", in_matchmaking, 30, swarm.logs())
    children = _children(p0.pid)
    sent = time.monotonic()
    p0.send_signal(signal.SIGTERM)
    code = p0.wait(timeout=20)
    leave_s = time.monotonic() - sent
    left = _gone(children, 5)
    checkpoint_step = max(int(p.stem.split("-")[1]) for p in (tmp / "ckpt0").glob("ckpt-*.safetensors"))
    _wait("the swarm (p1 alone) to move ahead",
          lambda: _last_step(tmp, "p1") >= checkpoint_step + 3, 60, swarm.logs())  # fmt: skip
    swarm.start_trainer("p0b", "--checkpoint.dir", str(tmp / "ckpt0"), "--resume", via=swarm.address("p1"))
    _wait("the resumed peer's first outer step", lambda: _outer(tmp, "p0b"), 120, swarm.logs())
    return swarm, code, leave_s, children, left, checkpoint_step


@pytest.mark.timeout(180)
def test_sigterm_in_a_swarm_exits_zero_within_10s_leaving_no_process(resumed):
    _, code, leave_s, children, left, _ = resumed
    assert code == 0 and leave_s < 10, (code, leave_s)
    assert "p2pd" in children.values(), children
    assert not left, f"left behind: {left}"


@pytest.mark.timeout(180)
def test_resume_downloads_when_the_swarm_is_ahead_of_the_checkpoint(resumed):
    swarm, _, _, _, _, checkpoint_step = resumed
    tmp = swarm.tmp
    download, mine = _joined_at(tmp, "p0b")
    assert download["outer_step"] > checkpoint_step
    log = swarm.log("p0b").read_text()
    assert f"resumed from the local checkpoint of outer step {checkpoint_step}" in log
    assert "downloading the swarm's state" in log
    first = min(mine)
    assert first == download["outer_step"] + 1
    _wait("p1's record of that round", lambda: first in _outer(tmp, "p1"), 30)
    assert _outer(tmp, "p1")[first]["params_sha256"] == mine[first]["params_sha256"]
