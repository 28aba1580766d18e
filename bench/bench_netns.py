"""Round time over rate-limited links, and the compute utilization of real trainers on them.

    python -m bench.bench_netns [--rates 0 100] [--numel 4000000 16000000] [--skip-utilization]

Every peer lives in its own network namespace, made here: a veth pair per peer to one bridge, both
ends of each veth shaped with ``tc tbf`` (the peer's upload and its download, each at the link
rate). ``tbf`` only limits the rate: this kernel has no ``netem``, so there is no added delay, and
the links are LAN-like in latency. Namespaces, veths and the bridge carry the prefix ``p2pb<pid>``;
they are removed afterwards, also when the run fails, and stale ones of dead runs are removed first.
Needs root (``ip netns``); without it the benchmark returns a single row that says so.

Part 1, all-reduce: 2 peers, ``numel`` fp32 each (4M, the size anchors.md measured stock hivemind
at, and 16M, the loopback benchmark's), same peer processes as ``bench_allreduce``, next to the
wire-time lower bound ``2 (N-1)/N x numel x bytes per value / rate``; ours also without its
matchmaking (``x_bound_allreduce_only``), as stock hivemind's figure is. One family after another
(``FAMILIES``: stock hivemind none/fp16, our int8, our fp32), rounds interleaved within a family, and
only that family's peers up: with every family's peers up at once, as on loopback, the rounds of all
of them, stock hivemind's too, spread over 1.1-1.5x of their bounds from round to round on these
2 cores (bench/notes/netns.md); one volunteer machine runs one peer. Then, at 2 peers on a limited
link, the transport's own time for an int8 round's bytes on the same links (``netns_floor``: bare
p2pd streams, no codec or protocol; over TCP as our peers run by default, and over QUIC), our int8
rounds once more with both peers listening on QUIC only (engine ``p2p-trainer, quic``), and each int8
row over the floor of its own transport (``x_floor``). Last, our int8 rounds each followed at once by
that floor on the same peers' own connections (engine ``p2p-trainer beside its floor``; ``x_floor_paired``,
``pairs_within_goal``): p2pd's TCP streams change pace from one 30 s stretch to the next
(bench/notes/netns.md), so only a floor of the same moment tells the round's cost from the transport's.

Part 2, utilization: two ``p2p-trainer train`` processes (debug config, ``--metrics``) in the
namespaces, for several H and link rates. Utilization = time in inner steps / wall time, over the
outer steps after the first (the first round also waits for the second peer to start).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import netns_floor
from bench._procs import loadavg
from bench.bench_allreduce import VARIANTS, measure
from p2p_trainer.metrics import read_metrics
from p2p_trainer.testing.netns import cleanup_stale
from p2p_trainer.testing.netns import ip as _ip

PREFIX = "p2pb"
SUBNET = "10.213.0"
BYTES_PER_VALUE = {"int8": 1, "fp16": 2, "fp32": 4, "none": 4}
ANCHORS = {("hivemind", "none"): 1.60, ("hivemind", "fp16"): 0.69}  # anchors.md, 2 peers, 4M fp32, 100 Mbit
# part 1 measures these families one after another, each with only its own peer processes running
# ... and our int8 rounds over QUIC on the limited links, both peers listening on QUIC only (the
# joiner's reachability check dials it back over QUIC: both are full peers)
QUIC_VARIANTS = [v for v in VARIANTS if v[0] == "ours" and v[1].startswith("int8")]
FAMILIES = [[v for v in VARIANTS if v[0] == "hivemind"], [v for v in VARIANTS if v[1].startswith("int8")],
            [v for v in VARIANTS if v[1].startswith("fp32")]]


# ---------------------------------------------------------------- namespaces
def _tc(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["tc", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


class Namespaces:
    """``n`` namespaces on one bridge; ``shape(rate_mbit)`` limits every link (None: unlimited)."""

    def __init__(self, n: int):
        tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{tag}br"
        self.names = [f"{tag}n{i}" for i in range(n)]
        self.host_ends = [f"{tag}h{i}" for i in range(n)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]

    def __enter__(self) -> Namespaces:
        cleanup_stale(PREFIX)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for ns, host, addr in zip(self.names, self.host_ends, self.addrs, strict=True):
                peer_end = f"{host}p"
                _ip("netns", "add", ns)
                _ip("link", "add", host, "type", "veth", "peer", "name", peer_end)
                _ip("link", "set", peer_end, "netns", ns)
                _ip("link", "set", host, "master", self.bridge)
                _ip("link", "set", host, "up")
                _ip("-n", ns, "link", "set", peer_end, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def shape(self, rate_mbit: float | None, queue_ms: int = 100) -> None:
        for ns, host in zip(self.names, self.host_ends, strict=True):
            for where, dev in ((ns, "eth0"), (None, host)):  # the peer's upload, then its download
                if rate_mbit is None:
                    _tc(where, "qdisc", "del", "dev", dev, "root", check=False)
                else:
                    # burst: a few ms at the rate (and never below a 64 KiB GSO packet); queue_ms of queue
                    burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.004))
                    _tc(where, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                        "burst", str(burst), "latency", f"{queue_ms}ms")

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def close(self) -> None:
        for ns in self.names:
            _ip("netns", "delete", ns, check=False)  # takes its veth end, and so the pair, along
        for host in self.host_ends:
            _ip("link", "delete", host, check=False)
        _ip("link", "delete", self.bridge, check=False)

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    return None


# ---------------------------------------------------------------- part 1: all-reduce
def allreduce_rows(nets: Namespaces, numel: int, rates: list[float | None], rounds: int,
                   workdir: Path) -> list[dict]:
    rows = []
    n = len(nets.names)
    for rate in rates:
        nets.shape(rate)
        before = loadavg()
        results = {}
        prefixes = [nets.prefix(i) for i in range(n)]
        runs = [(v, "tcp") for v in VARIANTS]
        for family in FAMILIES:  # each with only its own peers up (see the module's docstring)
            for v, answers in measure(n, numel, rounds, workdir, hosts=nets.addrs, prefix=prefixes,
                                      variants=family).items():
                results[(v, "tcp")] = answers
        if rate:  # our int8 over QUIC too, on the limited links (see QUIC_VARIANTS)
            runs += [(v, "quic") for v in QUIC_VARIANTS]
            for v, answers in measure(n, numel, rounds, workdir, hosts=nets.addrs, prefix=prefixes,
                                      variants=QUIC_VARIANTS, transport="quic").items():
                results[(v, "quic")] = answers
        # the transport alone carrying an int8 round's bytes, on the same links (netns_floor.py): over
        # TCP, as our peers run, and over QUIC beside it
        floor = {t: netns_floor.row(prefixes, nets.addrs, numel, rate, rounds, workdir, t)
                 for t in ("tcp", "quic")} if rate and n == 2 else {}
        for (engine, codec), transport in runs:
            answers = results[((engine, codec), transport)]
            times = [max(a["round_s"] for a in rnd) for rnd in answers]
            name = "p2p-trainer" if engine == "ours" else "hivemind 1.1.12"
            row = {"bench": "netns", "part": "all-reduce",
                   "engine": name + (", quic" if transport == "quic" else ""), "codec": codec, "peers": n,
                   "MB_per_peer": round(numel * 4 / 1e6, 1),
                   "link_mbit": rate or "unlimited", "round_s": round(statistics.median(times), 3),
                   "min_max_s": f"{min(times):.3f}-{max(times):.3f}"}
            if rate:
                per_value = BYTES_PER_VALUE[codec.partition(":")[0]]  # ours: codec:aggregation
                bound = 2 * (n - 1) / n * numel * per_value * 8 / (rate * 1e6)
                row["wire_bound_s"] = round(bound, 3)
                row["x_bound"] = round(row["round_s"] / bound, 2)
                row.update(netns_floor.spread(times, bound))
                if engine == "ours":
                    # without our matchmaking (stock hivemind's figure leaves its own out)
                    alone = statistics.median(max(a["allreduce_s"] for a in rnd) for rnd in answers)
                    row["allreduce_only_s"] = round(alone, 3)
                    row["x_bound_allreduce_only"] = round(alone / bound, 2)
                    # the bound for the bytes actually sent (headers, codebooks)
                    # max over peers: a reducer's reply still in flight when its own round returns
                    # is missing from that peer's count
                    sent = max(a["bytes_sent"] for a in answers[-1])
                    row["bound_actual_bytes_s"] = round(sent * 8 / (rate * 1e6), 3)
                if transport in floor and codec.startswith("int8"):  # over the floor of its own transport
                    row["x_floor"] = round(row["round_s"] / floor[transport]["round_s"], 2)
                if rate == 100 and (engine, codec) in ANCHORS and n == 2:
                    row["anchor_s"] = ANCHORS[(engine, codec)]
            row["loadavg"] = f"{before} / {loadavg()}"
            rows.append(row)
        rows += list(floor.values())
        if rate and n == 2:  # our int8 rounds each beside a floor of the same moment, same connections
            rows += [netns_floor.paired_row(prefixes, nets.addrs, numel, rate, rounds, workdir, t)
                     for t in ("tcp", "quic")]
    return rows


# ---------------------------------------------------------------- part 2: utilization
def _trainer(nets: Namespaces, i: int, tmp: Path, h: int, steps: int, codec: str, overlap: str, run_id: str,
             initial: str | None) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"{run_id}-{i}.log"
    cmd = [*nets.prefix(i), sys.executable, "-m", "p2p_trainer.cli", "train",
           "--config", "configs/debug.toml",
           "--host-maddrs", f"/ip4/{nets.addrs[i]}/tcp/0", "--metrics", str(tmp / f"{run_id}-{i}.jsonl"),
           "--run-id", run_id, "--max-outer-steps", str(steps), "--log.progress_bar", "false",
           "--log.eval_every", "0", "--inner.steps_per_round", str(h), "--swarm.codec", codec,
           "--outer.overlap", overlap,
           "--swarm.min_group_size", str(len(nets.names)), "--swarm.matchmaking_timeout", "180",
           "--swarm.allreduce_timeout", "120"]
    if initial:
        cmd += ["--initial-peers", initial]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return proc, log


def _wait_line(log: Path, prefix: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"no {prefix!r} in {log}: {log.read_text()[-2000:]}")


def utilization(metrics: Path, tokens_per_step: int, skip_rounds: int = 1) -> dict:
    """Inner-step time over wall time, from the end of outer step ``skip_rounds`` to the last one."""
    inner = read_metrics(metrics, "inner_step")
    outer = read_metrics(metrics, "outer_step")
    start, end = outer[skip_rounds - 1]["time"], outer[-1]["time"]
    steps = [r for r in inner if start < r["time"] <= end]
    compute = sum(tokens_per_step / r["tokens_per_s"] for r in steps)  # each step's own duration
    rounds = outer[skip_rounds:]
    return {"util_pct": round(100 * compute / (end - start), 1),
            "inner_s": round(compute, 1), "wall_s": round(end - start, 1), "rounds": len(rounds),
            "allreduce_s": round(statistics.median(r.get("allreduce_s", 0.0) for r in rounds), 2),
            "wait_s": round(statistics.median(r.get("wait_s", 0.0) for r in rounds), 2),
            "inner_step_s": round(compute / max(1, len(steps)), 3),
            "MB_sent_round": round(statistics.median(r.get("bytes_sent", 0) for r in rounds) / 1e6, 2)}


def utilization_rows(nets: Namespaces, grid: list[tuple[float, int, str, str]], workdir: Path) -> list[dict]:
    from p2p_trainer.config_file import load_config

    cfg = load_config("configs/debug.toml")
    tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    rows = []
    for rate, h, codec, overlap in grid:
        nets.shape(rate)
        steps = 4 if h <= 20 else 3
        run_id = f"util-{int(rate)}-{h}-{codec}-{overlap}"
        before = loadavg()
        procs = []
        try:
            p0, log0 = _trainer(nets, 0, workdir, h, steps, codec, overlap, run_id, None)
            procs.append(p0)
            maddr = _wait_line(log0, "peer address:", p0)
            for i in range(1, len(nets.names)):
                procs.append(_trainer(nets, i, workdir, h, steps, codec, overlap, run_id, maddr)[0])
            for p in procs:
                p.wait(timeout=1200)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait(timeout=30)
        per_peer = [utilization(workdir / f"{run_id}-{i}.jsonl", tokens_per_step)
                    for i in range(len(nets.names))]
        u = min(per_peer, key=lambda r: r["util_pct"])
        rows.append({"bench": "netns", "part": "utilization (2 trainers)", "engine": "p2p-trainer",
                     "codec": codec, "overlap": overlap, "peers": len(nets.names), "link_mbit": rate, "H": h,
                     **u,
                     "util_pct_peers": "/".join(str(p["util_pct"]) for p in per_peer),
                     "loadavg": f"{before} / {loadavg()}"})
    return rows


# (link Mbit/s, H, codec, outer.overlap): blocking int8 and fp32, then the same links with the round
# overlapped, then the sparse codec beside int8 (blocking, and with overlap)
DEFAULT_GRID = [(100, 10, "int8", "none"), (10, 10, "int8", "none"), (10, 10, "fp32", "none"),
                (2, 10, "int8", "none"), (10, 50, "int8", "none"), (2, 50, "int8", "none"),
                (10, 10, "int8", "eager"), (10, 50, "int8", "eager"), (2, 50, "int8", "eager"),
                (2, 10, "int8", "eager"),
                (10, 10, "sparse", "none"), (2, 10, "sparse", "none"), (2, 50, "sparse", "none"),
                (2, 10, "sparse", "eager")]


def run(numels: tuple[int, ...] = (4_000_000, 16_000_000), rates: tuple = (None, 100), rounds: int = 9,
        peers: int = 2, grid: list | None = None, skip_utilization: bool = False) -> list[dict]:
    why = check_root()
    if why:
        return [{"bench": "netns", "skipped": why}]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-netns-"))
    ok = False
    try:
        with Namespaces(peers) as nets:
            for numel in numels:
                rows += allreduce_rows(nets, numel, list(rates), rounds, work)
            if not skip_utilization:
                rows += utilization_rows(nets, grid or DEFAULT_GRID, work)
        ok = True
    finally:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"bench_netns failed; logs kept in {work}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, nargs="+", default=[4_000_000, 16_000_000])
    ap.add_argument("--rates", type=float, nargs="+", default=[0, 100], help="Mbit/s; 0 = unlimited")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--skip-utilization", action="store_true")
    a = ap.parse_args()
    for row in run(tuple(a.numel), tuple(r or None for r in a.rates), a.rounds,
                   skip_utilization=a.skip_utilization):
        print(row)
