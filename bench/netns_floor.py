"""The transport's own time for a 2-peer round's bytes: the yardstick beside ``bench_netns``'s rounds.

Two bare hivemind ``P2P`` daemons (the p2pd our peers and stock hivemind run on, one Go core as
``swarm.daemon_threads`` gives ours), one in each namespace, over TCP (yamux streams, as our peers
and stock hivemind use) or QUIC (``--transport quic``: p2pd's other transport, for comparison). In
each transfer both send the other ``part_bytes`` in 1 MiB frames on one new stream while echoing
every frame they receive back on the stream it came on, as a reducer returns averaged chunks as
they arrive: each upload carries one part and one part's worth of replies, the bytes of a 2-peer
int8 round without any codec, protocol or matchmaking. A transfer's time is the slower side's, from
an agreed start until all of its echoes are back; its bound is ``2 x part_bytes x 8 / rate``.

    python -m bench.netns_floor --role 0|1 --host ADDR --part-bytes N --transfers K --dir DIR
                                [--transport tcp|quic]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


async def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path}")
        await asyncio.sleep(0.005)


MADDRS = {"tcp": "/ip4/{host}/tcp/0", "quic": "/ip4/{host}/udp/0/quic-v1"}


async def worker(role: int, host: str, part_bytes: int, transfers: int, where: Path,
                 transport: str = "tcp") -> list[float]:
    from hivemind.p2p import P2P, PeerID

    initial = []
    if role == 1:
        await _wait_for(where / "addrs0.json")
        initial = json.loads((where / "addrs0.json").read_text())["addrs"]
    p2p = await P2P.create(host_maddrs=[MADDRS[transport].format(host=host)], initial_peers=initial,
                           nat_port_map=False, auto_nat=False)
    try:
        me = {"id": p2p.peer_id.to_base58(), "addrs": [str(m) for m in await p2p.get_visible_maddrs()]}
        (where / f"addrs{role}.tmp").write_text(json.dumps(me))
        (where / f"addrs{role}.tmp").rename(where / f"addrs{role}.json")
        await p2p.add_binary_stream_handler(PROTOCOL, lambda *a: _echo(*a, size=part_bytes))
        await _wait_for(where / f"addrs{1 - role}.json")
        other = PeerID.from_base58(json.loads((where / f"addrs{1 - role}.json").read_text())["id"])
        payload = os.urandom(part_bytes)
        times = []
        for t in range(transfers + 1):  # the first warms the connection up and is not counted
            (where / f"ready{role}-{t}").touch()
            if role == 0:
                await _wait_for(where / f"ready1-{t}")
                (where / f"start{t}.tmp").write_text(str(time.time() + 0.2))
                (where / f"start{t}.tmp").rename(where / f"start{t}")
            await _wait_for(where / f"start{t}")
            start = float((where / f"start{t}").read_text())
            await asyncio.sleep(max(0.0, start - time.time()))
            await _transfer(p2p, other, payload)
            if t:
                times.append(time.time() - start)
            await asyncio.sleep(0.3)  # the other side's echoes drain before the next start
        (where / f"done{role}").touch()
        await _wait_for(where / f"done{1 - role}")  # our echoes of its last part are all back there
        return times
    finally:
        await p2p.shutdown()


def measure(prefixes: list[list[str]], hosts: list[str], part_bytes: int, transfers: int,
            workdir: Path, timeout: float = 300.0, transport: str = "tcp") -> list[float]:
    """Each transfer's time (the slower side's), two worker processes under ``prefixes``."""
    where = Path(workdir) / f"floor-{part_bytes}-{time.monotonic_ns()}"
    where.mkdir(parents=True)
    env = dict(os.environ, GOMAXPROCS="1")  # p2pd inherits it, as our peers' daemons do
    procs = []
    for r in range(2):
        with open(where / f"log{r}.txt", "w") as log:
            procs.append(subprocess.Popen(
                [*prefixes[r], sys.executable, "-m", "bench.netns_floor", "--role", str(r),
                 "--host", hosts[r], "--part-bytes", str(part_bytes), "--transfers", str(transfers),
                 "--dir", str(where), "--transport", transport],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env))
    try:
        outs = [json.loads(p.communicate(timeout=timeout)[0].strip().splitlines()[-1]) for p in procs]
    except Exception as e:
        raise RuntimeError(f"floor transfer failed: {e!r}; logs in {where}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [max(a, b) for a, b in zip(outs[0], outs[1], strict=True)]


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
            "wire_bound_s": round(bound, 3), "x_bound": round(median / bound, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", type=int, choices=(0, 1), required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--part-bytes", type=int, required=True)
    ap.add_argument("--transfers", type=int, required=True)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--transport", choices=sorted(MADDRS), default="tcp")
    a = ap.parse_args()
    times = asyncio.run(worker(a.role, a.host, a.part_bytes, a.transfers, a.dir, a.transport))
    print(json.dumps(times), flush=True)


if __name__ == "__main__":
    main()
