"""Throughput of the int8 codec (GB/s of fp32) against a memory copy, measured interleaved in one run.

    python -m bench.bench_codec [--size-mb 64] [--repeats 15] [--threads 2]

GB/s everywhere is GB (1e9 bytes) **of fp32 values** per second: the tensor's 4 bytes per value,
counted once, whatever the operation moves. The yardstick is a plain copy of the same tensor,
``Tensor.copy_`` (torch's parallel copy) and ``numpy.copyto`` (one thread): its GB/s are fp32 bytes
copied per second, each read once and written once, so the bus carries at least twice that.

Rows, all on the same ``size_mb`` MiB of Gaussian fp32 values and timed in turn within each repeat,
so load from other processes hits every row alike, in a new (seeded) order each repeat, so no row
always runs right after the same other one (``ratio_to_memcpy`` is the row's median over the
``Tensor.copy_`` median). The rows run in a process of their own with ``OMP_WAIT_POLICY=PASSIVE``:
by default torch's OpenMP workers keep spinning for milliseconds after each parallel op (the copy,
``add_``, ``sum``), and took one of the two cores from whichever kernel row came next (see
bench/notes/codec.md); libgomp reads the policy once, when torch loads.

- encode: ``Int8Codec.encode`` (allocates the payload) and the kernel into a preallocated payload;
- decode-accumulate: ``out += w * decode(payload)`` in place;
- decode: ``Int8Codec.decode`` (allocates and page-faults a new tensor) and the kernel into a
  preallocated one;
- bounds: an in-place ``out.add_(1.0)`` (read + write, the traffic decode-accumulate cannot avoid)
  and a reduction (``Tensor.sum``, read only);
- anchors (slow, fewer repeats, not interleaved): the torch reference encoder and a naive PyTorch
  quantizer.

``bytes_per_value`` is the minimum memory traffic of each row per fp32 value (write-allocate reads
not counted). Each figure is the median of the timed repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from p2p_trainer.codec import int8_format as fmt
from p2p_trainer.codec import native as native_kernels
from p2p_trainer.codec.int8 import Int8Codec

GOALS = {"int8 encode": 8.0, "int8 decode_accumulate": 10.0}  # GB/s of fp32 on 2 cores (issue 12)


def naive_quantize(
    x: torch.Tensor, chunk_size: int = fmt.DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward PyTorch version of the scheme: fp32 mean/std, clamp at +-6 std, round,
    ``index_add_`` for the bucket means. Whole chunks only; it is a speed anchor, not a codec."""
    rows = x.view(-1, chunk_size)
    mean = rows.mean(dim=1, keepdim=True)
    std = rows.std(dim=1, keepdim=True).clamp_min(1e-30)
    lo = mean - 6 * std
    codes = ((rows - lo) * (255 / (12 * std))).round_().clamp_(0, 255).to(torch.uint8)
    index = (codes.long() + torch.arange(rows.shape[0])[:, None] * 256).view(-1)
    sums = torch.zeros(rows.shape[0] * 256).index_add_(0, index, x)
    counts = torch.zeros(rows.shape[0] * 256).index_add_(0, index, torch.ones_like(x))
    return codes, sums / counts.clamp_min(1)


def _check(rc: int, ok: int) -> None:
    if rc != ok:
        raise RuntimeError(f"kernel returned {rc}: {fmt.NATIVE_ERRORS.get(rc, 'non-finite input')}")


def _cases(n: int, threads: int) -> list[tuple[str, Callable[[], object], int]]:
    """(name, call, minimum bytes of memory traffic per value) for the interleaved rows."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    codec = Int8Codec("native", threads=threads)
    kernels = native_kernels.load()
    payload = codec.encode(x)
    size = len(payload)
    # Preallocated (and pre-faulted) outputs for the kernel-only rows.
    buffer = (ctypes.c_char * size)()  # the closures below keep it (and payload) alive
    payload_at = ctypes.cast(ctypes.c_char_p(payload), ctypes.c_void_p).value
    out, decoded, copy_dst = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    x_np, dst_np = x.numpy(), np.zeros(n, dtype=np.float32)
    chunk = codec.chunk_size

    def encode_into_buffer() -> None:
        _check(kernels.encode(x.data_ptr(), 4 * n, chunk, ctypes.addressof(buffer), size, threads), -1)

    def decode_into_tensor() -> None:
        _check(kernels.dequantize(payload_at, len(payload), decoded.data_ptr(), 4 * n, threads), 0)

    return [
        ("memory copy (Tensor.copy_)", lambda: copy_dst.copy_(x), 8),
        ("memory copy (numpy.copyto, 1 thread)", lambda: np.copyto(dst_np, x_np), 8),
        ("int8 encode", lambda: codec.encode(x), 5),
        ("int8 encode kernel, preallocated payload", encode_into_buffer, 5),
        ("int8 decode_accumulate", lambda: codec.decode_accumulate(payload, out, 0.5), 9),
        ("int8 decode (new tensor)", lambda: codec.decode(payload, n), 5),
        ("int8 decode kernel, preallocated out", decode_into_tensor, 5),
        ("bound: in-place out.add_(1.0)", lambda: out.add_(1.0), 8),
        ("bound: read only (Tensor.sum)", lambda: x.sum(), 4),
    ]


def _row(name: str, times: list[float], n: int, traffic: int | None, threads: int) -> dict:
    seconds = statistics.median(times)
    return {
        "name": name,
        "gb_per_s": round(4 * n / seconds / 1e9, 3),
        # On a shared machine the best repeat is the least disturbed one.
        "best_gb_per_s": round(4 * n / min(times) / 1e9, 3),
        "median_ms": round(seconds * 1e3, 3),
        "bytes_per_value": traffic if traffic is not None else "",
        "repeats": len(times),
        "size_mb": 4 * n / (1 << 20),
        "threads": threads,
    }


def run(size_mb: int = 64, repeats: int = 15, threads: int = 2, anchors: bool = True) -> list[dict]:
    """Time every row on the same ``size_mb`` MiB of fp32 values; one dict per row."""
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        return _run_in_child(size_mb, repeats, threads, anchors)
    n = size_mb * (1 << 20) // 4
    n -= n % fmt.DEFAULT_CHUNK_SIZE  # the naive anchor handles whole chunks only
    load_before = os.getloadavg()
    cases = _cases(n, threads)
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _, fn, _ in cases:
        fn()  # warm-up: kernel build/load, page faults, allocator
    for repeat in range(repeats):
        # interleaved, so a burst of load from elsewhere hits every row; shuffled, so what a row
        # leaves behind (spinning OpenMP workers, dirty cache lines) falls on every row alike
        for name, fn, _ in random.Random(repeat).sample(cases, len(cases)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rows = [_row(name, times[name], n, traffic, threads) for name, _, traffic in cases]
    if anchors:
        x = torch.randn(n, generator=torch.Generator().manual_seed(0))
        reference = Int8Codec("reference")
        for name, fn in (
            ("int8 reference encode (torch)", lambda: reference.encode(x)),
            ("naive PyTorch quantizer (anchor)", lambda: naive_quantize(x)),
        ):
            fn()
            slow = []
            for _ in range(max(1, min(repeats, 3))):
                start = time.perf_counter()
                fn()
                slow.append(time.perf_counter() - start)
            rows.append(_row(name, slow, n, None, torch.get_num_threads()))
    copy = rows[0]["gb_per_s"]
    load = f"{'/'.join(f'{v:.2f}' for v in load_before)} / {'/'.join(f'{v:.2f}' for v in os.getloadavg())}"
    for r in rows:
        r["ratio_to_memcpy"] = round(r["gb_per_s"] / copy, 3)
        r["goal_gb_per_s"] = GOALS.get(r["name"], "")
        r["loadavg_before_after"] = load
    return rows


def _run_in_child(size_mb: int, repeats: int, threads: int, anchors: bool) -> list[dict]:
    """``run`` in a fresh process whose torch loads with idle OpenMP workers that sleep, not spin."""
    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "bench.bench_codec", "--json", "--size-mb", str(size_mb),
            "--repeats", str(repeats), "--threads", str(threads)] + ([] if anchors else ["--no-anchors"])
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench_codec child exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # the rows are the last line printed


def markdown(rows: list[dict]) -> str:
    lines = [
        "| case | GB/s of fp32 (median) | best repeat | x memcpy | bytes/value moved | median ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['gb_per_s']:.2f} | {r['best_gb_per_s']:.2f} | {r['ratio_to_memcpy']:.2f} "
            f"| {r['bytes_per_value']} | {r['median_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-anchors", action="store_true", help="skip the slow torch anchors")
    parser.add_argument("--json", action="store_true", help="print only the rows, as JSON")
    args = parser.parse_args()
    rows = run(args.size_mb, args.repeats, args.threads, anchors=not args.no_anchors)
    if args.json:
        print(json.dumps(rows))
        return
    r0 = rows[0]
    print(
        f"{r0['size_mb']:.0f} MiB fp32, {args.threads} codec threads, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, load {r0['loadavg_before_after']}\n"
    )
    print(markdown(rows))
    for name, goal in GOALS.items():
        got = next(r for r in rows if r["name"] == name)
        verdict = "met" if got["gb_per_s"] >= goal else "missed"
        figures = f"median {got['gb_per_s']}, best {got['best_gb_per_s']}"
        print(f"goal {name} >= {goal} GB/s: {verdict} ({figures})")
    print()
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
