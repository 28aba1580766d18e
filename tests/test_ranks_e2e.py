"""Peers of 1 and 2 local ranks (torchrun, gloo FSDP2, the outer state sharded over the ranks) in one
swarm, with real CLI processes on loopback:

    A (2 ranks) starts the run --> B (1 rank) joins late: downloads from A (2 -> 1 ranks)
    --> A's torchrun agent is SIGKILLed: its workers and daemons go, B trains on
    --> C (2 ranks) joins late: downloads from B (1 -> 2 ranks), with the AdamW moments
    --> Ctrl+C (SIGINT to its process group) stops C cleanly

In every round that two of them share, both hold the same θ hash: the sharded outer step is the
unsharded one. Then each side's checkpoint is resumed by the other world size, θ hashed again from
every rank's share."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2p_trainer.metrics import read_metrics
from p2p_trainer.swarm import procs
from tests.e2e import start, train_args, wait_for_line
from tests.volunteers import ROUND_ARGS, TINY_MODEL, free_port, peer_id_of, plan_first_peer, wait_until

pytestmark = pytest.mark.timeout(300)
COMMON = (*TINY_MODEL, *ROUND_ARGS, "--swarm.min_group_size", "1", "--swarm.download_inner_state", "true")


def _torchrun(args: list[str], log: Path) -> subprocess.Popen:
    """``args`` (a ``train_args`` command) under torchrun with 2 CPU ranks, in its own process group
    (a terminal's Ctrl+C reaches the agent and its workers alike)."""
    assert args[1:3] == ["-m", "p2p_trainer.cli"], args
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
              "127.0.0.1", "--master-port", str(free_port()), *args[1:]]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        launch, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _outer(tmp: Path, name: str) -> dict[int, dict]:
    path = tmp / f"{name}.jsonl"
    return {r["outer_step"]: r for r in read_metrics(path, "outer_step")} if path.exists() else {}


def _shared_rounds(tmp: Path, a: str, b: str) -> list[tuple[dict, dict]]:
    """The records of the rounds ``a`` and ``b`` averaged together (each in the other's group) after
    entering them with the same θ (a round that failed on one side only can leave the two apart
    until the next boundary's check, which is not what this compares)."""
    ra, rb = _outer(tmp, a), _outer(tmp, b)

    def entered(name: str, step: int) -> str | None:  # the last θ it held at step - 1
        path, held = tmp / f"{name}.jsonl", None
        for r in read_metrics(path) if path.exists() else []:
            if r["event"] in ("outer_step", "state_download") and r["outer_step"] == step - 1:
                held = r["params_sha256"]
        return held

    both = sorted(ra.keys() & rb.keys())
    same_start = [s for s in both if entered(a, s) is not None and entered(a, s) == entered(b, s)]
    return [(ra[s], rb[s]) for s in same_start if ra[s]["members"] == rb[s]["members"]]


def _tree(pid: int) -> list[int]:
    return [pid, *procs.descendants(pid)]


def _gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(map(procs.alive, pids)):
        time.sleep(0.2)
    return [p for p in pids if procs.alive(p)]


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(tmp.glob("*.log")))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    first, maddr = plan_first_peer(tmp, "a")
    ckpt = lambda name: ("--checkpoint.dir", str(tmp / f"ckpt-{name}"))  # noqa: E731
    out: dict = {"tmp": tmp, "ids": {"a": peer_id_of(tmp / "a.key")}}
    groups: list[int] = []
    procs_: dict[str, subprocess.Popen] = {}
    try:
        procs_["a"] = _torchrun(train_args(tmp, "a", *first, *COMMON, *ckpt("a")), tmp / "a.log")
        groups.append(procs_["a"].pid)
        wait_until(lambda: len(_outer(tmp, "a")) >= 1, 120, f"A's first outer step\n{_logs(tmp)}")
        procs_["b"] = start(
            train_args(tmp, "b", "--initial-peers", maddr, *COMMON, *ckpt("b")), tmp / "b.log"
        )
        wait_until(lambda: len(_shared_rounds(tmp, "a", "b")) >= 2, 120, f"rounds of A and B\n{_logs(tmp)}")
        tree = _tree(procs_["a"].pid)  # the agent, 2 workers, rank 0's DHT process and its p2pd
        out["a_tree"] = {p: procs.command_name(p) for p in tree}
        procs_["a"].kill()  # the agent only, as a crash would
        procs_["a"].wait()
        out["a_left"] = _gone(tree, 30)
        step = max(_outer(tmp, "b"))
        wait_until(lambda: max(_outer(tmp, "b")) >= step + 2, 60, f"B training on alone\n{_logs(tmp)}")
        b_maddr = wait_for_line(tmp / "b.log", "peer address:", procs_["b"])
        out["ids"]["b"] = b_maddr.rsplit("/p2p/", 1)[1]
        procs_["c"] = _torchrun(train_args(tmp, "c", "--initial-peers", b_maddr, *COMMON), tmp / "c.log")
        groups.append(procs_["c"].pid)
        wait_until(lambda: len(_shared_rounds(tmp, "b", "c")) >= 2, 150, f"rounds of B and C\n{_logs(tmp)}")
        tree = _tree(procs_["c"].pid)
        os.killpg(procs_["c"].pid, signal.SIGINT)  # Ctrl+C in C's terminal
        sent = time.monotonic()
        out["c_code"] = procs_["c"].wait(timeout=60)
        out["c_stop_s"] = time.monotonic() - sent
        out["c_tree"], out["c_left"] = {p: procs.command_name(p) for p in tree}, _gone(tree, 15)
        step = max(_outer(tmp, "b"))
        wait_until(lambda: max(_outer(tmp, "b")) >= step + 1, 60, f"B training on after C left\n{_logs(tmp)}")
    finally:
        for proc in procs_.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs_.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for pgid in groups:  # torchrun workers left behind (the test failed) are in these groups
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for proc in procs_.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out["logs"] = _logs(tmp)
    return out


def test_peers_of_1_and_2_ranks_hold_one_theta_in_every_shared_round(swarm):
    tmp, logs = swarm["tmp"], swarm["logs"]
    for a, b in (("a", "b"), ("b", "c")):
        shared = _shared_rounds(tmp, a, b)
        assert len(shared) >= 2, (a, b, logs)
        for ra, rb in shared:
            assert ra["group_size"] == 2 and ra["params_sha256"] == rb["params_sha256"], (ra, rb, logs)
            assert ra["params_finite"] and rb["params_finite"]


def test_late_joiners_download_across_world_sizes_with_the_inner_moments(swarm):
    tmp, ids, logs = swarm["tmp"], swarm["ids"], swarm["logs"]
    for joiner, donor in (("b", "a"), ("c", "b")):  # 2 -> 1 ranks, then 1 -> 2
        downloads = read_metrics(tmp / f"{joiner}.jsonl", "state_download")
        assert downloads and downloads[0]["donor"] == ids[donor], (joiner, downloads, logs)
        assert downloads[0]["inner_optimizer"], downloads[0]


def test_a_killed_torchrun_agent_leaves_no_process_and_ctrl_c_stops_cleanly(swarm):
    logs = swarm["logs"]
    names = sorted(n or "?" for n in swarm["a_tree"].values())
    assert names.count("p2pd") == 1 and len(swarm["a_tree"]) >= 5, (swarm["a_tree"], logs)
    assert not swarm["a_left"], (swarm["a_left"], logs)
    # torchrun's agent forwards the SIGINT to the workers, waits for them, then exits 1 with its own
    # SignalException; the workers finish cleanly: no traceback of theirs
    assert swarm["c_stop_s"] < 30, (swarm["c_code"], swarm["c_stop_s"], logs)
    c_log = (swarm["tmp"] / "c.log").read_text()
    assert c_log.count("finishing cleanly") == 2, c_log[-4000:]
    for trace in c_log.split("Traceback (most recent call last)")[1:]:
        assert "elastic.multiprocessing.api.SignalException" in trace.split("\n2026-")[0], c_log[-4000:]
    assert not swarm["c_left"], (swarm["c_left"], logs)


@pytest.fixture(scope="module")
def resumed(swarm):
    """Each side's last checkpoint resumed by the other world size, both runs at once (to the step
    it holds: no round, only the load): (writer, ranks) -> (checkpoint step, log)."""
    tmp, runs = swarm["tmp"], {}
    for writer, ranks in (("a", 1), ("b", 2)):
        files = sorted((tmp / f"ckpt-{writer}").glob("ckpt-*.safetensors"))
        assert files, swarm["logs"]
        step = int(files[-1].stem.split("-")[1])
        args = train_args(tmp, f"{writer}-resumed", *COMMON, "--checkpoint.dir", str(tmp / f"ckpt-{writer}"),
                          "--resume", "--max-outer-steps", str(step))  # fmt: skip
        log = tmp / f"{writer}-resumed-{ranks}.log"
        runs[writer, ranks] = (step, log, start(args, log) if ranks == 1 else _torchrun(args, log))
    try:
        return {key: (step, log, proc.wait(timeout=120)) for key, (step, log, proc) in runs.items()}
    finally:
        for (_, ranks), (_, _, proc) in runs.items():
            if ranks > 1:  # its workers too (torchrun's process group, see ``_torchrun``)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            elif proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.mark.parametrize("writer,reader_ranks", [("a", 1), ("b", 2)])
def test_a_checkpoint_resumes_on_another_number_of_ranks(swarm, resumed, writer, reader_ranks):
    step, log, code = resumed[writer, reader_ranks]
    assert code == 0, log.read_text()[-3000:]
    found = re.search(r"resumed from \S+ \(outer step (\d+), θ (\w+), on (\d) rank", log.read_text())
    assert found, log.read_text()[-3000:]
    assert (int(found[1]), int(found[3])) == (step, reader_ranks)
    assert _outer(swarm["tmp"], writer)[step]["params_sha256"].startswith(found[2])
