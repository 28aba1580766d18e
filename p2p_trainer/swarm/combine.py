"""One chunk's arithmetic at a reducer: its members' parts decoded, checked and combined in the
given order (``combine``), into a buffer reused from chunk to chunk (``Scratch``) whose pages are
huge where Linux offers them (``empty_f32``). No networking, no bookkeeping (``partition``)."""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from p2p_trainer.codec import Codec, CodecError
from p2p_trainer.swarm import aggregation


@dataclass
class ChunkOutcome:
    average: torch.Tensor | None = None  # None: no valid part
    reply: bytes = b""  # the encoded average
    total: float = 0.0
    refused: list[tuple[str, CodecError]] = field(default_factory=list)
    clipped: dict[str, float] = field(default_factory=dict)


_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14  # Linux


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def empty_f32(numel: int) -> torch.Tensor:
    """A new float32 tensor for a large buffer (a round's output, a reduction's scratch), backed by
    transparent huge pages where Linux offers them: its first touch then costs one page fault per
    2 MiB instead of per 4 KiB (a fresh 64 MB tensor took 43 ms of CPU to fill with 4 KiB pages on
    the benchmark machine, 14 ms with huge ones). Only advice: without it the tensor is the same."""
    out = torch.empty(numel, dtype=torch.float32)
    madvise = _madvise() if 4 * numel >= 2 * _HUGE_PAGE else None
    if madvise is not None:
        start = out.data_ptr()
        lo = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        hi = (start + 4 * numel) // _HUGE_PAGE * _HUGE_PAGE
        if hi > lo:
            madvise(lo, hi - lo, _MADV_HUGEPAGE)
    return out


class Scratch:
    """A buffer reused from chunk to chunk: a new tensor per chunk would cost a page fault per
    4 KiB, every chunk. A round's own reduction and its re-checks share one (``clip`` takes
    (members + 1) chunks of fp32 in it, 20 MB at 4 members and 2^20 values): whoever combines into
    it holds ``lock`` until done with what it holds."""

    def __init__(self) -> None:
        self._flat = torch.empty(0, dtype=torch.float32)
        self.lock = threading.Lock()

    def take(self, numel: int) -> torch.Tensor:
        if self._flat.numel() < numel:
            self._flat = empty_f32(numel)
        return self._flat[:numel]


def combine(
    codec: Codec,
    mode: str,
    tau: float,
    parts: list[tuple[str, float, bytes | bytearray]],
    n: int,
    scratch: Scratch | None = None,
) -> ChunkOutcome:
    """Decode, check and combine one chunk's parts (peer, weight, payload), in the given order:
    the plain weighted mean decoded straight into one accumulator, or the robust clipped mean.
    With ``scratch`` the average lives in that buffer (until its next use), else in a new tensor."""
    outcome = ChunkOutcome()
    if mode == "mean" or len(parts) <= 2:  # clip leaves two parts as they are (see ``aggregation``)
        acc = scratch.take(n).zero_() if scratch is not None else torch.zeros(n, dtype=torch.float32)
        for peer_id, weight, payload in parts:
            try:
                codec.decode_accumulate(payload, acc, weight)  # leaves acc untouched on error
            except CodecError as e:
                outcome.refused.append((peer_id, e))
                continue
            outcome.total += weight
        if outcome.total > 0.0:
            outcome.average = acc.div_(outcome.total)
        return outcome
    size = (len(parts) + 1) * n
    flat = scratch.take(size) if scratch is not None else torch.empty(size, dtype=torch.float32)
    acc, rows, used = flat[:n], flat[n:].view(len(parts), n), []
    for peer_id, weight, payload in parts:
        try:
            codec.decode_into(payload, rows[len(used)])
        except CodecError as e:
            outcome.refused.append((peer_id, e))
            continue
        used.append((peer_id, weight))
    if used:
        outcome.average, outcome.total, scales = aggregation.clipped_mean(
            rows[: len(used)], [w for _, w in used], tau, out=acc
        )
        outcome.clipped = {p: s for (p, _), s in zip(used, scales, strict=True) if s < 1.0}
    return outcome
