"""Which values of the canonical flat vector each local rank holds.

The swarm averages one canonical flat fp32 vector: every parameter, flattened, in
``model.parameters()`` order, whatever the number of local ranks. FSDP2 shards each parameter on
dim 0 with ``torch.chunk`` semantics: of a parameter with ``d`` rows, rank ``r`` holds rows
``[r*c, min(d, (r+1)*c))`` with ``c = ceil(d / world)`` (the last ranks may hold fewer, or none).
A rank's *share* of any vector laid out like θ (the master copy, the outer momentum, a residual,
the AdamW moments) is the concatenation of its rows of every parameter, in parameter order; so a
rank's share lines up with its own FSDP shards and moving θ between share and model needs no
communication. With one rank the share is the whole vector.

A ``Piece`` is one run of values that is contiguous both in the canonical vector and in one
rank's share; ``Layout.window`` cuts a canonical window into pieces, which is all rank 0 needs to
gather a window from the ranks or scatter one to them (see ``pump``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Piece:
    rank: int
    param: int
    canon: int  # canonical offset of the first value
    share: int  # offset of the first value in ``rank``'s share
    length: int


class Layout:
    def __init__(self, shapes: Iterable[tuple[int, ...]], world: int) -> None:
        self.shapes, self.world = [tuple(s) for s in shapes], world
        self.pieces: list[Piece] = []  # in canonical order
        self.share_numel = [0] * world
        canon = 0
        for i, shape in enumerate(self.shapes):
            rows = shape[0] if shape else 1
            row = math.prod(shape[1:]) if len(shape) > 1 else 1
            per_rank = -(-rows // world)
            for r in range(world):
                first, last = min(rows, r * per_rank), min(rows, (r + 1) * per_rank)
                length = (last - first) * row
                if length:
                    self.pieces.append(Piece(r, i, canon, self.share_numel[r], length))
                    self.share_numel[r] += length
                canon += length
        self.numel = canon
        self._starts = [p.canon for p in self.pieces]
        self._own = [[p for p in self.pieces if p.rank == r] for r in range(world)]

    @classmethod
    def of(cls, params: Iterable[torch.Tensor], world: int) -> Layout:
        return cls((tuple(p.shape) for p in params), world)  # a DTensor's shape is the full one

    def window(self, lo: int, hi: int, rank: int | None = None) -> list[tuple[Piece, int, int]]:
        """The pieces that cover canonical ``[lo, hi)`` (of ``rank`` only, if given), each with the
        part of it inside the window as share offsets ``[a, b)``, in canonical order."""
        if not 0 <= lo <= hi <= self.numel:
            raise ValueError(f"window [{lo}, {hi}) outside a vector of {self.numel} values")
        out = []
        i = max(bisect.bisect_right(self._starts, lo) - 1, 0)
        while i < len(self.pieces) and self.pieces[i].canon < hi:
            piece = self.pieces[i]
            start, end = max(lo, piece.canon), min(hi, piece.canon + piece.length)
            if start < end and (rank is None or piece.rank == rank):
                out.append((piece, piece.share + start - piece.canon, piece.share + end - piece.canon))
            i += 1
        return out

    def own(self, rank: int) -> list[Piece]:
        """``rank``'s pieces, one per parameter it holds rows of, in share order."""
        return self._own[rank]


@torch.no_grad()
def local_views(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's rows of each tensor, flat (a view: writing to it writes the tensor)."""
    return [(t.to_local() if isinstance(t, DTensor) else t).reshape(-1) for t in tensors]


@torch.no_grad()
def gather_share(layout: Layout, rank: int, views: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``views`` (this rank's rows of every parameter) into the flat share ``out``, as fp32."""
    for piece in layout.own(rank):
        out[piece.share : piece.share + piece.length].copy_(views[piece.param])
    return out


@torch.no_grad()
def scatter_share(layout: Layout, rank: int, share: torch.Tensor, views: list[torch.Tensor]) -> None:
    """The flat share back into this rank's rows of every parameter."""
    for piece in layout.own(rank):
        views[piece.param].copy_(share[piece.share : piece.share + piece.length])


@torch.no_grad()
def read_views(layout: Layout, rank: int, views: list[torch.Tensor], a: int, b: int) -> torch.Tensor:
    """Share values ``[a, b)`` of this rank read straight from ``views``, as fp32 on the CPU."""
    parts = []
    for piece in layout.own(rank):
        start, end = max(a, piece.share), min(b, piece.share + piece.length)
        if start < end:
            parts.append(views[piece.param][start - piece.share : end - piece.share].float().cpu())
    return torch.cat(parts) if parts else torch.empty(0)
