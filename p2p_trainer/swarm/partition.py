"""Slicing the flat vector and reducing one slice: the arithmetic of the all-reduce, no networking.

The vector is cut into contiguous, near-equal slices, one per full member in group order. The
reducer of a slice collects every member's part (``SliceReduction``), validates it (weight, exact
size, decodable, finite), and once all are in or the deadline passed, accumulates the valid parts
in fp32 in group order and encodes the average once: every member gets those same bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch

from p2p_trainer.codec import Codec, CodecError
from p2p_trainer.swarm.matchmaking import Group, check_weight

logger = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], bytes]  # (header, averaged payload) a reducer sends every member


def slice_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [lo, hi) slices; the first ``numel % parts`` are one longer."""
    base, extra = divmod(numel, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + base + (i < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def weighted_mean(parts: list[tuple[float, torch.Tensor]], numel: int) -> tuple[torch.Tensor, float]:
    """Σ w_j x_j / Σ w_j in fp32, in the given order; consumes (scales in place) the parts' tensors.
    Product and sum are rounded separately (no fused multiply-add), so the result does not depend
    on how the vector is sliced."""
    acc, total = torch.zeros(numel, dtype=torch.float32), 0.0
    for weight, values in parts:
        acc.add_(values.mul_(weight))
        total += weight
    return acc.div_(total), total


def error_reply(message: str) -> Reply:
    return {"error": message}, b""


class SliceReduction:
    """Reducer-side state for one slice of one group: who sent a valid part, who is left out and
    why, and the reply every member gets (``result``, set once)."""

    def __init__(
        self,
        group: Group,
        index: int,
        bounds: tuple[int, int],
        *,
        codec: Codec,
        timeout: float,
        max_weight: float,
        takeover: bool = False,
    ) -> None:
        self.group, self.index, (self.lo, self.hi) = group, index, bounds
        self.codec, self.timeout, self.max_weight = codec, timeout, max_weight
        # the slice of a lost reducer: every live member must take part (see ``reduce``)
        self.takeover = takeover
        self.deadline = time.monotonic() + timeout
        self.parts: dict[str, tuple[float, torch.Tensor]] = {}
        self.excluded: dict[str, str] = {}
        self.pending = {m.peer_id for m in group.members}
        self.all_in = asyncio.Event()
        self.closed = False
        self.result: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    def exclude(self, peer_id: str, reason: str) -> None:
        if peer_id in self.pending:
            logger.warning(
                f"round {self.group.outer_step} slice {self.index}: leaving out {peer_id}: {reason}"
            )
            self.excluded[peer_id] = reason
            self._resolved(peer_id)

    def _resolved(self, peer_id: str) -> None:
        self.pending.discard(peer_id)
        if not self.pending:
            self.all_in.set()

    def check(self, peer_id: str, weight: Any, numel: Any) -> str | None:
        """Why a part's header is unacceptable, or None."""
        declared = self.group.member(peer_id)
        if declared is None:
            return "not a member of this group"
        bad = check_weight(weight, self.max_weight)
        if bad is None and weight != declared.weight:
            bad = f"weight {weight:g} differs from the {declared.weight:g} it declared when joining"
        if bad is None and numel != self.numel:
            bad = f"part of {numel} values, the slice has {self.numel}"
        return bad

    async def submit(self, sender: str, weight: Any, numel: Any, payload: bytes | bytearray) -> None:
        """Check and decode ``sender``'s part; it is accepted or the sender is left out, with the reason."""
        if self.closed or sender not in self.pending:
            return
        bad = self.check(sender, weight, numel)
        if bad is None:
            try:
                values = await asyncio.get_running_loop().run_in_executor(None, self._decode, payload)
            except CodecError as e:
                bad = f"malformed part: {e}"
        if self.closed or sender not in self.pending:
            return
        if bad is not None:
            self.exclude(sender, bad)
        else:
            self.parts[sender] = (float(weight), values)
            self._resolved(sender)

    def _decode(self, payload: bytes | bytearray) -> torch.Tensor:
        # decode() refuses non-finite values (codec contract); should one slip through anyway, the
        # average cannot be encoded and the slice fails as a whole instead of spreading NaN
        values = self.codec.decode(payload, self.numel)
        if values.shape != (self.numel,) or values.dtype != torch.float32:
            raise CodecError(
                f"decoded part has shape {tuple(values.shape)} and {values.dtype}, not ({self.numel},)"
            )
        return values

    async def reduce(self) -> None:
        """Wait for every part (or the deadline), then set ``result``: the encoded average, or an error."""
        try:
            await asyncio.wait_for(self.all_in.wait(), max(self.deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            late = sorted(self.pending)
            for peer_id in late:
                self.exclude(peer_id, f"sent nothing within allreduce_timeout={self.timeout:g}s")
            if self.takeover:
                # a silent member may hold the lost reducer's own average for this slice (or never
                # noticed it was gone): an average without it could differ from what it applies
                self.closed = True
                why = f"{', '.join(late)} did not take part, so its copy of the slice may differ"
                self.result.set_result(error_reply(f"slice {self.index} cannot be taken over: {why}"))
                return
        self.closed = True
        step, index = self.group.outer_step, self.index
        parts = [self.parts[m.peer_id] for m in self.group.members if m.peer_id in self.parts]
        if not parts:
            self.result.set_result(error_reply(f"no valid part for slice {index} of round {step}"))
            return
        loop = asyncio.get_running_loop()
        try:
            average, total = await loop.run_in_executor(None, weighted_mean, parts, self.numel)
            payload = await loop.run_in_executor(None, self.codec.encode, average)
        except Exception as e:  # e.g. the weighted sum overflowed
            logger.warning(f"round {step}: cannot reduce slice {index}: {e}")
            self.result.set_result(error_reply(f"reducer failed on slice {index}: {e}"))
            return
        header = {"total_weight": total, "included": len(parts), "excluded": dict(self.excluded)}
        self.result.set_result((header, payload))
