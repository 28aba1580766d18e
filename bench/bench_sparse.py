"""The sparse codec: throughput, bytes on the wire, and what re-sparsifying the average costs.

    python -m bench.bench_sparse [--size-mb 64] [--repeats 7] [--accuracy-numel 262144]

Three kinds of rows, all measured in one run:

- ``speed``: GB/s of fp32 input of the C kernel's encode, decode-and-accumulate and decode, the torch
  reference's encode, and ``Tensor.copy_`` (what memory bandwidth allows); median of timed repeats
  after one warm-up.
- ``size``: payload bytes per value and the compression against fp32, for one leg and for one
  4-peer butterfly round computed from the payloads' sizes: a peer sends 3/4 of its own payload
  (the other members' slices) and receives 3/4 of the re-sparsified average's payload, against
  fp32's 2 * (n-1)/n * 4 bytes per value; int8's figures beside them.
- ``accuracy``: relative L2 error, against the exact mean, of a 4-peer round on Gaussian parts
  (independent, and sharing half their variance): the mean of the decoded parts (first leg only),
  the re-sparsified average every peer applies (both legs), and over two rounds the sum of the
  applied averages against the sum of the exact means, without and with error feedback (each peer
  adds what it did not send in round 1 to its round-2 input).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from p2p_trainer.codec import int8_format
from p2p_trainer.codec import sparse_format as fmt
from p2p_trainer.codec.sparse import SparseCodec, default_threads

PEERS = 4
SIZE_PARAMS = [
    fmt.SparseParams(4096, 224, 4),  # the default
    fmt.SparseParams(4096, 272, 3),  # three, two and one bit(s) at about the same bytes
    fmt.SparseParams(4096, 320, 2),
    fmt.SparseParams(4096, 384, 1),
    fmt.SparseParams(4096, 160, 2),  # the v1 format's default (its 12-bit indices took 290 bytes a chunk)
    fmt.SparseParams(4096, 64, 2),  # the first default
    fmt.SparseParams(1024, 96, 1),
]
ACCURACY_PARAMS = [
    fmt.SparseParams(4096, 224, 4),
    fmt.SparseParams(4096, 272, 3),
    fmt.SparseParams(4096, 320, 2),
    fmt.SparseParams(4096, 384, 1),
    fmt.SparseParams(4096, 160, 2),
]


def _timings(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: page faults, kernel build/load, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def speed_rows(size_mb: int, repeats: int) -> list[dict]:
    n = size_mb * (1 << 20) // 4
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    fast, ref = SparseCodec("native"), SparseCodec("reference")
    payload = fast.encode(x)
    out, copy_dst = torch.zeros(n), torch.empty(n)
    ref_n = min(n, 1 << 22)  # the reference is ~15x slower: time it on at most 16 MiB
    cases: list[tuple[str, Callable[[], object], int, int]] = [
        ("sparse native encode -> bytes", lambda: fast.encode(x), repeats, n),
        ("sparse native decode_accumulate", lambda: fast.decode_accumulate(payload, out, 0.5), repeats, n),
        ("sparse native decode (new tensor)", lambda: fast.decode(payload, n), repeats, n),
        ("sparse reference encode (numpy)", lambda: ref.encode(x[:ref_n]), max(1, min(repeats, 3)), ref_n),
        ("memory copy (Tensor.copy_)", lambda: copy_dst.copy_(x), repeats, n),
    ]
    rows = []
    for name, fn, reps, values in cases:
        times = _timings(fn, reps)
        seconds = statistics.median(times)
        rows.append(
            {
                "kind": "speed",
                "name": name,
                "gb_per_s": round(4 * values / seconds / 1e9, 3),
                "best_gb_per_s": round(4 * values / min(times) / 1e9, 3),  # the least disturbed repeat
                "median_ms": round(seconds * 1e3, 3),
                "repeats": reps,
                "size_mb": 4 * values / (1 << 20),
                "threads": default_threads(),
            }
        )
    return rows


def size_rows(numel: int = 1 << 24) -> list[dict]:
    """Bytes from real payloads: a part and the re-sparsified average of 4 parts."""
    parts = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(PEERS)]
    fp32_round = 2 * (PEERS - 1) / PEERS * 4 * numel
    rows = []
    for p in SIZE_PARAMS:
        codec = SparseCodec.from_params(p)
        average = torch.zeros(numel)
        own = b""
        for part in parts:
            own = codec.encode(part)
            codec.decode_accumulate(own, average, 1.0 / PEERS)
        reply = codec.encode(average)
        sent, received = (PEERS - 1) / PEERS * len(own), (PEERS - 1) / PEERS * len(reply)
        rows.append(
            {
                "kind": "size",
                "name": f"sparse chunk {p.chunk_size} k {p.k} ({100 * p.density:.2f}%) {p.value_bits}-bit",
                "bits_per_value": round(8 * len(own) / numel, 4),
                "payload_over_fp32": round(len(own) / (4 * numel), 5),
                "one_leg_vs_fp32": round(4 * numel / len(own), 1),
                "round_bytes_per_peer": int(sent + received),
                "round_vs_fp32": round(fp32_round / (sent + received), 1),
                "numel": numel,
                "peers": PEERS,
            }
        )
    int8_bytes = int8_format.payload_size(numel)
    rows.append(
        {
            "kind": "size",
            "name": "int8 (for comparison)",
            "bits_per_value": round(8 * int8_bytes / numel, 4),
            "payload_over_fp32": round(int8_bytes / (4 * numel), 5),
            "one_leg_vs_fp32": round(4 * numel / int8_bytes, 2),
            "round_bytes_per_peer": int(2 * (PEERS - 1) / PEERS * int8_bytes),
            "round_vs_fp32": round(fp32_round / (2 * (PEERS - 1) / PEERS * int8_bytes), 2),
            "numel": numel,
            "peers": PEERS,
        }
    )
    return rows


def _parts(numel: int, shared: float, g: torch.Generator) -> list[torch.Tensor]:
    """PEERS Gaussian parts of unit variance; ``shared`` of it common to all (their correlation)."""
    common = torch.randn(numel, generator=g)
    return [
        shared**0.5 * common + (1 - shared) ** 0.5 * torch.randn(numel, generator=g) for _ in range(PEERS)
    ]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a.double() - b.double()).norm() / b.double().norm()).item(), 4)


FEEDBACK = ("none", "peers", "both")


def simulate(codec: SparseCodec, numel: int, rounds: int, shared: float, seed: int = 1) -> dict[str, float]:
    """``rounds`` 4-peer butterfly rounds on fresh Gaussian parts, under three error-feedback modes
    that see the same parts: ``none``; ``peers`` (each peer adds what it did not send to its next
    input: the trainer's error-feedback buffer); ``both`` (and the reducer adds what re-sparsifying
    the average dropped to the next round's average, as if one peer reduced the same slice every round).

    Returns the relative L2 errors against the exact mean of round 1's mean of decoded parts
    (``first_leg``) and applied average (``both_legs``), and, per mode and after 2 and ``rounds``
    rounds, of the sum of the applied averages against the sum of the exact means.
    """
    g = torch.Generator().manual_seed(seed)
    unsent = {f: [torch.zeros(numel) for _ in range(PEERS)] for f in FEEDBACK}
    dropped = {f: torch.zeros(numel) for f in FEEDBACK}
    applied_sum = {f: torch.zeros(numel, dtype=torch.float64) for f in FEEDBACK}
    exact_sum = torch.zeros(numel, dtype=torch.float64)
    out: dict[str, float] = {}
    for r in range(1, rounds + 1):
        parts = _parts(numel, shared, g)
        exact = torch.stack(parts).double().mean(0)
        exact_sum += exact
        for f in FEEDBACK:
            mean = torch.zeros(numel)
            for i, part in enumerate(parts):
                x = part if f == "none" else part + unsent[f][i]
                payload = codec.encode(x)
                codec.decode_accumulate(payload, mean, 1.0 / PEERS)
                unsent[f][i] = x - codec.decode(payload, numel)
            reduced = mean + dropped[f] if f == "both" else mean
            applied = codec.decode(codec.encode(reduced), numel)
            dropped[f] = reduced - applied
            applied_sum[f] += applied.double()
            if r == 1 and f == "none":
                out["first_leg"], out["both_legs"] = _rel(mean, exact), _rel(applied, exact)
            if r in (2, rounds):
                out[f"rounds_{'long' if r == rounds else r}_ef_{f}"] = _rel(applied_sum[f], exact_sum)
    return out


def accuracy_rows(numel: int = 1 << 18, long_rounds: int = 10) -> list[dict]:
    rows = []
    for p in ACCURACY_PARAMS:
        codec = SparseCodec.from_params(p)
        for shared in (0.0, 0.5):
            errors = simulate(codec, numel, long_rounds, shared)
            rows.append(
                {
                    "kind": "accuracy",
                    "name": f"sparse chunk {p.chunk_size} k {p.k} {p.value_bits}-bit, correlation {shared}",
                    "numel": numel,
                    "peers": PEERS,
                    "long_rounds": long_rounds,
                }
                | {f"{k}_rel_l2": v for k, v in errors.items()}
            )
    return rows


def run(size_mb: int = 64, repeats: int = 7, accuracy_numel: int = 1 << 18) -> list[dict]:
    """Speed on ``size_mb`` MiB of fp32 Gaussian values, sizes on 16M values, accuracy on
    ``accuracy_numel``; one dict per row, ``kind`` says which table it belongs to."""
    load = os.getloadavg()[0]
    rows = speed_rows(size_mb, repeats) + size_rows() + accuracy_rows(accuracy_numel)
    for row in rows:
        row["loadavg_before"] = round(load, 2)
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| case | GB/s of fp32 input (median) | best repeat GB/s | median ms |", "|---|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "speed":
            out.append(
                f"| {r['name']} | {r['gb_per_s']:.2f} | {r['best_gb_per_s']:.2f} | {r['median_ms']:.1f} |"
            )
    out += ["", "| codec | bits/value | one leg vs fp32 | 4-peer round vs fp32 |", "|---|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "size":
            out.append(
                f"| {r['name']} | {r['bits_per_value']} | {r['one_leg_vs_fp32']}x | {r['round_vs_fp32']}x |"
            )
    long = next((r["long_rounds"] for r in rows if r["kind"] == "accuracy"), 10)
    out += [
        "",
        f"| 4 peers, Gaussian | 1st leg | both legs | 2 rounds: no EF / EF / EF 2 legs | {long} rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["kind"] == "accuracy":
            two = " / ".join(str(r[f"rounds_2_ef_{f}_rel_l2"]) for f in ("none", "peers", "both"))
            many = " / ".join(str(r[f"rounds_long_ef_{f}_rel_l2"]) for f in ("none", "peers", "both"))
            out.append(
                f"| {r['name']} | {r['first_leg_rel_l2']} | {r['both_legs_rel_l2']} | {two} | {many} |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--accuracy-numel", type=int, default=1 << 18)
    args = parser.parse_args()
    rows = run(args.size_mb, args.repeats, args.accuracy_numel)
    print(f"{default_threads()} threads, torch {torch.__version__}, load {rows[0]['loadavg_before']}\n")
    print(markdown(rows))
    print()
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
