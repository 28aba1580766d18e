"""`make bench`: the benchmarks that fit in about 15 minutes -> bench/results.json, docs/benchmarks.md.

    python -m bench.run [--long] [--only NAME ...]

Each benchmark module has `run(**kwargs) -> list[dict]`; rows of one benchmark are measured side by
side in one run so that their ratios are fair. `--long` adds the slow ones (`make bench-long`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# (name, module, kwargs, long only, one-line description)
BENCHES = [
    (
        "trainer",
        "bench.bench_trainer",
        {},
        False,
        "tokens/s of our trainer (lone peer, debug config) vs a plain PyTorch loop: same model, batch, data",
    ),
    (
        "codec",
        "bench.bench_codec",
        {"size_mb": 64},
        False,
        "int8 codec throughput, GB/s of fp32 input, vs naive PyTorch quantization and a memory copy",
    ),
    (
        "allreduce",
        "bench.bench_allreduce",
        {},
        False,
        "loopback all-reduce, 16M fp32 per peer: ours (int8, fp32) vs stock hivemind (none, fp16)",
    ),
    (
        "sparse",
        "bench.bench_sparse",
        {"size_mb": 64},
        False,
        "sparse codec: throughput, bytes per value and accuracy of a round, with int8 beside it",
    ),
    (
        "memory",
        "bench.bench_memory",
        {},
        False,
        "peak RSS and outer state per local rank: a 106M-parameter peer with 1 and 2 ranks",
    ),
    (
        "swarm32",
        "bench.bench_swarm32",
        {},
        True,
        "32 peers on one machine: joins, rounds, group sizes, memory; 20 simultaneous starts of 8 peers",
    ),
    (
        "attacks",
        "bench.bench_attacks",
        {},
        True,
        "one of 4 DiLoCo workers hostile, 8 rounds: held-out loss, robust aggregation vs the plain mean",
    ),
    (
        "netns",
        "bench.bench_netns",
        {},
        True,
        "round time over tc-limited links in network namespaces vs the wire-time bound",
    ),
    (
        "convergence",
        "bench.bench_convergence",
        {},
        True,
        "held-out loss: DiLoCo vs data parallel vs one worker, equal tokens, from a shared warm start",
    ),
    (
        "paired",
        "bench.bench_paired",
        {},
        True,
        "held-out loss, paired with blocking int8 DiLoCo: robust aggregation, overlap, the sparse codec",
    ),
]


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }


def table(rows: list[dict]) -> str:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "bench"]
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="also run the slow benchmarks")
    parser.add_argument("--only", nargs="+", help="run only these benchmarks")
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument("--doc", default="docs/benchmarks.md")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    results["machine"] = machine()
    for name, module, kwargs, long_only, what in BENCHES:
        if (args.only and name not in args.only) or (long_only and not args.long and not args.only):
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            print(f"[{name}] not available: {e}", file=sys.stderr)
            continue
        print(f"[{name}] {what}", flush=True)
        t0 = time.time()
        rows = mod.run(**kwargs)
        results[name] = {
            "what": what,
            "command": f"python -m bench.run --only {name}",
            "seconds": round(time.time() - t0, 1),
            "date": time.strftime("%Y-%m-%d"),
            "rows": rows,
        }
        print(table(rows), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    write_doc(results, Path(args.doc))
    return 0


def write_doc(results: dict, path: Path) -> None:
    m = results.get("machine", {})
    parts = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench.run`); `make bench-long` adds the slow ones. "
        "Every number below was measured by the command shown, on this machine:",
        "",
        f"- CPU: {m.get('cpu')} ({m.get('cores')} cores), Python {m.get('python')}, torch {m.get('torch')}, "
        f"commit {m.get('commit')}",
        "",
    ]
    for name, *_ in BENCHES:
        if name in results:
            r = results[name]
            parts += [
                f"## {name}",
                "",
                r["what"] + ".",
                "",
                f"Command: `{r['command']}` ({r['seconds']} s, {r['date']})",
                "",
                table(r["rows"]),
                "",
            ]
            notes = Path(f"bench/notes/{name}.md")
            if notes.exists():
                parts += [notes.read_text().strip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


if __name__ == "__main__":
    sys.exit(main())
