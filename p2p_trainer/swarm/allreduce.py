"""Butterfly all-reduce of one flat fp32 vector inside a frozen group, bit-identical on every member.

The vector is cut into contiguous slices, one per full (non-client) member, in group order. Every
member sends its encoded part of slice i to reducer i on a stream the sender opens, and reads the
averaged slice back on that same stream, so client members never need an incoming connection.
Reducer i validates each part (weight, size, decodable, finite), accumulates the valid ones in fp32
in group order (Σ w_j x_j / Σ w_j), encodes the result once and sends those same bytes to every
member; it decodes its own copy of the slice from those bytes too. With a lossy codec every member
therefore ends with exactly the same vector. A member whose part is invalid or late is left out of
that slice (and told so).

A reducer that is gone (its stream breaks, or it sends nothing within the reply timeout: a crashed
peer) is left out too: the next live reducer in group order takes its slice over. A backup that
already holds the lost reducer's average for that slice hands out those very bytes; otherwise it
reduces the slice afresh from the survivors' parts, and only when every live member sent one (a
member that stays silent may hold the lost reducer's average, and the copies must not differ). A
takeover needs two live members; with fewer, or a silent one, or a reducer that answers with an
error, the round fails for everyone who needs that slice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID

from p2p_trainer.codec import Codec, CodecError
from p2p_trainer.swarm import wire
from p2p_trainer.swarm.errors import RoundFailed
from p2p_trainer.swarm.matchmaking import Group, check_weight

logger = logging.getLogger(__name__)

_DRAIN_S = 5.0  # how long a reducer keeps reading a late part before it answers with the average


@dataclass(frozen=True)
class OutgoingPart:
    """One part as it is about to leave its sender: the fault-injection seam for tests."""

    slice_index: int
    reducer: str
    values: torch.Tensor  # the sender's slice of the vector (do not modify in place)
    payload: wire.Payload  # the encoded values that go on the wire
    weight: float
    delay_s: float = 0.0  # sleep this long before sending


Fault = Callable[[OutgoingPart], OutgoingPart]


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


@dataclass
class ReduceOutcome:
    average: torch.Tensor
    total_weight: float
    excluded: dict[str, str]  # peer id -> why it was left out (of at least one slice)
    traffic: wire.Traffic


class _SliceReduction:
    """Reducer-side state for our slice of one group."""

    def __init__(self, group: Group, index: int, bounds: tuple[int, int], timeout: float, max_weight: float):
        self.group, self.index, (self.lo, self.hi) = group, index, bounds
        self.deadline = time.monotonic() + timeout
        self.timeout, self.max_weight = timeout, max_weight
        self.parts: dict[str, tuple[float, torch.Tensor]] = {}
        self.excluded: dict[str, str] = {}
        self.pending = {m.peer_id for m in group.members}
        self.all_in = asyncio.Event()
        self.closed = False
        self.takeover = False  # the slice of a lost reducer: every live member must take part
        self.result: asyncio.Future[tuple[dict[str, Any], wire.Payload]] = (
            asyncio.get_running_loop().create_future()
        )

    def exclude(self, peer_id: str, reason: str) -> None:
        if peer_id in self.pending:
            logger.warning(
                f"round {self.group.outer_step} slice {self.index}: leaving out {peer_id}: {reason}"
            )
            self.excluded[peer_id] = reason
            self._resolved(peer_id)

    def accept(self, peer_id: str, weight: float, values: torch.Tensor) -> None:
        if peer_id in self.pending:
            self.parts[peer_id] = (weight, values)
            self._resolved(peer_id)

    def _resolved(self, peer_id: str) -> None:
        self.pending.discard(peer_id)
        if not self.pending:
            self.all_in.set()

    def check(self, peer_id: str, weight: Any, numel: Any) -> str | None:
        declared = self.group.member(peer_id)
        if declared is None:
            return "not a member of this group"
        bad = check_weight(weight, self.max_weight)
        if bad is None and weight != declared.weight:
            bad = f"weight {weight:g} differs from the {declared.weight:g} it declared when joining"
        if bad is None and numel != self.hi - self.lo:
            bad = f"part of {numel} values, the slice has {self.hi - self.lo}"
        return bad


@dataclass
class _Round:
    group: Group
    traffic: wire.Traffic = field(default_factory=wire.Traffic)
    reduction: _SliceReduction | None = None
    bounds: list[tuple[int, int]] = field(default_factory=list)
    lost: dict[str, str] = field(default_factory=dict)  # reducers found gone -> why
    takeovers: dict[int, _SliceReduction] = field(default_factory=dict)  # slices of lost reducers we reduce
    # per slice: the (header, payload) the slice's reducer sent us, None once it was found gone
    outcomes: dict[int, asyncio.Future] = field(default_factory=dict)
    tasks: list[asyncio.Task] = field(default_factory=list)

    def outcome(self, index: int) -> asyncio.Future:
        if index not in self.outcomes:
            self.outcomes[index] = asyncio.get_running_loop().create_future()
        return self.outcomes[index]

    def settle(self, index: int, value: Any) -> None:
        if not self.outcome(index).done():
            self.outcomes[index].set_result(value)


class _ReducerLost(Exception):
    """The reducer of a slice is gone: its stream broke or no answer came in time."""


class AllReducer:
    def __init__(
        self,
        p2p: P2P,
        *,
        run_id: str,
        peer_id: str,
        client_mode: bool,
        codec: Codec,
        timeout: float,
        max_weight: float,
        fault: Fault | None = None,
    ) -> None:
        self._p2p, self.peer_id, self.client_mode = p2p, peer_id, client_mode
        self._handler = f"p2p_trainer.{run_id}.part"
        self.codec, self.timeout, self.max_weight = codec, timeout, max_weight
        self.fault = fault
        self._rounds: collections.OrderedDict[str, asyncio.Future[_Round]] = collections.OrderedDict()

    async def start(self) -> None:
        if not self.client_mode:
            await self._p2p.add_binary_stream_handler(self._handler, self._handle_part)

    @property
    def _reply_timeout(self) -> float:
        return self.timeout + max(5.0, self.timeout)  # the reducer's wait, plus time to compute and send

    def _round_future(self, group_id: str) -> asyncio.Future[_Round]:
        if group_id not in self._rounds:
            self._rounds[group_id] = asyncio.get_running_loop().create_future()
            while len(self._rounds) > 8:
                self._rounds.popitem(last=False)
        return self._rounds[group_id]

    async def run(self, group: Group, vector: torch.Tensor, weight: float) -> ReduceOutcome:
        reducers = group.reducers
        bounds = slice_bounds(group.numel, len(reducers))
        state = _Round(group, bounds=bounds)
        if self.peer_id in reducers:
            index = reducers.index(self.peer_id)
            state.reduction = _SliceReduction(group, index, bounds[index], self.timeout, self.max_weight)
            reducing = asyncio.create_task(self._reduce(state.reduction))
        future = self._round_future(group.group_id)
        if not future.done():
            future.set_result(state)
        contributions = [
            self._contribute(state, i, reducer, vector[lo:hi], weight)
            for i, (reducer, (lo, hi)) in enumerate(zip(reducers, bounds, strict=True))
        ]
        replies = await asyncio.gather(*contributions, return_exceptions=True)
        if state.reduction is not None:
            await reducing  # the others need our slice even if our own contribution failed
        for index in range(len(reducers)):  # nobody waits on these after a failure
            state.settle(index, ("failed", "this peer's round ended"))
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply if isinstance(reply, RoundFailed) else RoundFailed(repr(reply))
        average = torch.empty(group.numel, dtype=torch.float32)
        excluded: dict[str, str] = {}
        totals = []
        loop = asyncio.get_running_loop()
        for (header, payload), reducer, (lo, hi) in zip(replies, reducers, bounds, strict=True):
            try:
                await loop.run_in_executor(
                    None, lambda p=payload, a=lo, b=hi: average[a:b].copy_(self.codec.decode(p, b - a))
                )
            except CodecError as e:
                raise RoundFailed(f"reducer {reducer} sent a malformed average: {e}") from None
            excluded.update({str(k): str(v) for k, v in dict(header.get("excluded", {})).items()})
            totals.append(float(header.get("total_weight", math.nan)))
        excluded.update({peer: f"it is gone ({why})" for peer, why in state.lost.items()})
        return ReduceOutcome(average, min(totals), excluded, state.traffic)

    async def _contribute(
        self, state: _Round, index: int, reducer: str, values: torch.Tensor, weight: float
    ) -> tuple[dict[str, Any], wire.Payload]:
        """Send our part of slice ``index`` and return the reducer's (header, averaged payload)."""
        step = state.group.outer_step
        try:
            payload = await asyncio.get_running_loop().run_in_executor(None, self.codec.encode, values)
        except CodecError as e:
            if state.reduction is not None:  # our slice should not wait for a part that will never come
                state.reduction.exclude(self.peer_id, f"its own vector cannot be encoded: {e}")
            raise RoundFailed(f"cannot encode our own part of slice {index}: {e}") from None
        part = OutgoingPart(index, reducer, values, payload, float(weight))
        if self.fault is not None:
            part = self.fault(part)
        if part.delay_s > 0:
            await asyncio.sleep(part.delay_s)
        if reducer == self.peer_id:
            reduction = state.reduction
            await self._submit(reduction, self.peer_id, part.weight, part.values.numel(), part.payload)
            header, out = await asyncio.shield(reduction.result)
        else:
            try:
                header, out = await self._send(state, reducer, part, takeover=False)
            except _ReducerLost as e:
                self._mark_lost(state, reducer, str(e))
                state.settle(index, None)
                return await self._take_over(state, index, part)
            except RoundFailed:
                state.settle(index, ("failed", "no average"))
                raise
        if "error" in header:
            state.settle(index, ("failed", str(header["error"])))
            raise RoundFailed(f"round {step}: reducer {reducer} of slice {index}: {header['error']}")
        state.settle(index, (header, out))
        return header, out

    async def _send(
        self, state: _Round, reducer: str, part: OutgoingPart, *, takeover: bool
    ) -> tuple[dict[str, Any], wire.Payload]:
        step, index = state.group.outer_step, part.slice_index
        try:
            return await asyncio.wait_for(self._exchange(state, reducer, part, takeover), self._reply_timeout)
        except asyncio.TimeoutError:
            raise _ReducerLost(f"no average within {self._reply_timeout:g}s") from None
        except wire.FrameError as e:  # it answered, but not in the protocol: hostile or broken, not gone
            raise RoundFailed(f"round {step}: reducer {reducer} of slice {index} failed: {e!r}") from None
        except Exception as e:  # unreachable, reset, closed: the peer is gone
            raise _ReducerLost(f"{type(e).__name__}: {e}".strip().rstrip(":")) from None

    def _mark_lost(self, state: _Round, peer_id: str, why: str) -> None:
        """``peer_id`` will send nothing more this round: stop waiting for its parts."""
        if peer_id in state.lost:
            return
        state.lost[peer_id] = why
        for reduction in [state.reduction, *state.takeovers.values()]:
            if reduction is not None:
                reduction.exclude(peer_id, f"it is gone ({why})")

    def _backup(self, state: _Round, index: int) -> str | None:
        """The reducer that takes slice ``index`` over: the next live one in group order."""
        reducers = state.group.reducers
        for k in range(1, len(reducers)):
            candidate = reducers[(index + k) % len(reducers)]
            if candidate not in state.lost:
                return candidate
        return None

    def _takeover_reduction(self, state: _Round, index: int) -> _SliceReduction:
        if index not in state.takeovers:
            reduction = _SliceReduction(
                state.group, index, state.bounds[index], self.timeout, self.max_weight
            )
            reduction.takeover = True
            state.takeovers[index] = reduction
            for peer_id, why in state.lost.items():
                reduction.exclude(peer_id, f"it is gone ({why})")
            state.tasks.append(asyncio.create_task(self._reduce(reduction)))
        return state.takeovers[index]

    async def _take_over(
        self, state: _Round, index: int, part: OutgoingPart
    ) -> tuple[dict[str, Any], wire.Payload]:
        """Our part of slice ``index``, whose reducer is gone, goes to the next live reducer instead."""
        step, lost = state.group.outer_step, state.group.reducers[index]
        while True:
            alive = [m.peer_id for m in state.group.members if m.peer_id not in state.lost]
            backup = self._backup(state, index)
            if backup is None or len(alive) < 2:
                raise RoundFailed(
                    f"round {step}: reducer {lost} of slice {index} is gone ({state.lost[lost]}) and "
                    f"too few members are left to take it over ({', '.join(alive) or 'none'})"
                )
            logger.warning(
                f"round {step}: reducer {lost} of slice {index} is gone ({state.lost[lost]}); "
                f"{backup} takes the slice over"
            )
            if backup == self.peer_id:
                reduction = self._takeover_reduction(state, index)
                await self._submit(reduction, self.peer_id, part.weight, part.values.numel(), part.payload)
                header, out = await asyncio.shield(reduction.result)
                break
            try:
                header, out = await self._send(state, backup, part, takeover=True)
                break
            except _ReducerLost as e:
                self._mark_lost(state, backup, str(e))
        if "error" in header:
            raise RoundFailed(f"round {step}: backup reducer of slice {index}: {header['error']}")
        return header, out

    async def _exchange(
        self, state: _Round, reducer: str, part: OutgoingPart, takeover: bool = False
    ) -> tuple[dict[str, Any], wire.Payload]:
        _, reader, writer = await self._p2p.call_binary_stream_handler(
            PeerID.from_base58(reducer), self._handler
        )
        try:
            header = {
                "group_id": state.group.group_id,
                "group_digest": state.group.digest,
                "slice": part.slice_index,
                "weight": part.weight,
                "numel": part.values.numel(),
                "takeover": takeover,
            }
            await wire.send_json(writer, header, state.traffic)
            await wire.send_frame(writer, part.payload, state.traffic)
            reply = await wire.recv_json(reader, state.traffic)
            out = await wire.recv_frame(reader, self._max_payload(part.values.numel()), state.traffic)
            return reply, out
        finally:
            await wire.close(writer)

    @staticmethod
    def _max_payload(numel: int) -> int:
        return 8 * numel + (1 << 16)  # more than any codec needs; refuses absurd lengths

    # ---- reducer side ----
    async def _handle_part(
        self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sender, traffic = info.peer_id.to_base58(), wire.Traffic()
        try:
            header = await asyncio.wait_for(wire.recv_json(reader, traffic), self.timeout)
            future = self._round_future(str(header.get("group_id")))
            try:  # a part may arrive just before the leader's answer reaches us
                state = await asyncio.wait_for(asyncio.shield(future), self.timeout)
            except asyncio.TimeoutError:
                if self._rounds.get(str(header.get("group_id"))) is future and not future.done():
                    del self._rounds[str(header.get("group_id"))]
                return await wire.send_json(writer, {"error": "unknown group"}, traffic)
            state.traffic.received += traffic.received
            traffic = state.traffic  # count this stream in the round's traffic from now on
            if header.get("takeover"):
                return await self._serve_takeover(state, sender, header, reader, writer, traffic)
            reduction = state.reduction
            if reduction is None or header.get("slice") != reduction.index:
                return await wire.send_json(
                    writer, {"error": f"this peer does not reduce slice {header.get('slice')}"}, traffic
                )
            if state.group.member(sender) is None:
                return await wire.send_json(writer, {"error": "not a member of this group"}, traffic)
            if header.get("group_digest") != state.group.digest:
                reduction.exclude(sender, "it holds another member list for this group (the leader sent two)")
                return await wire.send_json(
                    writer, {"error": "member lists differ: the leader sent two"}, traffic
                )
            left = max(reduction.deadline - time.monotonic(), 0.0)
            receiving = asyncio.ensure_future(
                wire.recv_frame(reader, self._max_payload(reduction.hi - reduction.lo), traffic)
            )
            try:
                payload = await asyncio.wait_for(asyncio.shield(receiving), left)
                await self._submit(reduction, sender, header.get("weight"), header.get("numel"), payload)
            except asyncio.TimeoutError:
                reduction.exclude(
                    sender, f"its part did not arrive within allreduce_timeout={self.timeout:g}s"
                )
            except wire.FrameError as e:
                reduction.exclude(sender, str(e))
            reply, out = await asyncio.shield(reduction.result)
            if not receiving.done():
                # read the late part anyway: closing a stream with unread data resets it, and the
                # sender would lose the average we send (the same bytes as everyone's)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(receiving, _DRAIN_S)
            await wire.send_json(writer, reply, traffic)
            await wire.send_frame(writer, out, traffic)
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            logger.info(f"part stream from {sender} broke off: {e!r}")
        except asyncio.CancelledError:  # we are shutting down; the sender sees the stream close
            return
        except Exception:
            logger.exception(f"failed to serve a part from {sender}")
        finally:
            await wire.close(writer)

    async def _serve_takeover(
        self,
        state: _Round,
        sender: str,
        header: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        traffic: wire.Traffic,
    ) -> None:
        """``sender`` found the reducer of a slice gone and asks us, its backup, for that slice."""
        index, reducers = header.get("slice"), state.group.reducers
        if not isinstance(index, int) or not 0 <= index < len(reducers) or reducers[index] == self.peer_id:
            return await wire.send_json(writer, {"error": f"no slice {index!r} to take over here"}, traffic)
        if self.peer_id not in reducers or state.group.member(sender) is None:
            return await wire.send_json(writer, {"error": "not a member of this group"}, traffic)
        if header.get("group_digest") != state.group.digest:
            return await wire.send_json(
                writer, {"error": "member lists differ: the leader sent two"}, traffic
            )
        lo, hi = state.bounds[index]
        payload = await asyncio.wait_for(
            wire.recv_frame(reader, self._max_payload(hi - lo), traffic), self.timeout
        )
        # what our own exchange with that reducer gave: its average (everyone must get those same bytes)
        outcome = await asyncio.wait_for(asyncio.shield(state.outcome(index)), self._reply_timeout)
        if outcome is None:  # gone for us too: we reduce the slice from the survivors' parts
            self._mark_lost(state, reducers[index], f"{sender} and this peer found it gone")
            reduction = self._takeover_reduction(state, index)
            await self._submit(reduction, sender, header.get("weight"), header.get("numel"), payload)
            reply, out = await asyncio.shield(reduction.result)
        elif isinstance(outcome[0], dict):
            reply, out = outcome
        else:
            reply, out = {"error": f"slice {index} failed here too ({outcome[1]})"}, b""
        await wire.send_json(writer, reply, traffic)
        await wire.send_frame(writer, out, traffic)

    async def _submit(
        self, reduction: _SliceReduction, sender: str, weight: Any, numel: Any, payload: wire.Payload
    ) -> None:
        if reduction.closed or sender not in reduction.pending:
            return
        bad = reduction.check(sender, weight, numel)
        if bad is None:
            try:
                values = await asyncio.get_running_loop().run_in_executor(
                    None, self._decode_checked, payload, numel
                )
            except CodecError as e:
                bad = f"malformed part: {e}"
        if reduction.closed:
            return
        if bad is not None:
            reduction.exclude(sender, bad)
        else:
            reduction.accept(sender, float(weight), values)

    def _decode_checked(self, payload: wire.Payload, numel: int) -> torch.Tensor:
        # decode() refuses non-finite values (codec contract); should one slip through anyway, the
        # average cannot be encoded and the slice fails as a whole instead of spreading NaN
        values = self.codec.decode(payload, numel)
        if values.shape != (numel,) or values.dtype != torch.float32:
            raise CodecError(
                f"decoded part has shape {tuple(values.shape)} and {values.dtype}, not ({numel},)"
            )
        return values

    async def _reduce(self, reduction: _SliceReduction) -> None:
        try:
            await asyncio.wait_for(reduction.all_in.wait(), max(reduction.deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            late = sorted(reduction.pending)
            for peer_id in late:
                reduction.exclude(peer_id, f"sent nothing within allreduce_timeout={self.timeout:g}s")
            if reduction.takeover:
                # a silent member may hold the lost reducer's own average for this slice (or never
                # noticed it was gone): an average without it could differ from what it applies
                reduction.closed = True
                why = f"{', '.join(late)} did not take part, so its copy of the slice may differ"
                reduction.result.set_result(
                    ({"error": f"slice {reduction.index} cannot be taken over: {why}"}, b"")
                )
                return
        reduction.closed = True
        step, index = reduction.group.outer_step, reduction.index
        parts = [reduction.parts[m.peer_id] for m in reduction.group.members if m.peer_id in reduction.parts]
        if not parts:
            reduction.result.set_result(({"error": f"no valid part for slice {index} of round {step}"}, b""))
            return
        try:
            average, total = await asyncio.get_running_loop().run_in_executor(
                None, weighted_mean, parts, reduction.hi - reduction.lo
            )
            payload = await asyncio.get_running_loop().run_in_executor(None, self.codec.encode, average)
        except Exception as e:  # e.g. the weighted sum overflowed
            logger.warning(f"round {step}: cannot reduce slice {index}: {e}")
            reduction.result.set_result(({"error": f"reducer failed on slice {index}: {e}"}, b""))
            return
        header = {"total_weight": total, "included": len(parts), "excluded": dict(reduction.excluded)}
        reduction.result.set_result((header, payload))
