"""Pure-torch int8 quantizer following ``int8_format``'s arithmetic operation by operation.

It is the fallback when the C kernel cannot be built and the oracle the kernel is tested against, so
it favours obviously-matching code over speed: every floating point step is a separate elementwise
torch op (exact IEEE, no fused multiply-add), and every sum whose order matters is spelled out.
"""

from __future__ import annotations

import torch

from p2p_trainer.codec import int8_format as fmt

# Chunks are processed this many values at a time: float64 temporaries of a few MiB stay below
# glibc's mmap threshold, so they are reused instead of page-faulted afresh on every call.
_GROUP_VALUES = 1 << 19


def _tree_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-row sums with the fixed tree of int8_format, from ``t`` laid out (BLOCK, rows, blocks).

    Element ``j`` of every block is the slab ``t[j]``, so each in-block fold is one add of two
    contiguous halves instead of a strided op per level.
    """
    while t.shape[0] > 1:  # fold each block in halves: element j += element j + h
        h = t.shape[0] // 2
        t = t[:h] + t[h:]
    s = t[0]
    while s.shape[-1] > 1:  # then add adjacent block sums pairwise
        s = s[:, 0::2] + s[:, 1::2]
    return s[:, 0]


def _padded_length(n: int) -> int:
    blocks = -(-n // fmt.BLOCK)
    return fmt.BLOCK * (1 << (blocks - 1).bit_length())


def chunk_ranges(rows: torch.Tensor) -> list[tuple[float, float, float, float]]:
    """``(mean, std, lo, scale)`` for each row of ``rows`` (float32, every row one whole chunk)."""
    count, n = rows.shape
    p = _padded_length(n)
    xd = rows.double()
    x0 = xd[:, :1]
    if p > n:  # padding with x0 makes d exactly +0.0 there, like the kernel
        xd = torch.cat([xd, x0.expand(count, p - n)], dim=1)
    d = torch.empty(fmt.BLOCK, count, p // fmt.BLOCK, dtype=torch.float64)
    torch.sub(xd.view(count, p // fmt.BLOCK, fmt.BLOCK).permute(2, 0, 1), x0.view(1, count, 1), out=d)
    s1 = _tree_sum(d).tolist()
    s2 = _tree_sum(d * d).tolist()
    out = []
    for a, b, first in zip(s1, s2, x0[:, 0].tolist(), strict=True):
        mean, std = fmt.stats_from_sums(a, b, n, first)
        out.append((mean, std, *fmt.range_of(mean, std, first)))
    return out


def _codes(rows: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, in_float: list[bool]) -> torch.Tensor:
    """Step 3, row by row in fp32 or double as ``fmt.float_codes`` decides."""
    codes = torch.empty(rows.shape, dtype=torch.uint8)
    for use_float in (True, False):
        pick = torch.tensor([f == use_float for f in in_float])
        if not pick.any():
            continue
        if use_float:  # all three operands fp32: no promotion can sneak in a wider intermediate
            t = (rows[pick] - lo[pick].float()) * scale[pick].float()
        else:
            t = (rows[pick].double() - lo[pick]) * scale[pick]
        codes[pick] = t.clamp_(0.0, 255.0).to(torch.uint8)  # truncation, like the C cast
    return codes


def _quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[float, ...]]]:
    count, n = rows.shape
    stats = chunk_ranges(rows)
    lo = torch.tensor([s[2] for s in stats], dtype=torch.float64)[:, None]
    scale = torch.tensor([s[3] for s in stats], dtype=torch.float64)[:, None]
    codes = _codes(rows, lo, scale, [fmt.float_codes(s[2], s[3]) for s in stats])

    xd = rows.double().view(-1)
    index = (codes.long() + torch.arange(count)[:, None] * fmt.N_BUCKETS).view(-1)
    sums = torch.zeros(count * fmt.N_BUCKETS, dtype=torch.float64).index_add_(0, index, xd)
    counts = torch.bincount(index, minlength=count * fmt.N_BUCKETS).double()
    sums, counts = sums.view(count, -1), counts.view(count, -1)

    k = torch.arange(fmt.N_BUCKETS, dtype=torch.float64)
    midpoints = (lo + (k + 0.5) / scale).clamp_(-fmt.FLT_MAX, fmt.FLT_MAX)
    codebooks = torch.where(counts > 0, sums / counts.clamp(min=1.0), midpoints).float()
    constant = torch.tensor([s[1] == 0.0 for s in stats])
    codebooks[constant] = rows[constant, :1]  # every entry is the value itself: exact round trip
    return codes, codebooks, stats


def quantize(
    x: torch.Tensor, chunk_size: int = fmt.DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[float, ...]]]:
    """Codes (uint8, numel), codebooks (float32, n_chunks x 256) and per-chunk (mean, std, lo, scale).

    ``x`` must already be validated (1-D contiguous float32, finite).
    """
    fmt.check_chunk_size(chunk_size)
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    codebooks = torch.empty(fmt.n_chunks(n, chunk_size), fmt.N_BUCKETS, dtype=torch.float32)
    stats: list[tuple[float, ...]] = []
    full = n // chunk_size
    per_group = max(1, _GROUP_VALUES // chunk_size)
    for first in range(0, full, per_group):
        last = min(full, first + per_group)
        rows = x[first * chunk_size : last * chunk_size].view(last - first, chunk_size)
        c, cb, st = _quantize_rows(rows)
        codes[first * chunk_size : last * chunk_size] = c.view(-1)
        codebooks[first:last] = cb
        stats += st
    if n % chunk_size:
        c, cb, st = _quantize_rows(x[full * chunk_size :].view(1, -1))
        codes[full * chunk_size :] = c.view(-1)
        codebooks[full] = cb[0]
        stats += st
    return codes, codebooks, stats


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``codebooks[chunk_of(i), codes[i]]`` for every ``i``, as a new float32 tensor."""
    out = torch.empty(codes.numel(), dtype=torch.float32)
    for c, start in enumerate(range(0, codes.numel(), chunk_size)):
        piece = slice(start, start + chunk_size)
        out[piece] = codebooks[c][codes[piece].long()]
    return out


def decode_accumulate(
    codes: torch.Tensor, codebooks: torch.Tensor, chunk_size: int, out: torch.Tensor, weight: float
) -> None:
    """``out += weight * decoded`` rounded like the kernel: ``float32(weight) * codebook``, then the add."""
    scaled = codebooks * torch.tensor(weight, dtype=torch.float32)
    out += dequantize(codes, scaled, chunk_size)
