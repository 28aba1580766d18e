"""Memory of a peer's local ranks with the sharded outer state: a model of over 100M parameters,
the measured peer started with 1 and then 2 local ranks (torchrun, gloo on CPU), each time in a
swarm with a 1-rank partner so that its rounds are real all-reduces (int8, 2 peers).

    python -m bench.bench_memory [--layers 9] [--ranks 1 2]

Every rank of the measured peer reports at its end (``Trainer._report_memory``) how many values it
holds, the bytes of outer state it holds (its shares of θ and the momentum, and what the mode keeps
beside them) and its peak RSS (``getrusage``, the kernel's count). The bound the issue sets: outer
state at most (P/M) x 8 bytes plus a bounded slack (``SLACK``: FSDP2's uneven row split), and rank
0's peak RSS at most 1.25x the other ranks'.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._procs import free_port, loadavg

LINE = re.compile(
    r"memory: rank (\d+) of (\d+) holds (\d+) of (\d+) values, outer state (\d+) bytes, peak RSS (\d+) bytes"
)


# FSDP2 splits each parameter's rows like ``torch.chunk``: the first ranks get one row more of some
# parameters, so a rank's share can exceed P/M by up to a row per parameter tensor (tens of KB here)
SLACK = 1 << 20


def model_args(layers: int) -> list[str]:
    return ["--model.hidden_size", "1024", "--model.num_layers", str(layers), "--model.num_heads", "16",
            "--model.num_kv_heads", "8", "--model.intermediate_size", "2816", "--model.seq_len", "32",
            "--data.batch_size", "2", "--data.micro_batch_size", "1", "--inner.steps_per_round", "1",
            "--log.eval_every", "0", "--log.progress_bar", "false", "--swarm.min_group_size", "2",
            "--swarm.matchmaking_timeout", "120", "--swarm.allreduce_timeout", "120",
            "--max-outer-steps", "2"]  # fmt: skip


def _peer_line(log: Path, proc: subprocess.Popen, timeout: float = 180.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("peer address:"):
                return line.split(":", 1)[1].strip()
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"no peer address in {log}: {log.read_text()[-2000:]}")


def measure(ranks: int, layers: int, work: Path) -> list[dict]:
    """One run: a 1-rank partner and the measured peer of ``ranks`` ranks, to the end of 2 rounds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cli = ["-m", "p2p_trainer.cli", "train", "--config", "configs/debug.toml", "--host-maddrs",
           "/ip4/127.0.0.1/tcp/0", "--swarm.run_id", f"memory-{ranks}", *model_args(layers)]  # fmt: skip
    partner_log, peer_log = work / f"partner-{ranks}.log", work / f"peer-{ranks}.log"
    out = open(partner_log, "w")
    partner = subprocess.Popen([sys.executable, *cli], stdout=out, stderr=subprocess.STDOUT, env=env)
    peer = None
    try:
        maddr = _peer_line(partner_log, partner)
        launch = [sys.executable] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
        peer = subprocess.Popen([*launch, *cli, "--initial-peers", maddr], stdout=open(peer_log, "w"),
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
        if peer.wait(timeout=900) != 0:
            raise RuntimeError(f"the measured peer failed: {peer_log.read_text()[-3000:]}")
        partner.wait(timeout=120)
    finally:
        for proc in (partner, peer):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    found = [tuple(map(int, m.groups())) for m in LINE.finditer(peer_log.read_text())]
    if len(found) != ranks:
        raise RuntimeError(f"expected {ranks} memory lines: {peer_log.read_text()[-3000:]}")
    rows = []
    for rank, world, share, numel, outer, peak in sorted(found):
        bound = numel / world * 8
        rows.append({
            "ranks": world, "rank": rank, "params_M": round(numel / 1e6, 1),
            "values_held_M": round(share / 1e6, 2), "outer_state_MB": round(outer / 1e6, 1),
            "bound_P_over_M_x8_MB": round(bound / 1e6, 1), "over_bound_KB": round((outer - bound) / 1e3, 1),
            "outer_within_bound": outer <= bound + SLACK,
            "peak_rss_MB": round(peak / 1e6),
        })  # fmt: skip
    others = [r["peak_rss_MB"] for r in rows if r["rank"] != 0]
    for r in rows:
        r["rank0_over_others"] = round(rows[0]["peak_rss_MB"] / max(others), 3) if others else ""
    return rows


def run(layers: int = 9, ranks: tuple[int, ...] = (1, 2)) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for m in ranks:
            before = loadavg()
            for row in measure(m, layers, Path(tmp)):
                rows.append({"bench": "memory", **row, "loadavg_before_after": f"{before} / {loadavg()}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(json.dumps(run(args.layers, tuple(args.ranks)), indent=1))


if __name__ == "__main__":
    main()
