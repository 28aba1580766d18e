"""Peer processes for the all-reduce benchmarks, and the line protocol that drives them.

A worker is one peer: ``python -m bench._procs --engine ours|hivemind ...``, started as a plain
subprocess or under ``ip netns exec NAME``. It hosts one engine with one or more codecs (ours: a
``SwarmPeer`` per codec; hivemind: one DHT and a ``DecentralizedAverager`` per compression), reads
commands on stdin and answers one JSON object per line on stdout (logs go to stderr):

    -> {"maddrs": {codec: [...]}}            once the DHTs are up (only rank 0's are used)
    <- prepare CODEC ROUND                  publish progress / look for a group, then:
    -> {"ready": ROUND}                     (hivemind: group found, waiting for the trigger)
    <- go CODEC ROUND T                     at wall-clock time T (all peers share the clock), run it
    -> {"round_s": ..., "peak_extra_bytes": ..., ...}
    <- floor CODEC ROUND T                  ours: at T, the transport alone carrying a round's bytes on
    -> {"floor_s": ...}                     that codec's own connections (see ``_Ours.floor``)
    <- quit

Memory: ``peak_extra_bytes`` is the most heap memory in use during the round (glibc ``mallinfo2``,
every arena and mmapped block, so torch tensors and Python bytes alike, sampled every millisecond
in a thread) above what was in use when it began, in the process that runs the round (ours: the
peer; hivemind: its averager process, measured as peak RSS, ``VmHWM`` reset before the round, above
the RSS at the start). The p2pd daemons are not counted, for either engine.

Rounds start at one agreed time T, so ``round_s = max over peers (end - T)`` is the round's wall time.
Ours is timed from ``all_reduce`` entry (its matchmaking included); stock hivemind's matchmaking is done
before T (``require_trigger``), so it is timed from the trigger: a comparison that favours hivemind.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

# what a peer listens on (``--transport``); p2pd carries libp2p streams over either
MADDRS = {"tcp": "/ip4/{host}/tcp/0", "quic": "/ip4/{host}/udp/0/quic-v1"}
# ours: codec:aggregation (``clip`` is the default aggregation, ``mean`` the plain weighted mean)
ENGINE_CODECS = {"ours": ("int8:clip", "int8:mean", "fp32:clip", "fp32:mean"), "hivemind": ("none", "fp16")}


# ---------------------------------------------------------------- parent side
class Worker:
    """One peer process; ``send`` a command, ``expect`` the next JSON answer (with a timeout)."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict | None = None):
        self.log = log
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, bufsize=1,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"worker {self.proc.pid} silent for {timeout:.0f}s; log: "
                                   f"{self.tail()}") from None
            if line is None:
                raise RuntimeError(f"worker {self.proc.pid} exited ({self.proc.wait()}); log: {self.tail()}")
            if line.startswith("{"):
                return json.loads(line)

    def tail(self, chars: int = 2500) -> str:
        try:
            return self.log.read_text()[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()  # the worker's DHT processes die with it (they watch their parent)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


def start_group(engine: str, world: int, numel: int, workdir: Path, *, hosts: Sequence[str],
                prefix: Sequence[Sequence[str]] = (), codecs: Sequence[str] = (),
                run_id: str = "bench", transport: str = "tcp", recheck: float | None = None) -> list[Worker]:
    """Start ``world`` peers of one engine: rank 0 first, the others join through it. ``transport``:
    what the peers listen on (``MADDRS``); ``recheck``: ours' ``swarm.recheck`` (None: the default)."""
    codecs = list(codecs or ENGINE_CODECS[engine])
    workers: list[Worker] = []

    def launch(rank: int, maddrs: dict) -> Worker:
        argv = [*(prefix[rank] if prefix else ()), sys.executable, "-m", "bench._procs",
                "--engine", engine, "--rank", str(rank), "--world", str(world), "--numel", str(numel),
                "--host", hosts[rank], "--codecs", *codecs, "--run-id", run_id,
                "--initial-peers", json.dumps(maddrs), "--transport", transport]
        if recheck is not None:
            argv += ["--recheck", str(recheck)]
        workers.append(Worker(argv, workdir / f"{engine}-{world}-{rank}.log"))
        return workers[-1]

    try:
        maddrs = launch(0, {}).expect(180)["maddrs"]
        for w in [launch(rank, maddrs) for rank in range(1, world)]:  # the rest join at once
            w.expect(180)
        return workers
    except BaseException:
        stop_all(workers)
        raise


def stop_all(workers: Sequence[Worker]) -> None:
    threads = [threading.Thread(target=w.stop) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_round(workers: Sequence[Worker], codec: str, rnd: int, timeout: float = 180.0) -> list[dict]:
    """One synchronised round on every worker; returns each peer's answer."""
    for w in workers:
        w.send(f"prepare {codec} {rnd}")
    for w in workers:
        w.expect(timeout)
    start = time.time() + 0.3
    for w in workers:
        w.send(f"go {codec} {rnd} {start!r}")
    answers = [w.expect(timeout) for w in workers]
    # the result's hash and error only once every peer is done: a peer that finished first would
    # otherwise spend the cores on them while the slowest peer, whose time is the round's, still runs
    for w in workers:
        w.send(f"check {codec} {rnd}")
    for answer, w in zip(answers, workers, strict=True):
        answer.update(w.expect(timeout))
    return answers


def run_floor(workers: Sequence[Worker], codec: str, rnd: int, timeout: float = 180.0) -> float:
    """The transport alone carrying a round's bytes on ``codec``'s connections, all peers at once
    (ours only); returns the slowest peer's time."""
    start = time.time() + 0.3
    for w in workers:
        w.send(f"floor {codec} {rnd} {start!r}")
    return max(w.expect(timeout)["floor_s"] for w in workers)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- worker side
def _vector(numel: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(numel, generator=g).mul_(1e-3)  # pseudo-gradient-like scale


def _exact_mean(numel: int, world: int):
    import torch

    acc = torch.zeros(numel)
    for r in range(world):
        acc.add_(_vector(numel, r))
    return acc.div_(world)


def _sha(t) -> str:
    return hashlib.sha256(memoryview(t.contiguous().numpy()).cast("B")).hexdigest()[:16]


def _rel_err(result, exact) -> float:
    return float((result - exact).norm() / exact.norm())


class _mallinfo2(ctypes.Structure):
    _names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
              "keepcost")
    _fields_ = [(name, ctypes.c_size_t) for name in _names]


class HeapPeak:
    """Peak bytes of heap in use above the level at ``__enter__``, sampled every ``every_s`` in a
    thread (``mallinfo2`` takes the allocator's locks briefly and releases the GIL)."""

    def __init__(self, every_s: float = 0.001):
        self.every_s, self.peak = every_s, 0
        try:
            self._info = ctypes.CDLL("libc.so.6").mallinfo2
            self._info.restype = _mallinfo2
        except (OSError, AttributeError):  # not glibc >= 2.33: nothing to report
            self._info = None

    def _in_use(self) -> int:
        m = self._info()
        return m.uordblks + m.hblkhd

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self._in_use() - self._base)

    def __enter__(self) -> HeapPeak:
        if self._info is not None:
            self._base, self._stop = self._in_use(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._info is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._in_use() - self._base)


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_peak_start(pid: int) -> int:
    """Reset ``pid``'s peak RSS (``clear_refs`` 5) and return its RSS now, in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return 1024 * _status_kb(pid, "VmRSS")


def rss_peak_since(pid: int, start: int) -> int:
    return 1024 * _status_kb(pid, "VmHWM") - start


class _Ours:
    def __init__(self, args, initial: dict):
        from p2p_trainer.swarm import SwarmPeer
        from p2p_trainer.testing.swarm import local_config

        self.world, self.peers = args.world, {}
        extra = {} if args.recheck is None else {"recheck": args.recheck}
        for variant in args.codecs:  # codec:aggregation
            codec, _, aggregation = variant.partition(":")
            cfg = local_config(f"{args.run_id}-{codec}-{aggregation or 'clip'}", initial.get(variant, []),
                               codec=codec, aggregation=aggregation or "clip", **extra,
                               host_maddrs=[MADDRS[args.transport].format(host=args.host)],
                               target_group_size=args.world,
                               min_group_size=args.world, matchmaking_timeout=60.0,
                               allreduce_timeout=120.0, join_timeout=60.0)
            self.peers[variant] = SwarmPeer(cfg, {"run": args.run_id})
        self.outs: dict = {}  # codec -> the tensor its rounds decode the average into, kept across rounds
        # the floor beside the rounds: each peer pair's int8 part (bench/netns_floor.py), echoed back
        from bench import netns_floor  # not at the top: netns_floor imports this module

        self.floor_part = args.numel // args.world
        for peer in self.peers.values():
            peer.node.call(netns_floor.serve(peer.node.p2p, self.floor_part), timeout=30.0)
        self._payload = b""

    def maddrs(self) -> dict:
        return {c: p.visible_maddrs for c, p in self.peers.items()}

    def prepare(self, codec: str, rnd: int, vector) -> None:
        peer = self.peers[codec]
        deadline, published = time.monotonic() + 60, -1.0
        while True:
            if time.monotonic() - published > 2.0:  # again now and then, should a store have been lost
                peer.publish_progress(outer_step=rnd, tokens=1, tokens_per_s=0.0, loss=1.0, params_sha256="")
                published = time.monotonic()
            records = peer.swarm_records()
            if sum(r.outer_step == rnd for r in records.values()) >= self.world:
                return
            if time.monotonic() > deadline:
                seen = {pid[-6:]: r.outer_step for pid, r in records.items()}
                raise TimeoutError(f"{peer.peer_id[-6:]}: not every peer reached round {rnd}: {seen}")
            time.sleep(0.05)

    def go(self, codec: str, rnd: int, vector) -> tuple[dict, object]:
        # as the trainer does (outer_sync), the average goes into a tensor kept across rounds; it
        # still counts in the round's peak, as the new tensor it replaces did
        out = self.outs.get(codec)
        cpu = time.process_time()
        with HeapPeak() as heap:
            res = self.peers[codec].all_reduce(outer_step=rnd, vector=vector, weight=1.0, out=out)
        cpu = time.process_time() - cpu
        if res is None:
            raise RuntimeError(f"round {rnd} ({codec}) failed")
        peak = heap.peak + (out.numel() * 4 if out is not None else 0)
        self.outs[codec] = res.average
        return {"allreduce_s": res.allreduce_s, "wait_s": res.wait_s, "group_size": res.group_size,
                "bytes_sent": res.bytes_sent, "bytes_received": res.bytes_received,
                "peak_extra_bytes": peak, "cpu_s": cpu}, res.average

    def floor(self, codec: str, start: float) -> float:
        """The seconds from ``start`` until this peer sent its int8 part of a round's bytes to every
        other peer and got it echoed back, on the p2pd connections the rounds of ``codec`` use: the
        transport's own time for those bytes, at that moment (its TCP streams change pace from one
        30 s stretch to the next: bench/notes/netns.md)."""
        from hivemind.p2p import PeerID

        from bench import netns_floor

        peer = self.peers[codec]
        others = [PeerID.from_base58(pid) for pid in peer.swarm_records() if pid != peer.peer_id]
        self._payload = self._payload or os.urandom(self.floor_part)  # made once, on first use
        time.sleep(max(0.0, start - time.time()))
        peer.node.call(netns_floor.transfer(peer.node.p2p, others, self._payload), timeout=120.0)
        return time.time() - start

    def close(self) -> None:
        for p in self.peers.values():
            p.shutdown()


class _Hivemind:
    def __init__(self, args, initial: dict):
        import hivemind

        self.hivemind = hivemind
        self.dht = hivemind.DHT(start=True, host_maddrs=[MADDRS[args.transport].format(host=args.host)],
                                initial_peers=initial.get("dht") or None)
        self.args, self.averagers, self.tensors, self.controls = args, {}, {}, {}

    def maddrs(self) -> dict:
        return {"dht": [str(m) for m in self.dht.get_visible_maddrs()]}

    def build(self, vector) -> None:
        """After the DHT is up (it forks): the averagers fork their own processes with shared tensors."""
        from hivemind.averaging import DecentralizedAverager
        from hivemind.compression import Float16Compression, NoCompression

        compressions = {"none": NoCompression(), "fp16": Float16Compression()}
        for codec in self.args.codecs:
            self.tensors[codec] = vector.clone()
            self.averagers[codec] = DecentralizedAverager(
                [self.tensors[codec]], self.dht, start=True, prefix=f"{self.args.run_id}_{codec}",
                target_group_size=self.args.world, min_group_size=self.args.world, min_matchmaking_time=2.0,
                request_timeout=5.0, allreduce_timeout=120.0, compression=compressions[codec])

    def prepare(self, codec: str, rnd: int, vector) -> None:
        from hivemind.averaging.control import AveragingStage
        from hivemind.utils import get_dht_time

        avg = self.averagers[codec]
        with avg.get_tensors() as tensors:
            tensors[0].copy_(vector)
        control = avg.step(scheduled_time=get_dht_time() + 3.0, wait=False, require_trigger=True, timeout=150)
        deadline = time.monotonic() + 90
        while control.stage != AveragingStage.AWAITING_TRIGGER:
            if control.done():
                control.result()  # raises the failure
                raise RuntimeError("the averaging step ended before its trigger")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no hivemind group for round {rnd} ({codec})")
            time.sleep(0.01)
        self.controls[codec] = control

    def go(self, codec: str, rnd: int, vector) -> tuple[dict, object]:
        control = self.controls.pop(codec)
        pid = self.averagers[codec].pid
        start = rss_peak_start(pid)
        control.allow_allreduce()
        gathered = control.result(timeout=150)
        end = time.time()
        peak = rss_peak_since(pid, start)
        with self.averagers[codec].get_tensors() as tensors:
            out = tensors[0].clone()
        return {"group_size": len(gathered or {}), "_end": end, "peak_extra_bytes": peak}, out

    def close(self) -> None:
        for avg in self.averagers.values():
            avg.shutdown()
        self.dht.shutdown()


def worker_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=sorted(ENGINE_CODECS), required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--numel", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--codecs", nargs="+", required=True)
    p.add_argument("--run-id", default="bench")
    p.add_argument("--initial-peers", default="{}")
    p.add_argument("--transport", choices=sorted(MADDRS), default="tcp")
    p.add_argument("--recheck", type=float, default=None, help="ours: swarm.recheck (default: the config's)")
    args = p.parse_args(argv)
    out = sys.stdout

    def say(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    # the DHTs fork first, before any big tensor exists
    engine = (_Ours if args.engine == "ours" else _Hivemind)(args, json.loads(args.initial_peers))
    vector = _vector(args.numel, args.rank)
    if isinstance(engine, _Hivemind):
        engine.build(vector)
    exact = _exact_mean(args.numel, args.world) if args.rank == 0 else None
    say({"maddrs": engine.maddrs()})
    result = None
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            codec, rnd = cmd[1], int(cmd[2])
            if cmd[0] == "prepare":
                engine.prepare(codec, rnd, vector)
                say({"ready": rnd})
            elif cmd[0] == "go":
                start = float(cmd[3])
                time.sleep(max(0.0, start - time.time()))
                info, result = engine.go(codec, rnd, vector)
                end = info.pop("_end", time.time())
                info.update(round_s=end - start)
                say(info)
            elif cmd[0] == "floor":
                say({"floor_s": engine.floor(codec, float(cmd[3]))})
            elif cmd[0] == "check":  # the last round's result, after every peer finished it
                info = {"sha": _sha(result)}
                if exact is not None:
                    info["rel_err"] = _rel_err(result, exact)
                result = None
                say(info)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
