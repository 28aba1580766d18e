"""Throughput of the int8 codec (GB/s of fp32 input) next to its anchors, measured in one run.

    python -m bench.bench_codec [--size-mb 64] [--repeats 15]

Rows: the C kernel's encode (with and without allocating the payload), its fused
decode-and-accumulate and plain decode (which allocates and page-faults a new tensor), the torch reference
encode, a naive PyTorch quantizer (the anchor the kernel is meant to beat) and ``Tensor.copy_`` (what
memory bandwidth allows). Each number is the median of several timed repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from p2p_trainer.codec import int8_format as fmt
from p2p_trainer.codec import native as native_kernels
from p2p_trainer.codec.int8 import Int8Codec, default_threads


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


def _timings(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: page faults, kernel build/load, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(size_mb: int = 64, repeats: int = 15) -> list[dict]:
    """Time every row on the same ``size_mb`` MiB of fp32 Gaussian values; one dict per row."""
    n = size_mb * (1 << 20) // 4
    n -= n % fmt.DEFAULT_CHUNK_SIZE  # the naive anchor handles whole chunks only
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    native = Int8Codec("native")
    reference = Int8Codec("reference")
    payload = native.encode(x)
    out = torch.zeros(n)
    copy_dst = torch.empty(n)
    kernels = native_kernels.load()
    codes = torch.empty(n, dtype=torch.uint8)
    codebooks = torch.empty(n // fmt.DEFAULT_CHUNK_SIZE, fmt.N_BUCKETS)

    def kernel_only() -> None:
        ptrs = (x.data_ptr(), n, fmt.DEFAULT_CHUNK_SIZE, codes.data_ptr(), codebooks.data_ptr())
        kernels.quantize(*ptrs, None, default_threads())

    slow = max(1, min(repeats, 3))
    cases: list[tuple[str, Callable[[], object], int]] = [
        ("int8 native encode (quantize) -> bytes", lambda: native.encode(x), repeats),
        ("int8 native quantize kernel, preallocated output", kernel_only, repeats),
        ("int8 native decode_accumulate", lambda: native.decode_accumulate(payload, out, 0.5), repeats),
        ("int8 native decode", lambda: native.decode(payload, n), repeats),
        ("int8 reference encode (torch)", lambda: reference.encode(x), slow),
        ("naive PyTorch quantizer (anchor)", lambda: naive_quantize(x), slow),
        ("memory copy (Tensor.copy_)", lambda: copy_dst.copy_(x), repeats),
    ]
    rows = []
    for name, fn, reps in cases:
        times = _timings(fn, reps)
        seconds = statistics.median(times)
        rows.append(
            {
                "name": name,
                "gb_per_s": round(4 * n / seconds / 1e9, 3),
                # On a shared machine the best repeat is the least disturbed one.
                "best_gb_per_s": round(4 * n / min(times) / 1e9, 3),
                "median_ms": round(seconds * 1e3, 3),
                "repeats": reps,
                "size_mb": 4 * n / (1 << 20),
                "threads": default_threads(),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | GB/s of fp32 input (median) | best repeat GB/s | median ms |", "|---|---:|---:|---:|"]
    for r in rows:
        gbps, best, ms = r["gb_per_s"], r["best_gb_per_s"], r["median_ms"]
        lines.append(f"| {r['name']} | {gbps:.2f} | {best:.2f} | {ms:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rows = run(args.size_mb, args.repeats)
    print(f"{rows[0]['size_mb']:.0f} MiB fp32, {rows[0]['threads']} threads, torch {torch.__version__}\n")
    print(markdown(rows))
    print()
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
