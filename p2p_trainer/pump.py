"""Rank 0's window onto the vectors the local ranks hold in shares (see ``shards``).

The swarm connection lives on rank 0, the outer state is spread over the ranks. Rank 0 reads a
canonical window ``[lo, hi)`` of a named vector (each rank sends its values in it) or writes one
(each rank gets its values, and does what that name means with them: keep them, take the outer
step on them). A rank's values in a window are one contiguous range of its share, so a command
is one small broadcast and one send per rank holding part of the window, on a gloo group of its
own: CPU tensors, apart from the training's (NCCL) collectives, so it runs while training goes on.
Windows are the caller's (an all-reduce chunk, a hashing window), so no rank holds more than its
share plus one window. Rank 0 may issue commands from several threads (they are serialized); the
other ranks serve them on a thread of their own. With one rank, reads and writes are plain calls.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from p2p_trainer.shards import Layout

logger = logging.getLogger(__name__)

Reader = Callable[[int, int], torch.Tensor]  # share offsets [a, b) -> b - a fp32 values on the CPU
Writer = Callable[[int, int, torch.Tensor], None]  # share offsets [a, b), their new values
Call = Callable[[float], None]  # something every rank does to its own share, given one number

_READ, _WRITE, _CALL, _STOP = 0, 1, 2, 3


def _name_id(name: str) -> int:
    return zlib.crc32(name.encode())


def _bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64))


def _float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int64).view(torch.float64))


class Pump:
    def __init__(self, layout: Layout, rank: int, world: int) -> None:
        self.layout, self.rank, self.world = layout, rank, world
        self._readers: dict[int, Reader] = {}
        self._writers: dict[int, Writer] = {}
        self._calls: dict[int, Call] = {}
        self._lock = threading.Lock()
        self._group = None
        self._thread: threading.Thread | None = None

    def provide(
        self, name: str, *, read: Reader | None = None, write: Writer | None = None, call: Call | None = None
    ) -> None:
        """On every rank: how this rank reads and writes its share of ``name``, or what it does when
        rank 0 calls ``name``."""
        if read is not None:
            self._readers[_name_id(name)] = read
        if write is not None:
            self._writers[_name_id(name)] = write
        if call is not None:
            self._calls[_name_id(name)] = call

    def start(self) -> Pump:
        """On every rank, at the same point (it creates a process group)."""
        if self.world > 1:
            # commands may be hours apart (between rounds): the group must not time out waiting
            self._group = dist.new_group(backend="gloo", timeout=timedelta(days=365))
            if self.rank != 0:
                self._thread = threading.Thread(target=self._serve, name="pump", daemon=True)
                self._thread.start()
        return self

    # ---- rank 0 ----
    def read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rank 0: canonical values ``[lo, hi)`` of ``name`` (a new fp32 CPU tensor)."""
        key = _name_id(name)
        if self.world == 1:
            return self._readers[key](lo, hi)
        out = torch.empty(hi - lo, dtype=torch.float32)
        with self._lock:
            dist.broadcast(torch.tensor([_READ, key, lo, hi, 0]), src=0, group=self._group)
            for rank, pieces in self._by_rank(lo, hi).items():
                a, b = pieces[0][1], pieces[-1][2]
                values = self._read_mine(key, a, b) if rank == 0 else torch.empty(b - a)
                if rank != 0:
                    dist.recv(values, src=rank, group=self._group)
                for piece, pa, pb in pieces:
                    start = piece.canon + pa - piece.share - lo
                    out[start : start + pb - pa] = values[pa - a : pb - a]
        return out

    def write(self, name: str, lo: int, hi: int, values: torch.Tensor) -> None:
        """Rank 0: canonical values ``[lo, hi)`` of ``name`` go to the ranks that hold them."""
        key = _name_id(name)
        if self.world == 1:
            return self._writers[key](lo, hi, values)
        with self._lock:
            dist.broadcast(torch.tensor([_WRITE, key, lo, hi, 0]), src=0, group=self._group)
            for rank, pieces in self._by_rank(lo, hi).items():
                packed = torch.cat(
                    [
                        values[p.canon + pa - p.share - lo : p.canon + pb - p.share - lo]
                        for p, pa, pb in pieces
                    ]
                ).float()
                if rank == 0:
                    self._writers[key](pieces[0][1], pieces[-1][2], packed)
                else:
                    dist.send(packed, dst=rank, group=self._group)

    def call(self, name: str, arg: float = 0.0) -> None:
        """Rank 0: every rank runs its ``name`` (in order with the reads and writes before and after
        it); returns once all have."""
        key = _name_id(name)
        if self.world == 1:
            return self._calls[key](arg)
        with self._lock:
            dist.broadcast(torch.tensor([_CALL, key, 0, 0, _bits(arg)]), src=0, group=self._group)
            self._calls[key](arg)
            dist.barrier(group=self._group)

    def _by_rank(self, lo: int, hi: int) -> dict[int, list]:
        by_rank: dict[int, list] = {}
        for piece, a, b in self.layout.window(lo, hi):
            by_rank.setdefault(piece.rank, []).append((piece, a, b))
        return by_rank

    def close(self) -> None:
        """On every rank: rank 0 tells the others' serving threads to end, they wait for it."""
        if self.world == 1 or self._group is None:
            return
        if self.rank == 0:
            with self._lock:
                dist.broadcast(torch.tensor([_STOP, 0, 0, 0, 0]), src=0, group=self._group)
        elif self._thread is not None:
            self._thread.join()
        self._group = None

    # ---- the other ranks ----
    def _serve(self) -> None:
        command = torch.zeros(5, dtype=torch.int64)
        while True:
            dist.broadcast(command, src=0, group=self._group)
            op, key, lo, hi, arg = command.tolist()
            if op == _STOP:
                return
            if op == _CALL:
                try:
                    self._calls[key](_float(arg))
                except Exception:  # a bug: say so loudly, but do not leave rank 0 waiting forever
                    logger.exception(f"rank {self.rank}: a call on its outer state failed")
                dist.barrier(group=self._group)
                continue
            mine = self.layout.window(lo, hi, self.rank)
            if not mine:
                continue
            a, b = mine[0][1], mine[-1][2]
            if op == _READ:
                dist.send(self._read_mine(key, a, b), dst=0, group=self._group)
            else:
                values = torch.empty(b - a)
                dist.recv(values, src=0, group=self._group)
                try:
                    self._writers[key](a, b, values)
                except Exception:  # a bug: say so loudly, but do not leave rank 0 waiting forever
                    logger.exception(f"rank {self.rank}: writing [{a}, {b}) of a shared vector failed")

    def _read_mine(self, key: int, a: int, b: int) -> torch.Tensor:
        try:
            values = self._readers[key](a, b).float().contiguous()
            if values.numel() == b - a:
                return values
            logger.error(f"rank {self.rank}: read {values.numel()} values of a shared vector, not {b - a}")
        except Exception:  # rank 0 gets NaN, which no codec sends: the round fails instead of hanging
            logger.exception(f"rank {self.rank}: reading [{a}, {b}) of a shared vector failed")
        return torch.full((b - a,), float("nan"))
