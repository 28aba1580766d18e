"""The swarm at scale on one machine: 32 swarm-only peers, 20 simultaneous starts of 8, and the memory
of a real debug-config trainer.

    python -m bench.bench_swarm32 [--peers 32] [--rounds 6] [--trials 20] [--trial-peers 8] [--no-trainer]

Every peer is its own process with its own DHT process and p2pd (the real swarm layer on 127.0.0.1).
A swarm-only peer (``peer_main``) behaves like the trainer's leader rank without a model: it publishes
progress every 0.5 s while it "trains" for ``train_s`` seconds (ending early when the swarm moved past
its round, as ``round_is_late`` says), calls ``all_reduce`` with a small vector weighted by its
tokens, applies the average to its θ, serves its state, and downloads the swarm's state when
``out_of_sync`` says it is behind or diverged (what ``CatchUp.check`` does).

Peers are forked from one "zygote" process that imported the swarm layer once: importing torch and
hivemind 32 times on 2 cores would take minutes and measure the import, not the swarm. A forked peer
maps the zygote's pages copy-on-write, so the per-peer memory of a volunteer's standalone process is
measured separately (``standalone_memory``), and the 32-peer rows report RSS, PSS (shared pages
divided among the processes that share them) and the machine's used memory.

Every process started here is gone when ``run`` returns, also on Ctrl+C or SIGTERM: the zygote runs
in its own session, its peers watch it, and the end kills the session's whole process group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from bench._procs import free_port

_CHILD_NAMES = ("dht", "p2pd", "torch_shm_manag")
_POLL_S = 0.1


# ---------------------------------------------------------------- pure helpers (tests/test_bench_swarm32.py)
def parse_smaps_rollup(text: str) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` -> {field: kB}, e.g. {"Rss": 361000, "Pss": ..., "Private_Dirty": ...}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].endswith(":") and parts[2] == "kB":
            out[parts[0][:-1]] = int(parts[1])
    return out


def memory_mb(fields: dict[str, int]) -> dict[str, float]:
    """RSS, PSS and USS (private pages) in MB from ``parse_smaps_rollup`` fields."""
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss": fields.get("Rss", 0) / 1024, "pss": fields.get("Pss", 0) / 1024, "uss": uss / 1024}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation; nan for no values."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile: q={q!r} must be within [0, 1]")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def group_split(sizes: Iterable[int]) -> str:
    """How the members of one round were split into groups: "16+16", "32", "17+8+1" (largest first)."""
    return "+".join(str(s) for s in sorted(sizes, reverse=True)) or "-"


def round_groups(rounds: Iterable[dict]) -> dict[int, list[int]]:
    """Group sizes per outer step from the peers' round events: every member of a group reports the
    same ``group_id``, so each group counts once (a failed round counts as a group of 1)."""
    seen: dict[int, dict[str, int]] = {}
    for r in rounds:
        key = r.get("group_id") or f"alone-{r['peer']}-{r['round']}"
        seen.setdefault(r["step"], {})[key] = r.get("group_size") or 1
    return {step: list(groups.values()) for step, groups in sorted(seen.items())}


def trial_verdict(events: Sequence[dict], n: int) -> dict:
    """Did ``n`` peers started together form ONE swarm? From each peer's events of one trial:
    ``dht``: every peer saw all ``n`` records; ``group``: round 0 was one group of ``n`` members with
    one θ hash afterwards."""
    up = [e for e in events if e["event"] == "seen"]
    rounds = [e for e in events if e["event"] == "round" and e["round"] == 0]
    dht = len(up) == n and all(e["count"] == n for e in up)
    hashes = {e.get("sha") for e in rounds}
    group = len(rounds) == n and all(e.get("group_size") == n for e in rounds) and len(hashes) == 1
    counts = sorted((e["count"] for e in up), reverse=True)
    return {
        "one_swarm": dht and group,
        "dht_one_swarm": dht,
        "one_group": group,
        "records_seen": "/".join(map(str, counts)) if counts else "-",
        "groups": group_split(round_groups(rounds).get(0, [])),
        "see_all_s_max": max((e["seconds"] for e in up if e["count"] == n), default=math.nan),
    }


# ---------------------------------------------------------------- memory of running processes
def _smaps(pid: int) -> dict[str, float] | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return memory_mb(parse_smaps_rollup(f.read()))
    except OSError:
        return None


def tree_memory(pid: int) -> dict[str, float]:
    """A peer's memory in MB: itself, its DHT process, p2pd and torch_shm_manager (RSS, PSS, USS of
    each, and their sums)."""
    from p2p_trainer.swarm import procs

    table = procs.process_table()
    out: dict[str, float] = {}
    for p in [pid, *procs.descendants(pid, table)]:
        mem = _smaps(p)
        if mem is None:
            continue
        name = "main" if p == pid else ("dht" if table[p][2].startswith("python") else table[p][2][:15])
        for key, value in mem.items():
            out[f"{name}_{key}"] = out.get(f"{name}_{key}", 0.0) + value
            out[key] = out.get(key, 0.0) + value
    return out


def group_cpu_s(zygote: int) -> dict[str, float]:
    """CPU seconds used so far by the live processes the zygote forked and theirs, by kind: "peer"
    (the training side), "dht" (hivemind's DHT process), "p2pd", "torch_shm_manag"."""
    from p2p_trainer.swarm import procs

    table, tick = procs.process_table(), os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in procs.descendants(zygote, table):
        ppid, _, name = table[pid]
        kind = "peer" if ppid == zygote else ("dht" if name.startswith("python") else name)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_share(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    """CPU used between two ``group_cpu_s`` readings, in cores, by kind: "dht 1.10, peer 0.20"."""
    used = {k: (after.get(k, 0.0) - before.get(k, 0.0)) / max(seconds, 1e-9) for k in after}
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.005)


# ---------------------------------------------------------------- the swarm-only peer (a forked child)
class _Log:
    """One JSON object per line in this peer's events file (the parent reads it while we run)."""

    def __init__(self, path: str, peer: str) -> None:
        self.f, self.peer = open(path, "a", buffering=1), peer

    def __call__(self, event: str, **fields: object) -> None:
        self.f.write(json.dumps({"event": event, "peer": self.peer, "t": time.time(), **fields}) + "\n")


def _sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.5))


def _wait_for_file(path: str, deadline: float) -> bool:
    while not os.path.exists(path):
        if time.time() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


def peer_main(spec: dict) -> None:
    """One swarm-only peer; ``spec`` is what ``Zygote.fork`` was given (see ``_peer_spec``)."""
    import torch

    from p2p_trainer.contracts import params_sha256
    from p2p_trainer.swarm import SwarmPeer, TrainingState
    from p2p_trainer.swarm.records import out_of_sync, round_is_late
    from p2p_trainer.testing.swarm import local_config

    torch.set_num_threads(1)
    log = _Log(spec["events"], spec["name"])
    cfg = local_config(
        spec["run_id"],
        spec["initial_peers"],
        identity=spec.get("identity", ""),
        host_maddrs=[spec.get("host", "/ip4/127.0.0.1/tcp/0")],
        codec="int8",
        target_group_size=spec["target_group_size"],
        matchmaking_timeout=spec["matchmaking_timeout"],
        allreduce_timeout=spec["allreduce_timeout"],
        join_timeout=spec["join_timeout"],
        state_timeout=20.0,
    )
    _sleep_until(spec["start_at"])
    started = time.time()
    peer = SwarmPeer(cfg, {"run": spec["run_id"], "bench": "swarm32"})
    try:
        log(
            "up",
            join_s=time.time() - started,
            peer_id=peer.peer_id,
            maddrs=peer.visible_maddrs,
            late_s=started - spec["start_at"],
        )
        _run_peer(peer, spec, log, started, torch, params_sha256, TrainingState, out_of_sync, round_is_late)
    finally:
        peer.shutdown()
        log("down")


def _run_peer(peer, spec, log, started, torch, params_sha256, TrainingState, out_of_sync, round_is_late):
    n, numel = spec["expect"], spec["numel"]
    theta = torch.zeros(numel)
    step, sha, inner = 0, params_sha256(theta), 0
    peer.publish_progress(outer_step=0, tokens=0, tokens_per_s=0.0, loss=1.0, params_sha256=sha)
    # how long until this peer sees every peer's record (a fresh DHT read each time)
    deadline, count = time.time() + spec["see_timeout"], 0
    while True:
        with contextlib.suppress(TimeoutError):  # a read the DHT did not answer within 30 s sees nobody new
            count = len(peer.swarm_records())
        if count >= n or time.time() > deadline:
            break
        time.sleep(1.0)
    log("seen", count=count, seconds=time.time() - started)
    if spec.get("barrier") and not _wait_for_file(spec["barrier"], time.time() + 600):
        return
    rng = random.Random(f"{spec['name']}")
    for rnd in range(spec["rounds"]):
        reason = out_of_sync(peer.swarm_records(), peer.peer_id, step, sha, check_hash=True)
        if reason:  # what CatchUp.check does: download the swarm's state, verified
            got = peer.download_state(numel=numel, want_inner=False)
            log(
                "download",
                round=rnd,
                step=step,
                reason=reason,
                ok=got is not None,
                to_step=got.state.outer_step if got else None,
                seconds=got.seconds if got else None,
            )
            if got is not None:  # the state comes as a verified file, read like the trainer reads it
                theta, step = got.state.read("master", 0, numel).clone(), got.state.outer_step
                sha, inner = got.state.params_sha256, got.state.inner_step
                got.state.discard()
                peer.publish_state(TrainingState(step, sha, theta.clone(), None, inner))
                peer.publish_progress(
                    outer_step=step,
                    tokens=0,
                    tokens_per_s=0.0,
                    loss=None,
                    params_sha256=sha,
                    inner_step=inner,
                )
        # the inner round: train_s seconds of "steps" (10 tokens/ms), progress every 0.5 s like the trainer
        t0, tokens, late = time.monotonic(), 0, False
        while time.monotonic() - t0 < spec["train_s"]:
            time.sleep(0.5)
            tokens, inner = int((time.monotonic() - t0) * 1e4), inner + 1
            peer.publish_progress(
                outer_step=step,
                tokens=tokens,
                tokens_per_s=1e4,
                loss=1.0,
                params_sha256=sha,
                inner_step=inner,
            )
            if round_is_late(peer.recent_records(), step, catching_up=False):
                late = True
                break
        delta = torch.randn(numel, generator=torch.Generator().manual_seed(rng.getrandbits(62))).mul_(1e-3)
        t1 = time.monotonic()
        res = peer.all_reduce(outer_step=step, vector=delta, weight=float(max(tokens, 1)))
        round_s = time.monotonic() - t1
        event = dict(
            round=rnd,
            step=step,
            ok=res is not None,
            round_s=round_s,
            late=late,
            seen=len(peer.recent_records()) + 1,
        )
        if res is None:
            log("round", **event, error=peer.last_error[:300])
            continue
        theta.sub_(res.average)
        step, sha = step + 1, params_sha256(theta)
        peer.publish_state(TrainingState(step, sha, theta.clone(), None, inner))
        peer.publish_progress(
            outer_step=step, tokens=0, tokens_per_s=0.0, loss=1.0, params_sha256=sha, inner_step=inner
        )
        log(
            "round",
            **event,
            group_size=res.group_size,
            group_id=getattr(res, "group_id", ""),
            wait_s=res.wait_s,
            allreduce_s=res.allreduce_s,
            sha=sha[:16],
        )
    if spec.get("linger"):  # others may still download from us
        _wait_for_file(spec["linger"], time.time() + 120)


def _child(spec: dict, zygote: int) -> None:
    """In a forked child: log to a file, stop cleanly on SIGTERM or when the zygote is gone."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )

    def leave(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    def watch() -> None:
        while os.getppid() == zygote:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    threading.Thread(target=watch, daemon=True).start()
    code = 0
    try:
        peer_main(spec)
    except KeyboardInterrupt:
        code = 143
    except BaseException as e:
        import traceback

        traceback.print_exc()
        with contextlib.suppress(Exception):
            _Log(spec["events"], spec["name"])("error", error=repr(e)[:500])
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------- the zygote (imports once, forks peers)
def zygote_main() -> int:
    """Read one JSON spec per line on stdin, fork a peer for it, answer {"pid": ...}; EOF ends us and
    our peers."""
    import hivemind  # noqa: F401  (the imports every peer needs, done once)
    import torch  # noqa: F401

    from p2p_trainer.codec import native
    from p2p_trainer.swarm import SwarmPeer  # noqa: F401

    if os.environ.get("BENCH_SWARM32_NO_MEMO"):  # TEMPORARY A/B
        from p2p_trainer.swarm import progress

        progress._Verdicts.get = lambda self, record, check: check(record)
    with contextlib.suppress(Exception):
        native.load()  # builds (or finds) the cached kernel once; loading it starts no thread
    children: set[int] = set()

    def reap(signum: int = 0, frame: object = None) -> None:
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.discard(pid)

    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we end
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(spec, zygote=os.getppid())
        children.add(pid)
        print(json.dumps({"pid": pid, "name": spec["name"]}), flush=True)
    for pid in list(children):  # the parent is gone or done: our peers go too
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while children and time.monotonic() < deadline:
        reap()
        time.sleep(0.1)
    return 0


class Zygote:
    """The parent's handle on the zygote process and everything it forks (one process group)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_swarm32", "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(workdir / "zygote.log", "w"),
            text=True,
            bufsize=1,
            start_new_session=True,  # Ctrl+C reaches us only; we end the whole group ourselves
            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
        )
        self.pgid = self.proc.pid
        self.peers: dict[str, int] = {}
        self._expect(180)

    def _expect(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            tail = (self.workdir / "zygote.log").read_text()[-2000:]
            raise RuntimeError(f"the peer zygote did not answer within {timeout:.0f}s: {tail}")
        return json.loads(line)

    def fork(self, spec: dict) -> int:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        pid = self._expect(30)["pid"]
        self.peers[spec["name"]] = pid
        return pid

    def stop_peers(self, names: Iterable[str] | None = None, timeout: float = 20.0) -> None:
        """SIGTERM (each peer leaves the swarm and stops its DHT and p2pd), then SIGKILL for the rest
        and everything they started."""
        from p2p_trainer.swarm import procs

        pids = [
            self.peers.pop(n) for n in list(names if names is not None else self.peers) if n in self.peers
        ]
        trees = {pid: procs.descendants(pid) for pid in pids}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(procs.alive(p) for p in pids):
            time.sleep(0.1)
        for p in [*pids, *(c for tree in trees.values() for c in tree)]:
            if procs.alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_peers(timeout=15.0)
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)  # anything left: p2pd, torch_shm_manager, a stuck peer
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def leftovers(pgid: int) -> list[int]:
    """Live processes still in the process group ``pgid``."""
    from p2p_trainer.swarm import procs

    return [pid for pid, (_, group, _) in procs.process_table().items() if group == pgid and procs.alive(pid)]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the benchmark like Ctrl+C does (through every ``finally``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------- the parent: reading the peers' events
def read_events(workdir: Path, pattern: str = "*.jsonl") -> list[dict]:
    events = []
    for path in sorted(workdir.glob(pattern)):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def _wait_events(workdir: Path, pattern: str, done, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        events = read_events(workdir, pattern)
        if done(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def finished(events: Iterable[dict], last_round: int) -> set[str]:
    """Peers that logged their round ``last_round``, an error, or left."""
    return {
        e["peer"]
        for e in events
        if (e["event"] == "round" and e["round"] >= last_round) or e["event"] in ("error", "down")
    }


def _peer_spec(workdir: Path, name: str, run_id: str, **fields: object) -> dict:
    spec = dict(
        name=name,
        run_id=run_id,
        events=str(workdir / f"{name}.jsonl"),
        log=str(workdir / f"{name}.log"),
        initial_peers=[],
        start_at=time.time(),
        numel=1 << 18,
        rounds=1,
        train_s=3.0,
        expect=1,
        see_timeout=30.0,
        target_group_size=16,
        matchmaking_timeout=10.0,
        allreduce_timeout=20.0,
        join_timeout=60.0,
    )
    spec.update(fields)
    return spec


def _summary(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "-"
    median, p90, top = statistics.median(values), percentile(values, 0.9), max(values)
    return f"{median:.{digits}f} / {p90:.{digits}f} / {top:.{digits}f}"


# ---------------------------------------------------------------- part 1: 32 peers
def _snapshot(zygote: Zygote) -> dict:
    """Time, CPU so far, each peer's memory and the total PSS of everything the zygote started."""
    return {
        "t": time.monotonic(),
        "cpu": group_cpu_s(zygote.proc.pid),
        "mem": [tree_memory(pid) for pid in zygote.peers.values()],
        "total_pss": tree_memory(zygote.proc.pid).get("pss", 0.0),
        "load": os.getloadavg()[0],
    }


def run_swarm(
    zygote: Zygote,
    workdir: Path,
    *,
    peers: int,
    rounds: int,
    numel: int,
    train_s: float,
    target_group_size: int,
) -> list[dict]:
    """``peers`` peers join through the first one (the other ``peers - 1`` at the same moment), then
    run ``rounds`` trainer-like rounds from a common start."""
    sub = workdir / "swarm"
    sub.mkdir()
    run_id = f"swarm{peers}-{os.getpid()}"
    barrier, linger = str(sub / "go"), str(sub / "stop")
    common = dict(
        numel=numel,
        rounds=rounds,
        train_s=train_s,
        expect=peers,
        see_timeout=120.0,
        target_group_size=target_group_size,
        barrier=barrier,
        linger=linger,
    )
    start = _snapshot(zygote)
    zygote.fork(_peer_spec(sub, "p00", run_id, **common))
    first = _wait_events(sub, "p00.jsonl", lambda ev: any(e["event"] in ("up", "error") for e in ev), 120)
    up0 = next((e for e in first if e["event"] == "up"), None)
    if up0 is None:
        raise RuntimeError(f"the first peer did not start: {first}")
    start_at = time.time() + 1.0
    for i in range(1, peers):
        zygote.fork(
            _peer_spec(sub, f"p{i:02d}", run_id, initial_peers=up0["maddrs"], start_at=start_at, **common)
        )
    events = _wait_events(
        sub, "*.jsonl", lambda ev: sum(e["event"] in ("seen", "error") for e in ev) >= peers, 300
    )
    joined = _snapshot(zygote)
    Path(barrier).touch()
    events = _wait_events(sub, "*.jsonl", lambda ev: len(finished(ev, rounds - 1)) >= peers, 60 + rounds * 90)
    done = _snapshot(zygote)
    Path(linger).touch()
    zygote.stop_peers()
    return summarize_swarm(
        events,
        peers=peers,
        rounds=rounds,
        target_group_size=target_group_size,
        phases={"start": start, "all up": joined, "after rounds": done},
    )


def summarize_swarm(
    events: list[dict], *, peers: int, rounds: int, target_group_size: int, phases: dict[str, dict]
) -> list[dict]:
    ups = [e for e in events if e["event"] == "up"]
    seen = [e for e in events if e["event"] == "seen"]
    rnds = [e for e in events if e["event"] == "round"]
    downloads = [e for e in events if e["event"] == "download"]
    errors = [e for e in events if e["event"] == "error"]
    formed = [e for e in rnds if e["ok"] and e.get("group_size", 0) >= 2]
    per_peer: dict[str, list[bool]] = {}
    for e in rnds:
        per_peer.setdefault(e["peer"], []).append(e["ok"] and e.get("group_size", 0) >= 2)
    shares = [sum(v) / len(v) for v in per_peer.values()]
    fails: dict[str, int] = {}
    for e in [*rnds, *errors]:
        if not e.get("ok", False):
            key = _failure_kind(e.get("error", ""))
            fails[key] = fails.get(key, 0) + 1
    start, up, done = phases["start"], phases["all up"], phases["after rounds"]
    row = {
        "bench": "swarm32",
        "what": f"{peers} peers, {rounds} rounds",
        "peers_up": f"{len(ups)}/{peers}",
        "join_s_med_p90_max": _summary([e["join_s"] for e in ups if e["peer"] != "p00"]),
        "see_all_s_med_p90_max": _summary([e["seconds"] for e in seen if e["count"] == peers]),
        "saw_all_records": f"{sum(e['count'] == peers for e in seen)}/{peers}",
        "records_seen_min": min((e["count"] for e in seen), default=0),
        "all_up_s": round(up["t"] - start["t"], 1),
        "rounds_formed": f"{len(formed)}/{len(rnds)}",
        "formed_share_per_peer_min_med": f"{min(shares):.2f} / {statistics.median(shares):.2f}"
        if shares
        else "-",
        "groups_per_step": " ".join(f"s{s}:{group_split(g)}" for s, g in round_groups(rnds).items()),
        "target_group_size": target_group_size,
        "round_s_med_p90_max": _summary([e["round_s"] for e in formed]),
        "allreduce_s_med_p90_max": _summary([e["allreduce_s"] for e in formed]),
        "downloads_ok": f"{sum(d['ok'] for d in downloads)}/{len(downloads)}",
        "failures": "; ".join(f"{k}: {v}" for k, v in sorted(fails.items())) or "-",
        "cpu_cores_joining": cpu_share(start["cpu"], up["cpu"], up["t"] - start["t"]),
        "cpu_cores_rounds": cpu_share(up["cpu"], done["cpu"], done["t"] - up["t"]),
        "loadavg_up_done": f"{up['load']:.1f} / {done['load']:.1f}",
    }
    rows = [row]
    for label in ("all up", "after rounds"):
        snap = phases[label]["mem"]
        if not snap:
            continue
        rows.append(
            {
                "bench": "swarm32",
                "what": f"memory per peer, {label} (MB, median over {len(snap)} peers)",
                **{
                    k: round(statistics.median(m.get(k, 0.0) for m in snap), 1)
                    for k in (
                        "rss",
                        "pss",
                        "uss",
                        "main_rss",
                        "main_uss",
                        "dht_rss",
                        "dht_uss",
                        "p2pd_rss",
                        "torch_shm_manag_uss",
                    )
                },
                "all_peers_pss_mb": round(phases[label]["total_pss"]),
                "per_peer_pss_mb": round(phases[label]["total_pss"] / len(snap), 1),
            }
        )
    return rows


def _failure_kind(error: str) -> str:
    for marker, kind in (
        ("was formed", "group formed before it asked"),
        ("did not answer", "leader silent"),
        ("could not find a group", "no group in time"),
        ("min_group_size", "too few joined"),
        ("still at outer step", "swarm not at this step"),
        ("refused", "refused"),
        ("redirected", "bad redirect"),
    ):
        if marker in error:
            return kind
    return error[:60] or "unknown"


# ---------------------------------------------------------------- part 2: simultaneous starts
def run_trials(
    zygote: Zygote, workdir: Path, *, trials: int, n: int, mode: str, numel: int, train_s: float
) -> list[dict]:
    """``trials`` times: ``n`` fresh peers started at one moment; ``mode`` "same": all are given the
    first peer's address (its identity and port are fixed beforehand, as a volunteer's bootstrap
    line would be); "ring": peer i is given peer i-1's address (peer 0 the last one's)."""
    from p2p_trainer.swarm.identity import load_identity

    verdicts = []
    for trial in range(trials):
        sub = workdir / f"{mode}{trial:02d}"
        sub.mkdir()
        run_id = f"{mode}{trial}-{os.getpid()}"
        addrs = []
        for i in range(n):
            port = free_port()
            pid = load_identity(str(sub / f"t{i}.key")).peer_id
            addrs.append(f"/ip4/127.0.0.1/tcp/{port}/p2p/{pid}")
        start_at = time.time() + 1.5
        for i in range(n):
            initial = [] if mode == "same" and i == 0 else [addrs[0] if mode == "same" else addrs[i - 1]]
            zygote.fork(
                _peer_spec(
                    sub,
                    f"t{i}",
                    run_id,
                    initial_peers=initial,
                    start_at=start_at,
                    identity=str(sub / f"t{i}.key"),
                    host=addrs[i].rsplit("/p2p/", 1)[0],
                    expect=n,
                    see_timeout=30.0,
                    rounds=1,
                    numel=numel,
                    train_s=train_s,
                    linger=str(sub / "stop"),
                )
            )
        events = _wait_events(sub, "*.jsonl", lambda ev: len(finished(ev, 0)) >= n, 120)
        (sub / "stop").touch()
        zygote.stop_peers()
        verdict = trial_verdict(events, n)
        verdict["trial"] = trial
        verdict["errors"] = [e["error"][:200] for e in events if e["event"] == "error"]
        verdict["round_errors"] = sorted(
            {e.get("error", "")[:160] for e in events if e["event"] == "round" and not e["ok"]}
        )
        verdicts.append(verdict)
        with (workdir / "trials.jsonl").open("a") as f:
            f.write(json.dumps(verdict) + "\n")
        print(f"  trial {trial} ({mode}): {verdict}", file=sys.stderr, flush=True)
    ok = [v for v in verdicts if v["one_swarm"]]
    return [
        {
            "bench": "swarm32",
            "what": f"{trials} simultaneous starts of {n} peers ({mode} initial peer)",
            "one_swarm": f"{len(ok)}/{trials}",
            "dht_one_swarm": f"{sum(v['dht_one_swarm'] for v in verdicts)}/{trials}",
            "one_group_of_n": f"{sum(v['one_group'] for v in verdicts)}/{trials}",
            "see_all_s_med_max": _summary(
                [v["see_all_s_max"] for v in verdicts if not math.isnan(v["see_all_s_max"])]
            ),
            "split_trials": "; ".join(
                f"#{v['trial']}: seen {v['records_seen']}, groups {v['groups']}"
                for v in verdicts
                if not v["one_swarm"]
            )
            or "-",
        }
    ]




# ---------------------------------------------------------------- part 3: memory of real processes
def standalone_memory(workdir: Path) -> dict:
    """What a volunteer's swarm-only peer costs when it is started on its own (no shared zygote)."""
    code = (
        "import json,os,sys,time\n"
        "from bench.bench_swarm32 import tree_memory\n"
        "from p2p_trainer.swarm import SwarmPeer\n"
        "from p2p_trainer.testing.swarm import local_config\n"
        "p = SwarmPeer(local_config('standalone', codec='int8'), {'run': 'x'})\n"
        "time.sleep(2)\n"
        "print(json.dumps(tree_memory(os.getpid())), flush=True)\n"
        "p.shutdown()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, start_new_session=True
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"standalone peer failed: {out.stderr[-1500:]}")
    mem = json.loads(line)
    return {
        "bench": "swarm32",
        "what": "one swarm-only peer started alone (MB)",
        **{k: round(v, 1) for k, v in mem.items() if k.endswith(("rss", "uss")) or k == "pss"},
    }


def trainer_memory(workdir: Path, steps: int = 2, config: str = "configs/debug.toml") -> dict:
    """Peak RSS (and PSS, USS at the peak) of a real `p2p-trainer train` with ``config``, a lone peer,
    over ``steps`` outer steps, sampled every 0.5 s: the trainer, its DHT process and p2pd."""
    argv = [
        sys.executable,
        "-m",
        "p2p_trainer.cli",
        "train",
        "--config",
        config,
        "--max-outer-steps",
        str(steps),
        "--host-maddrs",
        "/ip4/127.0.0.1/tcp/0",
        "--log.eval_every",
        "0",
        "--log.progress_bar",
        "false",
        "--run-id",
        f"mem-{os.getpid()}",
    ]
    log = open(workdir / "trainer.log", "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peak: dict[str, float] = {}
    try:
        while proc.poll() is None:
            mem = tree_memory(proc.pid)
            if mem.get("rss", 0.0) > peak.get("rss", 0.0):
                peak = mem
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {
        "bench": "swarm32",
        "what": f"`p2p-trainer train --config {config}` peak (MB), exit {proc.returncode}",
        **{k: round(v, 1) for k, v in peak.items() if k.endswith(("rss", "uss")) or k == "pss"},
    }


# ---------------------------------------------------------------- entry points
def run(
    peers: int = 32,
    rounds: int = 6,
    trials: int = 20,
    trial_peers: int = 8,
    numel: int = 1 << 18,
    train_s: float = 4.0,
    trial_modes: Sequence[str] = ("same",),
    target_group_size: int = 16,
    trainer: bool = True,
    keep: str = "",
) -> list[dict]:
    """The rows of the three parts; ``keep``: a folder for the peers' events and logs (default: a
    temporary one, removed at the end)."""
    for name, value, least in (
        ("peers", peers, 0),
        ("trials", trials, 0),
        ("trial_peers", trial_peers, 2),
        ("numel", numel, 1),
        ("rounds", rounds, 0),
    ):
        if value < least:
            raise ValueError(f"bench_swarm32: {name}={value} must be >= {least}")
    for mode in trial_modes:
        if mode not in ("same", "ring"):
            raise ValueError(f"bench_swarm32: trial mode {mode!r} is not 'same' or 'ring'")
    rows: list[dict] = []
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="bench-swarm32-") as tmp:
        workdir = Path(keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        zygote = Zygote(workdir)
        try:
            if peers > 1 and rounds > 0:
                rows += run_swarm(
                    zygote,
                    workdir,
                    peers=peers,
                    rounds=rounds,
                    numel=numel,
                    train_s=train_s,
                    target_group_size=target_group_size,
                )
            for mode in trial_modes if trials > 0 else ():
                rows += run_trials(
                    zygote, workdir, trials=trials, n=trial_peers, mode=mode, numel=numel, train_s=train_s
                )
        finally:
            zygote.close()
            left = leftovers(zygote.pgid)
            if left:
                print(f"bench_swarm32: processes left in the peers' group: {left}", file=sys.stderr)
        rows.append(standalone_memory(workdir))
        if trainer:
            rows.append(trainer_memory(workdir))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--trial-peers", type=int, default=8)
    ap.add_argument("--trial-modes", nargs="+", default=["same"])
    ap.add_argument("--numel", type=int, default=1 << 18)
    ap.add_argument("--train-s", type=float, default=4.0)
    ap.add_argument("--target-group-size", type=int, default=16)
    ap.add_argument("--no-trainer", action="store_true")
    ap.add_argument("--keep", default="", help="keep the peers' events and logs in this (new) folder")
    args = ap.parse_args(argv)
    if args.zygote:
        return zygote_main()
    rows = run(
        args.peers,
        args.rounds,
        args.trials,
        args.trial_peers,
        args.numel,
        args.train_s,
        tuple(args.trial_modes),
        args.target_group_size,
        not args.no_trainer,
        args.keep,
    )
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
