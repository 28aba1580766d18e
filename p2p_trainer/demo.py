"""`make demo`: a bootstrap peer and 3 trainers on loopback, a table per outer step, a loss plot.

Everything runs through the real CLI in separate processes, exactly as volunteers would start it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from p2p_trainer.metrics import read_metrics

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2p_trainer.cli", *args]


def start_bootstrap(out: Path, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start `p2p-trainer bootstrap` and return it with the multiaddr it prints."""
    proc = subprocess.Popen(
        _cli("bootstrap", "--identity", str(out / "bootstrap.key"), "--host-maddrs", LOOPBACK),
        stdout=subprocess.PIPE,
        stderr=open(out / "bootstrap.log", "w"),
        text=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("initial peer:"):
            return proc, line.split(":", 1)[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"bootstrap peer did not print its address; see {out / 'bootstrap.log'}")


def start_trainer(out: Path, name: str, initial_peer: str, config: str, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = _cli(
        "train",
        "--config",
        config,
        "--initial-peers",
        initial_peer,
        "--host-maddrs",
        LOOPBACK,
        "--metrics",
        str(out / f"{name}.jsonl"),
        "--log.progress_bar",
        "false",
        *extra,
    )
    return subprocess.Popen(args, stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env)


def stop(procs: list[subprocess.Popen], timeout: float = 15.0) -> list[int]:
    """SIGINT everyone (a clean leave), then SIGKILL whoever is still there after `timeout`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def outer_rows(metrics: dict[str, Path]) -> dict[int, dict[str, dict]]:
    """outer step -> peer -> its outer_step record, for the steps every peer has reported."""
    rows: dict[int, dict[str, dict]] = {}
    for peer, path in metrics.items():
        if path.exists():
            for rec in read_metrics(path, "outer_step"):
                rows.setdefault(rec["outer_step"], {})[peer] = rec
    return rows


def format_row(step: int, recs: dict[str, dict]) -> str:
    vals = list(recs.values())
    loss = sum(r["loss"] for r in vals) / len(vals)
    agree = "yes" if len({r["params_sha256"] for r in vals}) == 1 else "NO"
    return (
        f"{step:>5} {loss:>8.4f} {max(r['group_size'] for r in vals):>6} "
        f"{max(r['allreduce_s'] for r in vals):>8.2f} "
        f"{sum(r['bytes_sent'] for r in vals) / len(vals) / 1e6:>9.2f} "
        f"{len(vals):>6} {agree:>7}"
    )


HEADER = f"{'outer':>5} {'loss':>8} {'group':>6} {'allred_s':>8} {'MB_sent':>9} {'peers':>6} {'hashes':>7}"


def plot(metrics: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for peer, m in metrics.items():
        if not m.exists():
            continue
        inner = read_metrics(m, "inner_step")
        ax1.plot([r["step"] for r in inner], [r["loss"] for r in inner], lw=0.8, label=peer)
        ev = read_metrics(m, "eval")
        ax2.plot([r["outer_step"] for r in ev], [r["eval_loss"] for r in ev], marker="o", label=peer)
    ax1.set(xlabel="inner step", ylabel="training loss (nats/token)", title="inner loss per peer")
    ax2.set(
        xlabel="outer step", ylabel="held-out loss (nats/token)", title="held-out loss after each outer step"
    )
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="local swarm demo: bootstrap + trainers on loopback")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of training")
    parser.add_argument("--config", default="configs/debug.toml")
    parser.add_argument("--out", default="demo-out")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jsonl"):
        old.unlink()
    boot, maddr = start_bootstrap(out)
    print(f"bootstrap peer: {maddr}", flush=True)
    names = [f"peer{i}" for i in range(args.peers)]
    metrics = {n: out / f"{n}.jsonl" for n in names}
    # the demo's peers start together: wait for all of them in every round
    extra = ["--swarm.min_group_size", str(args.peers), *extra]
    trainers = [start_trainer(out, n, maddr, args.config, extra) for n in names]
    print(f"{args.peers} trainers started; logs and metrics in {out}/\n{HEADER}", flush=True)
    printed: set[int] = set()
    deadline = time.monotonic() + args.duration
    try:
        while time.monotonic() < deadline and all(t.poll() is None for t in trainers):
            time.sleep(1.0)
            for step, recs in sorted(outer_rows(metrics).items()):
                if step not in printed and len(recs) == len(names):
                    print(format_row(step, recs), flush=True)
                    printed.add(step)
    finally:
        codes = stop(trainers) + stop([boot])
    rows = outer_rows(metrics)
    for step, recs in sorted(rows.items()):
        if step not in printed:
            print(format_row(step, recs))
    plot(metrics, out / "loss.png")
    shared = [r for r in rows.values() if len(r) > 1]
    disagree = sum(len({x["params_sha256"] for x in r.values()}) > 1 for r in shared)
    print(
        f"\nouter steps: {len(rows)}, shared rounds with disagreeing hashes: {disagree}, "
        f"exit codes: {codes}\nloss plot: {out / 'loss.png'}"
    )
    return 0 if not disagree and rows and all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
