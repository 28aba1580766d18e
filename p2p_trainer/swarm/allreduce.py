"""The butterfly all-reduce's wire protocol, inside a frozen group; bit-identical on every member.

Every member sends its encoded part of slice i to reducer i on a stream the sender opens, and reads
the averaged slice back on that same stream, so client members never need an incoming connection.
What a reducer does with the parts is ``partition.SliceReduction``; what happens when a reducer is
gone is ``takeover``. This module moves the bytes: the member side (``run``: encode, send, read the
replies, decode) and the reducer side (``_handle_part``: read a part, hand it to the reduction,
answer with the reduction's reply).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID

from p2p_trainer.codec import Codec, CodecError
from p2p_trainer.contracts import RoundResult
from p2p_trainer.swarm import wire
from p2p_trainer.swarm.errors import RoundFailed
from p2p_trainer.swarm.matchmaking import Group
from p2p_trainer.swarm.partition import Reply, SliceReduction, slice_bounds
from p2p_trainer.swarm.takeover import RoundState, backup_answer

logger = logging.getLogger(__name__)

_DRAIN_S = 5.0  # how long a reducer keeps reading a late part before it answers with the average
_KEEP_ROUNDS = 8  # rounds whose state a reducer keeps for parts that arrive late


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
        self._rounds: collections.OrderedDict[str, asyncio.Future[RoundState]] = collections.OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        if not self.client_mode:
            await self._p2p.add_binary_stream_handler(self._handler, self._handle_part)

    @property
    def _reply_timeout(self) -> float:
        return self.timeout + max(5.0, self.timeout)  # the reducer's wait, plus time to compute and send

    def _round_future(self, group_id: str) -> asyncio.Future[RoundState]:
        if group_id not in self._rounds:
            self._rounds[group_id] = asyncio.get_running_loop().create_future()
            while len(self._rounds) > _KEEP_ROUNDS:
                self._rounds.popitem(last=False)
        return self._rounds[group_id]

    def _start_reduction(self, group: Group, bounds: list[tuple[int, int]], index: int, takeover: bool):
        reduction = SliceReduction(
            group,
            index,
            bounds[index],
            codec=self.codec,
            timeout=self.timeout,
            max_weight=self.max_weight,
            takeover=takeover,
        )
        task = asyncio.create_task(reduction.reduce())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return reduction

    # ---- member side ----
    async def run(self, group: Group, vector: torch.Tensor, weight: float) -> RoundResult:
        """Average ``vector`` with the group; RoundFailed when a slice cannot be completed."""
        started = time.monotonic()
        members = [m.peer_id for m in group.members]
        if len(group.members) == 1:
            return RoundResult(
                vector.clone(), 1, float(weight), 0, 0, 0.0, 0.0, [], {}, members, group.group_id
            )
        reducers = group.reducers
        bounds = slice_bounds(group.numel, len(reducers))
        state = RoundState(group, bounds, lambda i, t: self._start_reduction(group, bounds, i, t))
        if self.peer_id in reducers:
            state.reduction = self._start_reduction(group, bounds, reducers.index(self.peer_id), False)
        future = self._round_future(group.group_id)
        if not future.done():
            future.set_result(state)
        contributions = [
            self._contribute(state, i, reducer, vector[lo:hi], weight)
            for i, (reducer, (lo, hi)) in enumerate(zip(reducers, bounds, strict=True))
        ]
        replies = await asyncio.gather(*contributions, return_exceptions=True)
        if state.reduction is not None:
            await state.reduction.result  # the others need our slice even if our own contribution failed
        state.fail_unanswered()
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
        return RoundResult(
            average=average,
            group_size=len(group.members),
            total_weight=min(totals),
            bytes_sent=state.traffic.sent,
            bytes_received=state.traffic.received,
            allreduce_s=time.monotonic() - started,
            wait_s=0.0,
            excluded=sorted(excluded),
            reasons=excluded,
            members=members,
            group_id=group.group_id,
        )

    async def _contribute(
        self, state: RoundState, index: int, reducer: str, values: torch.Tensor, weight: float
    ) -> Reply:
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
            header, out = await self._reduce_here(state.reduction, part)
        else:
            try:
                header, out = await self._send(state, reducer, part, takeover=False)
            except _ReducerLost as e:
                state.mark_lost(reducer, str(e))
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

    async def _reduce_here(self, reduction: SliceReduction, part: OutgoingPart) -> Reply:
        await reduction.submit(self.peer_id, part.weight, part.values.numel(), part.payload)
        return await asyncio.shield(reduction.result)

    async def _send(self, state: RoundState, reducer: str, part: OutgoingPart, *, takeover: bool) -> Reply:
        step, index = state.group.outer_step, part.slice_index
        try:
            return await asyncio.wait_for(self._exchange(state, reducer, part, takeover), self._reply_timeout)
        except asyncio.TimeoutError:
            raise _ReducerLost(f"no average within {self._reply_timeout:g}s") from None
        except wire.FrameError as e:  # it answered, but not in the protocol: hostile or broken, not gone
            raise RoundFailed(f"round {step}: reducer {reducer} of slice {index} failed: {e!r}") from None
        except Exception as e:  # unreachable, reset, closed: the peer is gone
            raise _ReducerLost(f"{type(e).__name__}: {e}".strip().rstrip(":")) from None

    async def _take_over(self, state: RoundState, index: int, part: OutgoingPart) -> Reply:
        """Our part of slice ``index``, whose reducer is gone, goes to the next live reducer instead."""
        step, lost = state.group.outer_step, state.group.reducers[index]
        while True:
            alive, backup = state.alive(), state.backup(index)
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
                header, out = await self._reduce_here(state.takeover_reduction(index), part)
                break
            try:
                header, out = await self._send(state, backup, part, takeover=True)
                break
            except _ReducerLost as e:
                state.mark_lost(backup, str(e))
        if "error" in header:
            raise RoundFailed(f"round {step}: backup reducer of slice {index}: {header['error']}")
        return header, out

    async def _exchange(self, state: RoundState, reducer: str, part: OutgoingPart, takeover: bool) -> Reply:
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
            state = await self._known_round(str(header.get("group_id")))
            if state is None:
                return await wire.send_json(writer, {"error": "unknown group"}, traffic)
            state.traffic.received += traffic.received
            traffic = state.traffic  # count this stream in the round's traffic from now on
            refusal = self._refusal(state, sender, header)
            if refusal is not None:
                return await wire.send_json(writer, {"error": refusal}, traffic)
            if header.get("takeover"):
                reply, out = await self._serve_takeover(state, sender, header, reader, traffic)
            else:
                reply, out = await self._serve_part(state.reduction, sender, header, reader, traffic)
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

    async def _known_round(self, group_id: str) -> RoundState | None:
        """The round of ``group_id``, waiting a little: a part may arrive just before the leader's
        answer reaches us. None when it never comes."""
        future = self._round_future(group_id)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except asyncio.TimeoutError:
            if self._rounds.get(group_id) is future and not future.done():
                del self._rounds[group_id]
            return None

    def _refusal(self, state: RoundState, sender: str, header: dict[str, Any]) -> str | None:
        """Why this stream gets no answer but an error, or None."""
        index, reducers = header.get("slice"), state.group.reducers
        if header.get("takeover"):
            if (
                not isinstance(index, int)
                or not 0 <= index < len(reducers)
                or reducers[index] == self.peer_id
            ):
                return f"no slice {index!r} to take over here"
            if self.peer_id not in reducers:
                return "not a member of this group"
        elif state.reduction is None or index != state.reduction.index:
            return f"this peer does not reduce slice {index}"
        if state.group.member(sender) is None:
            return "not a member of this group"
        if header.get("group_digest") != state.group.digest:
            if state.reduction is not None and not header.get("takeover"):
                state.reduction.exclude(
                    sender, "it holds another member list for this group (the leader sent two)"
                )
            return "member lists differ: the leader sent two"
        return None

    async def _serve_part(
        self,
        reduction: SliceReduction,
        sender: str,
        header: dict[str, Any],
        reader: asyncio.StreamReader,
        traffic: wire.Traffic,
    ) -> Reply:
        left = max(reduction.deadline - time.monotonic(), 0.0)
        receiving = asyncio.ensure_future(
            wire.recv_frame(reader, self._max_payload(reduction.numel), traffic)
        )
        try:
            payload = await asyncio.wait_for(asyncio.shield(receiving), left)
            await reduction.submit(sender, header.get("weight"), header.get("numel"), payload)
        except asyncio.TimeoutError:
            reduction.exclude(sender, f"its part did not arrive within allreduce_timeout={self.timeout:g}s")
        except wire.FrameError as e:
            reduction.exclude(sender, str(e))
        reply = await asyncio.shield(reduction.result)
        if not receiving.done():
            # read the late part anyway: closing a stream with unread data resets it, and the
            # sender would lose the average we send (the same bytes as everyone's)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(receiving, _DRAIN_S)
        return reply

    async def _serve_takeover(
        self,
        state: RoundState,
        sender: str,
        header: dict[str, Any],
        reader: asyncio.StreamReader,
        traffic: wire.Traffic,
    ) -> Reply:
        """``sender`` found the reducer of a slice gone and asks us, its backup, for that slice."""
        index = header["slice"]
        lo, hi = state.bounds[index]
        payload = await asyncio.wait_for(
            wire.recv_frame(reader, self._max_payload(hi - lo), traffic), self.timeout
        )
        # what our own exchange with that reducer gave: its average (everyone must get those same bytes)
        answer = await asyncio.wait_for(asyncio.shield(state.answer(index)), self._reply_timeout)
        reply = backup_answer(answer, index)
        if reply is not None:
            return reply
        # gone for us too: we reduce the slice from the survivors' parts
        state.mark_lost(state.group.reducers[index], f"{sender} and this peer found it gone")
        reduction = state.takeover_reduction(index)
        await reduction.submit(sender, header.get("weight"), header.get("numel"), payload)
        return await asyncio.shield(reduction.result)
