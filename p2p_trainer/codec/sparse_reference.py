"""Pure numpy/torch sparse codec following ``sparse_format``'s arithmetic step by step.

It is the fallback when the C kernel cannot be built and the oracle the kernel is tested against:
the same input gives the same payload bytes. Every floating point step is one elementwise IEEE op,
and the only sums whose order matters (the level means) are left-to-right accumulations.
"""

from __future__ import annotations

import numpy as np
import torch

from p2p_trainer.codec import sparse_format as fmt

# Chunks are encoded this many values at a time: large enough to amortize each call, small enough
# that the temporaries (a few bytes per value) stay around 10 MiB.
_GROUP_VALUES = 1 << 20


def _select(rows: np.ndarray, kc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 1: per row, the kept positions in increasing order (kept entries first, then padding),
    their magnitude keys (0 for padding) and whether each slot is kept."""
    n = rows.shape[1]
    key = rows.view(np.int32) & 0x7FFFFFFF
    # The kc-th largest key is well defined whatever the selection algorithm; then every larger key
    # is in, and of the keys equal to it the first `need` by index.
    threshold = np.partition(key, n - kc, axis=1)[:, n - kc : n - kc + 1]
    above, equal = key > threshold, key == threshold
    need = kc - np.count_nonzero(above, axis=1)[:, None]
    chosen = above | equal
    tied = np.count_nonzero(equal, axis=1) > need[:, 0]  # rows where some equal keys stay out
    if tied.any():
        first = np.cumsum(equal[tied], axis=1) <= need[tied]
        chosen[tied] = above[tied] | (equal[tied] & first)
    top = np.nonzero(chosen)[1].reshape(-1, kc)  # row-major: each row's kc positions, increasing
    top_key = np.take_along_axis(key, top, axis=1)
    kept = top_key > 0
    # Move the kept slots to the front, keeping their index order (a stable sort on "not kept").
    order = np.argsort(~kept, axis=1, kind="stable")
    return (
        np.take_along_axis(top, order, axis=1),
        np.take_along_axis(top_key, order, axis=1),
        np.take_along_axis(kept, order, axis=1),
    )


def _quantize(key: np.ndarray, kept: np.ndarray, n_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2 and 3: the bucket of every slot and the fp32 level table of every row."""
    rows = key.shape[0]
    a = key.astype(np.int32).view(np.float32).astype(np.float64)  # |x|, exactly
    any_kept = kept.any(axis=1)
    lo = np.where(any_kept, np.where(kept, a, np.inf).min(axis=1), 0.0)
    hi = np.where(any_kept, np.where(kept, a, -np.inf).max(axis=1), 0.0)
    spread = hi > lo
    scale = np.where(spread, np.float64(n_levels) / np.where(spread, hi - lo, 1.0), 0.0)
    t = np.where(kept & spread[:, None], (a - lo[:, None]) * scale[:, None], 0.0)
    q = np.where(t >= n_levels - 1, n_levels - 1, np.trunc(t)).astype(np.int64)

    sums = np.empty((rows, n_levels), dtype=np.float64)
    counts = np.empty((rows, n_levels), dtype=np.int64)
    for j in range(n_levels):
        member = kept & (q == j)
        # accumulate (unlike sum, which is pairwise) adds left to right: the spec's index order.
        # The + 0.0 of non-members leaves a running sum >= +0 unchanged.
        sums[:, j] = np.add.accumulate(np.where(member, a, 0.0), axis=1)[:, -1]
        counts[:, j] = np.count_nonzero(member, axis=1)
    j = np.arange(n_levels, dtype=np.float64) + 0.5
    midpoints = lo[:, None] + ((hi - lo)[:, None] * j[None, :]) / n_levels
    levels = np.where(counts > 0, sums / np.maximum(counts, 1), midpoints).astype(np.float32)
    return q, levels


def _pack(slots: np.ndarray, pos: np.ndarray, kept: np.ndarray, b: fmt.Block) -> np.ndarray:
    """Step 5: (rows, kc) slot values and kept positions -> (rows, b.size) blocks: the slots, LSB
    first, then the high bitmap with a one at ``(pos >> low_bits) + j`` for kept entry ``j``."""
    rows, kc = slots.shape
    bits = np.zeros((rows, 8 * b.size), dtype=np.uint8)
    width = b.slot_bits
    bits[:, : kc * width] = ((slots[:, :, None] >> np.arange(width)) & 1).reshape(rows, kc * width)
    row, j = np.nonzero(kept)  # kept slots come first in each row, so j counts the row's entries
    bits[row, kc * width + (pos[row, j] >> b.low_bits) + j] = 1
    return np.packbits(bits, axis=1, bitorder="little")


def encode_rows(
    rows: np.ndarray, params: fmt.SparseParams, b: fmt.Block
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levels (rows, L) fp32, counts (rows,) and blocks (rows, b.size) of whole chunks."""
    pos, key, kept = _select(rows, b.kc)
    q, levels = _quantize(key, kept, params.n_levels)
    negative = np.take_along_axis(rows.view(np.int32), pos, axis=1) < 0
    code = negative.astype(np.int64) | (q << 1)
    low = pos & ((1 << b.low_bits) - 1)
    slots = np.where(kept, low | (code << b.low_bits), 0)
    return levels, np.count_nonzero(kept, axis=1), _pack(slots, pos, kept, b)


def encode(x: torch.Tensor, params: fmt.SparseParams) -> bytes:
    """The payload of ``x`` (already validated: 1-D contiguous float32, finite)."""
    lay = fmt.layout(x.numel(), params)
    values = x.numpy()
    c = params.chunk_size
    levels = np.empty((lay.n_chunks, params.n_levels), dtype="<f4")
    counts = np.empty(lay.n_chunks, dtype="<u2")
    blocks: list[bytes] = []
    full = x.numel() // c
    per_group = max(1, _GROUP_VALUES // c)
    for first in range(0, full, per_group):
        last = min(full, first + per_group)
        rows = values[first * c : last * c].reshape(last - first, c)
        lv, ct, bl = encode_rows(rows, params, lay.block)
        levels[first:last], counts[first:last] = lv, ct
        blocks.append(bl.tobytes())
    if full < lay.n_chunks:  # a short last chunk
        rows = values[full * c :].reshape(1, -1)
        lv, ct, bl = encode_rows(rows, params, lay.last_block)
        levels[full:], counts[full:] = lv, ct
        blocks.append(bl.tobytes())
    return b"".join([fmt.pack_header(x.numel(), params), levels.tobytes(), counts.tobytes(), *blocks])


def _signed_values(slots: fmt.Slots) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.from_numpy(slots.positions)
    levels = torch.from_numpy(slots.levels.astype(np.float32))  # a copy, never a view of the payload
    return positions, torch.where(torch.from_numpy(slots.signs), -levels, levels)


def decode(parsed: fmt.Parsed) -> torch.Tensor:
    """A new float32 tensor; raises CodecError on any invalid slot."""
    positions, values = _signed_values(fmt.unpack_slots(parsed))
    out = torch.zeros(parsed.layout.numel, dtype=torch.float32)
    out[positions] = values
    return out


def decode_accumulate(parsed: fmt.Parsed, out: torch.Tensor, weight: float) -> None:
    """``out[p] += float32(weight) * value`` at each kept position; validates every slot first."""
    positions, values = _signed_values(fmt.unpack_slots(parsed))
    out[positions] += values * torch.tensor(weight, dtype=torch.float32)
