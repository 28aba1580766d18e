"""The transport's own time for a 2-peer round's bytes: the yardstick beside ``bench_netns``'s rounds.

Two bare hivemind ``P2P`` daemons (the p2pd our peers and stock hivemind run on, one Go core as
``swarm.daemon_threads`` gives ours), one in each namespace, over TCP (yamux streams, as our peers
and stock hivemind use) or QUIC (``--transport quic``: p2pd's other transport, for comparison). In
each transfer both send the other ``part_bytes`` in 1 MiB frames on one new stream while echoing
every frame they receive back on the stream it came on, as a reducer returns averaged chunks as
they arrive: each upload carries one part and one part's worth of replies, the bytes of a 2-peer
int8 round without any codec, protocol or matchmaking. A transfer's time is the slower side's, from
an agreed start until all of its echoes are back; its bound is ``2 x part_bytes x 8 / rate``.

    python -m bench.netns_floor --host ADDR --part-bytes N [--transport tcp|quic] [--initial-peers ...]

(a worker process: ``measure`` starts two and drives them over stdin, as ``bench._procs`` does)

``paired_row`` times the same transfer on our own peers' connections instead, right after each of
their rounds: a floor of the same moment, where the transport's pace changes from minute to minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench._procs import MADDRS, Worker, stop_all

CHUNK = 1 << 20
PROTOCOL = "bench-floor"


async def _echo(_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    left = size
    while left:
        frame = await reader.readexactly(min(CHUNK, left))
        left -= len(frame)
        writer.write(frame)
        await writer.drain()
    await reader.read()  # the sender closes once every echo is back
    writer.close()


async def _transfer(p2p, other, payload: bytes) -> None:
    _, reader, writer = await p2p.call_binary_stream_handler(other, PROTOCOL)

    async def read_back() -> None:
        if await reader.readexactly(len(payload)) != payload:
            raise RuntimeError("the echo differs from what was sent")

    back = asyncio.ensure_future(read_back())
    try:
        for i in range(0, len(payload), CHUNK):
            writer.write(payload[i:i + CHUNK])
            await writer.drain()
        await back
    finally:
        back.cancel()
        writer.close()


async def serve(p2p, part_bytes: int) -> None:
    """The receiving side: echo back the ``part_bytes`` of every transfer that reaches ``p2p``."""
    await p2p.add_binary_stream_handler(PROTOCOL, lambda *a: _echo(*a, size=part_bytes))


async def transfer(p2p, others, payload: bytes) -> None:
    """``payload`` to each of ``others`` at once, each on a new stream, until every echo is back."""
    await asyncio.gather(*(_transfer(p2p, other, payload) for other in others))


async def worker(host: str, part_bytes: int, transport: str, initial: list[str]) -> None:
    """Answers the parent on stdout (``bench._procs.Worker``): its addresses, then for each
    ``go <peer id> <start>`` the seconds from ``start`` until all of its echoes were back."""
    from hivemind.p2p import P2P, PeerID

    def say(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    p2p = await P2P.create(host_maddrs=[MADDRS[transport].format(host=host)], initial_peers=initial,
                           nat_port_map=False, auto_nat=False)
    try:
        await serve(p2p, part_bytes)
        say({"id": p2p.peer_id.to_base58(), "maddrs": [str(m) for m in await p2p.get_visible_maddrs()]})
        payload, loop = os.urandom(part_bytes), asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, sys.stdin.readline)).split()[:1] == ["go"]:
            _, other, start = line.split()
            await asyncio.sleep(max(0.0, float(start) - time.time()))
            await transfer(p2p, [PeerID.from_base58(other)], payload)
            say({"s": time.time() - float(start)})
    finally:
        await p2p.shutdown()


def measure(prefixes: list[list[str]], hosts: list[str], part_bytes: int, transfers: int,
            workdir: Path, timeout: float = 120.0, transport: str = "tcp") -> list[float]:
    """Each transfer's time (the slower side's), two worker processes under ``prefixes``."""
    workers: list[Worker] = []

    def launch(r: int, initial: list[str]) -> dict:
        argv = [*prefixes[r], sys.executable, "-m", "bench.netns_floor", "--host", hosts[r], "--part-bytes",
                str(part_bytes), "--transport", transport, "--initial-peers", *initial]
        # p2pd inherits GOMAXPROCS, as our peers' daemons do
        workers.append(Worker(argv, Path(workdir) / f"floor-{transport}-{r}.log", env={"GOMAXPROCS": "1"}))
        return workers[-1].expect(timeout)

    try:
        me = [launch(0, [])]
        me.append(launch(1, me[0]["maddrs"]))
        times = []
        for t in range(transfers + 1):  # the first warms the connection up and is not counted
            start = time.time() + 0.2
            for w, other in zip(workers, reversed(me), strict=True):
                w.send(f"go {other['id']} {start!r}")
            # each answers once its own echoes are back, so after both no byte is in flight
            seconds = max(w.expect(timeout)["s"] for w in workers)
            if t:
                times.append(seconds)
        return times
    finally:
        stop_all(workers)


GOAL = 1.15  # issue 12: a 2-peer int8 round within 1.15x of its wire bound


def spread(times: list[float], bound: float, what: str = "rounds") -> dict:
    """Every round over the bound, in the order they ran (p2pd's TCP streams switch between a fast
    and a slow regime from one 30 s stretch to the next: bench/notes/netns.md), and how many met
    the goal."""
    return {f"{what}_x_bound": " ".join(f"{t / bound:.2f}" for t in times),
            f"{what}_within_goal": f"{sum(t <= GOAL * bound for t in times)}/{len(times)}"}


def row(prefixes: list[list[str]], hosts: list[str], numel: int, rate_mbit: float, transfers: int,
        workdir: Path, transport: str = "tcp") -> dict:
    """A floor row of ``bench_netns`` part 1: a 2-peer int8 round's bytes (half the vector a peer)."""
    part = numel // 2
    times = measure(prefixes, hosts, part, transfers, workdir, transport=transport)
    bound = 2 * part * 8 / (rate_mbit * 1e6)
    median = statistics.median(times)
    return {"bench": "netns", "part": "all-reduce", "engine": f"p2pd streams, {transport} (floor)",
            "codec": "int8 bytes",
            "peers": 2, "MB_per_peer": round(numel * 4 / 1e6, 1), "link_mbit": rate_mbit,
            "round_s": round(median, 3), "min_max_s": f"{min(times):.3f}-{max(times):.3f}",
            "wire_bound_s": round(bound, 3), "x_bound": round(median / bound, 2), **spread(times, bound)}


def paired_row(prefixes: list[list[str]], hosts: list[str], numel: int, rate_mbit: float, pairs: int,
               workdir: Path, transport: str = "tcp", codec: str = "int8:clip") -> dict:
    """Our 2-peer int8 rounds, each followed at once by the transport alone carrying the same bytes
    on the same p2pd connections (``bench._procs``' ``floor``): both see the transport's pace of
    that moment, which ``row``'s floor, taken minutes apart on daemons of its own, does not.
    ``x_floor_paired``: the median of each round over the floor right after it."""
    from bench._procs import run_floor, run_round, start_group

    workers = start_group("ours", 2, numel, Path(workdir), hosts=hosts, prefix=prefixes, codecs=[codec],
                          run_id=f"paired-{transport}", transport=transport)
    rounds, alone, sent, floors = [], [], [], []
    try:
        for rnd in range(pairs + 1):  # the first pair warms up and is not counted
            answers = run_round(workers, codec, rnd)
            floor = run_floor(workers, codec, rnd)
            if rnd:
                rounds.append(max(a["round_s"] for a in answers))
                alone.append(max(a["allreduce_s"] for a in answers))
                sent.append(max(a["bytes_sent"] for a in answers))
                floors.append(floor)
    finally:
        stop_all(workers)
    bound = 2 * (numel // 2) * 8 / (rate_mbit * 1e6)
    ratios = [r / f for r, f in zip(rounds, floors, strict=True)]
    alone_ratios = [a / f for a, f in zip(alone, floors, strict=True)]
    # a round in which a slice was re-checked (swarm.recheck) carries about 1.5x the floor's bytes
    rechecked = [i for i, b in enumerate(sent) if b > 1.25 * numel]
    return {"bench": "netns", "part": "all-reduce", "engine": f"p2p-trainer beside its floor, {transport}",
            "codec": codec, "peers": 2, "MB_per_peer": round(numel * 4 / 1e6, 1), "link_mbit": rate_mbit,
            "round_s": round(statistics.median(rounds), 3),
            "min_max_s": f"{min(rounds):.3f}-{max(rounds):.3f}",
            "wire_bound_s": round(bound, 3), "x_bound": round(statistics.median(rounds) / bound, 2),
            **spread(rounds, bound),
            "floor_s": round(statistics.median(floors), 3),
            "floor_x_bound": round(statistics.median(floors) / bound, 2), **spread(floors, bound, "floors"),
            "x_floor_paired": round(statistics.median(ratios), 2),
            "pairs_x_floor": " ".join(f"{x:.2f}" for x in ratios),
            "pairs_within_goal": f"{sum(x <= GOAL for x in ratios)}/{len(ratios)}",
            "x_floor_paired_allreduce_only": round(statistics.median(alone_ratios), 2),
            "rechecked_rounds": " ".join(str(i + 1) for i in rechecked) or "none"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--part-bytes", type=int, required=True)
    ap.add_argument("--transport", choices=sorted(MADDRS), default="tcp")
    ap.add_argument("--initial-peers", nargs="*", default=[])
    a = ap.parse_args()
    asyncio.run(worker(a.host, a.part_bytes, a.transport, a.initial_peers))


if __name__ == "__main__":
    main()
