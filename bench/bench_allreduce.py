"""Loopback all-reduce, one process per peer: our ``SwarmPeer.all_reduce`` (int8, fp32; each with the
default robust ``clip`` aggregation and the plain ``mean``) against stock hivemind 1.1.12
``DecentralizedAverager`` (no compression, fp16), 2 and 4 peers, in one run.

    python -m bench.bench_allreduce [--numel 16777216] [--rounds 5] [--peers 2 4]

For each group size both engines' peers are up at once (ours: one ``SwarmPeer`` per codec and
aggregation in each peer process; hivemind: one DHT and one averager per compression), and rounds
of the six variants are interleaved, so a change in machine load hits them alike, in a new
(seeded) order each round, so no variant always runs right after the same other one. Every
round starts at one agreed wall-clock time on all peers; its time is the slowest peer's; the
result's hash and error are computed only once every peer is done. Ours is timed from the
``all_reduce`` call, matchmaking included, and decodes into a tensor kept across rounds, as the
trainer does (hivemind averages its own tensors in place); hivemind's matchmaking is finished
before the start (``require_trigger``), so its time is the all-reduce alone. One warm-up round per
variant is not counted. ``peak_extra_MB``: the median over rounds of the largest per-peer peak of memory
in use during the round above its start (see ``bench/_procs.py``, which also runs the peer processes);
``x_vector``: that over the vector's fp32 size; ``x_vector_rounds``: each timed round's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

from bench._procs import ENGINE_CODECS, loadavg, run_round, start_group, stop_all

VARIANTS = [("hivemind", "none"), ("hivemind", "fp16"), ("ours", "int8:clip"), ("ours", "int8:mean"),
            ("ours", "fp32:clip"), ("ours", "fp32:mean")]
ANCHOR_NONE_S = {2: 0.74, 4: 2.15}  # anchors.md: stock hivemind, no compression, this kind of machine
# issue 12: speedup over stock hivemind uncompressed (int8: 3x at 2 peers, 2x at 4; fp32: no slower)
GOAL_SPEEDUP = {("int8", 2): 3.0, ("int8", 4): 2.0, ("fp32", 2): 1.0, ("fp32", 4): 1.0}
GOAL_MEMORY_X = 2.0  # peak extra memory, times the vector's fp32 size


def measure(world: int, numel: int, rounds: int, workdir: Path, hosts: list[str] | None = None,
            prefix: list[list[str]] | None = None,
            variants: list[tuple[str, str]] = VARIANTS, transport: str = "tcp",
            recheck: float | None = None) -> dict[tuple[str, str], list[list[dict]]]:
    """{(engine, codec): [per-round list of per-peer answers]} for ``rounds`` timed rounds of each of
    ``variants``; only their peers are started (``transport``, ``recheck``: see ``start_group``)."""
    hosts = hosts or ["127.0.0.1"] * world
    groups = {}
    try:
        for engine in [e for e in ENGINE_CODECS if any(v[0] == e for v in variants)]:
            codecs = [c for e, c in variants if e == engine]
            groups[engine] = start_group(engine, world, numel, workdir, hosts=hosts, prefix=prefix or (),
                                         codecs=codecs, run_id=f"bench{world}", transport=transport,
                                         recheck=recheck)
        out: dict[tuple[str, str], list[list[dict]]] = {v: [] for v in variants}
        for rnd in range(rounds + 1):
            # a new order each round (seeded): what a round leaves behind for the next one hits
            # every variant alike, not always the same neighbour
            for engine, codec in random.Random(rnd).sample(variants, len(variants)):
                answers = run_round(groups[engine], codec, rnd)
                if rnd > 0:  # round 0 warms up connections, buffers, the native codec
                    out[(engine, codec)].append(answers)
        return out
    finally:
        for workers in groups.values():
            stop_all(workers)


def summarize(engine: str, codec: str, world: int, numel: int, answers: list[list[dict]]) -> dict:
    times = [max(a["round_s"] for a in rnd) for rnd in answers]
    codec, _, aggregation = codec.partition(":")
    row = {
        "engine": "p2p-trainer" if engine == "ours" else "hivemind 1.1.12",
        "codec": codec,
        "aggregation": aggregation or "mean (hivemind)",
        "peers": world,
        "MB_per_peer": round(numel * 4 / 1e6),
        "round_s_median": round(statistics.median(times), 3),
        "round_s_min_max": f"{min(times):.3f}-{max(times):.3f}",
        "rounds": len(times),
    }
    if engine == "ours":
        reduce_only = [max(a["allreduce_s"] for a in r) for r in answers]
        row["allreduce_only_s"] = round(statistics.median(reduce_only), 3)
        row["MB_sent_per_peer"] = round(max(a["bytes_sent"] for a in answers[-1]) / 1e6, 1)
    peaks = [max(a.get("peak_extra_bytes", 0) for a in r) for r in answers]
    row["peak_extra_MB"] = round(statistics.median(peaks) / 1e6, 1)
    row["x_vector"] = round(statistics.median(peaks) / (4 * numel), 2)
    # each round's: a round where one of this group's peers re-checks a slice (swarm.recheck 0.1 per
    # slice, drawn from the group id) peaks higher at that peer, so the median moves with the draws
    row["x_vector_rounds"] = "/".join(f"{p / (4 * numel):.2f}" for p in peaks)
    rank0 = [a for r in answers for a in r if "rel_err" in a]
    row["rel_l2_err"] = f"{statistics.median(a['rel_err'] for a in rank0):.2e}" if rank0 else ""
    row["replicas_identical"] = all(len({a["sha"] for a in r}) == 1 for r in answers)
    return row


def run(numel: int = 1 << 24, rounds: int = 5, peers: tuple[int, ...] = (2, 4)) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-allreduce-") as tmp:
        for world in peers:
            before = loadavg()
            results = measure(world, numel, rounds, Path(tmp))
            after = loadavg()
            block = [summarize(e, c, world, numel, results[(e, c)]) for e, c in VARIANTS]
            base = next(r for r in block if r["codec"] == "none")["round_s_median"]
            for r in block:
                r["speedup_vs_hivemind_none"] = round(base / r["round_s_median"], 2)
                if "allreduce_only_s" in r:  # like for like: hivemind's figure leaves its matchmaking out
                    r["speedup_allreduce_only"] = round(base / r["allreduce_only_s"], 2)
                goal = GOAL_SPEEDUP.get((r["codec"], world)) if r["engine"] == "p2p-trainer" else None
                if goal is not None:
                    r["goal"] = f">= {goal:g}x, memory <= {GOAL_MEMORY_X:g}x"
                    r["goal_met"] = base / r["round_s_median"] >= goal and r["x_vector"] <= GOAL_MEMORY_X
                r["loadavg_before_after"] = f"{before} / {after}"
            block[0]["anchor_s"] = ANCHOR_NONE_S.get(world, "")
            rows += [{"bench": "allreduce", **r} for r in block]
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    a = ap.parse_args()
    for row in run(a.numel, a.rounds, tuple(a.peers)):
        print(row)
