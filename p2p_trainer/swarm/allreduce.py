"""The butterfly all-reduce's wire protocol inside a frozen group, streamed chunk by chunk;
bit-identical on every member.

Every member opens one stream to the reducer of each slice, sends a ``PartHeader``, then its part of
the slice as encoded chunks, one frame each; the reducer answers on the same stream with each
averaged chunk as soon as it is reduced (while later chunks are still arriving), then a
``SliceTrailer``. So encoding, transfer, reduction and decoding overlap, and client members never
need an incoming connection. The member decodes each averaged chunk straight into its output.
What a reducer does with the parts is ``partition.SliceReduction``; what happens when a reducer is
gone is ``takeover``. Replies are tagged frames: a chunk, or a message (a trailer or a refusal).

Everything read from a peer is bounded: headers are typed messages, frames have a size cap, a peer
gets at most ``_STREAMS_PER_PEER`` concurrent streams here, parts of unknown groups wait in a small
table of their own (they can never push a running round out), and a reducer buffers at most
``partition.WINDOW`` chunks per member.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, PeerID

from p2p_trainer.codec import Codec, CodecError
from p2p_trainer.contracts import RoundResult
from p2p_trainer.swarm import wire
from p2p_trainer.swarm.errors import RoundFailed
from p2p_trainer.swarm.matchmaking import Group
from p2p_trainer.swarm.messages import PartHeader, ProtocolError, ReduceRefusal, SliceTrailer, T, dump, parse
from p2p_trainer.swarm.partition import SliceFailed, SliceReduction, chunk_bounds, slice_bounds
from p2p_trainer.swarm.takeover import RoundState, SliceAnswer, backup_plan

logger = logging.getLogger(__name__)

_DRAIN_S = 5.0  # how long a reducer keeps reading a late part before it closes the stream
_KEEP_ROUNDS = 4  # finished rounds whose state a reducer keeps for late takeover requests
_MAX_WAITING = 16  # parts of groups we have not joined (yet): at most this many wait
_STREAMS_PER_PEER = 4


@dataclass(frozen=True)
class OutgoingPart:
    """One part as it is about to leave its sender: the fault-injection seam for tests."""

    slice_index: int
    reducer: str
    values: torch.Tensor  # the sender's slice of the vector (do not modify in place)
    weight: float
    delay_s: float = 0.0  # sleep this long before sending
    # (encoded chunk, its values) -> the bytes that go on the wire instead
    corrupt: Callable[[bytes, torch.Tensor], bytes] | None = None


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
        aggregation: str = "mean",
        tau: float = 2.0,
        fault: Fault | None = None,
    ) -> None:
        self._p2p, self.peer_id, self.client_mode = p2p, peer_id, client_mode
        self._handler = f"p2p_trainer.{run_id}.part"
        self.codec, self.timeout, self.max_weight = codec, timeout, max_weight
        self.aggregation, self.tau = aggregation, tau
        self.fault = fault
        self._rounds: dict[str, RoundState] = {}  # rounds we take part in
        self._finished: collections.deque[str] = collections.deque()
        self._waiting: dict[str, asyncio.Future[RoundState]] = {}  # parts that came before their round
        self._streams: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        if not self.client_mode:
            await self._p2p.add_binary_stream_handler(self._handler, self._handle_part)

    @property
    def _reply_timeout(self) -> float:
        return self.timeout + max(5.0, self.timeout)  # the reducer's wait, plus time to compute and send

    def _reduction(
        self,
        group: Group,
        bounds: list[tuple[int, int]],
        index: int,
        *,
        takeover: bool = False,
        first_chunk: int = 0,
    ) -> SliceReduction:
        reduction = SliceReduction(
            group,
            index,
            bounds[index],
            codec=self.codec,
            timeout=self.timeout,
            max_weight=self.max_weight,
            aggregation_mode=self.aggregation,
            tau=self.tau,
            takeover=takeover,
            first_chunk=first_chunk,
        )
        self._spawn(reduction.run())
        return reduction

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- the round's table ----
    def _register(self, state: RoundState) -> None:
        group_id = state.group.group_id
        self._rounds[group_id] = state
        waiting = self._waiting.pop(group_id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(state)

    def _retire(self, group_id: str) -> None:
        self._finished.append(group_id)
        while len(self._finished) > _KEEP_ROUNDS:
            self._rounds.pop(self._finished.popleft(), None)

    async def _known_round(self, group_id: str) -> RoundState | None:
        """The round of ``group_id``, waiting a little: a part may arrive just before the leader's
        answer reaches us. None when it never comes, or too many unknown groups wait already."""
        if group_id in self._rounds:
            return self._rounds[group_id]
        future = self._waiting.get(group_id)
        if future is None:
            if len(self._waiting) >= _MAX_WAITING:
                return None
            future = self._waiting[group_id] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except asyncio.TimeoutError:
            if self._waiting.get(group_id) is future:
                del self._waiting[group_id]
            return None

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
        state = RoundState(
            group,
            bounds,
            lambda i, first: self._reduction(group, bounds, i, takeover=True, first_chunk=first),
        )
        if self.peer_id in reducers:
            state.reduction = self._reduction(group, bounds, reducers.index(self.peer_id))
        self._register(state)
        average = torch.empty(group.numel, dtype=torch.float32)
        try:
            contributions = [
                self._contribute(state, i, reducer, vector[lo:hi], weight, average[lo:hi])
                for i, (reducer, (lo, hi)) in enumerate(zip(reducers, bounds, strict=True))
            ]
            trailers = await asyncio.gather(*contributions, return_exceptions=True)
            if state.reduction is not None:  # the others need our slice even if our own part failed
                await asyncio.wait([state.reduction.trailer])
        finally:
            state.fail_unanswered()
            self._retire(group.group_id)
        for trailer in trailers:
            if isinstance(trailer, BaseException):
                raise trailer if isinstance(trailer, RoundFailed) else RoundFailed(repr(trailer))
        excluded: dict[str, str] = {}
        clipped: dict[str, float] = {}
        for trailer in trailers:
            excluded.update(trailer.excluded)
            for peer_id, scale in trailer.clipped.items():
                clipped[peer_id] = min(scale, clipped.get(peer_id, 1.0))
        excluded.update({peer: f"it is gone ({why})" for peer, why in state.lost.items()})
        return RoundResult(
            average=average,
            group_size=len(group.members),
            total_weight=min(t.total_weight for t in trailers),
            bytes_sent=state.traffic.sent,
            bytes_received=state.traffic.received,
            allreduce_s=time.monotonic() - started,
            wait_s=0.0,
            excluded=sorted(excluded),
            reasons=excluded,
            members=members,
            group_id=group.group_id,
            clipped=clipped,
        )

    async def _contribute(
        self,
        state: RoundState,
        index: int,
        reducer: str,
        values: torch.Tensor,
        weight: float,
        out: torch.Tensor,
    ) -> SliceTrailer:
        """Stream our part of slice ``index`` and decode the averaged slice into ``out``."""
        step = state.group.outer_step
        part = OutgoingPart(index, reducer, values, float(weight))
        if self.fault is not None:
            part = self.fault(part)
        if part.delay_s > 0:
            await asyncio.sleep(part.delay_s)
        payloads = _Payloads(self, part, chunk_bounds(values.numel(), state.group.chunk))
        answer = SliceAnswer()
        try:
            if reducer == self.peer_id:
                await self._reduce_here(state.reduction, payloads, out, answer)
            else:
                await self._send(state, reducer, part, payloads, out, answer, takeover=False)
        except _ReducerLost as e:
            state.mark_lost(reducer, str(e))
            answer.gone = True
            state.settle(index, answer)
            return await self._take_over(state, index, part, payloads, out)
        except (RoundFailed, SliceFailed) as e:
            answer.error = answer.error or str(e)
            state.settle(index, answer)
            if isinstance(e, RoundFailed):
                raise
            raise RoundFailed(f"round {step}: reducer {reducer} of slice {index}: {e}") from None
        except CodecError as e:
            if state.reduction is not None:  # our slice should not wait for a part that will never come
                state.reduction.exclude(self.peer_id, f"its own vector cannot be encoded: {e}")
            answer.error = f"cannot encode our own part: {e}"
            state.settle(index, answer)
            raise RoundFailed(f"cannot encode our own part of slice {index}: {e}") from None
        state.settle(index, answer)
        return answer.trailer

    async def _reduce_here(
        self, reduction: SliceReduction, payloads: _Payloads, out: torch.Tensor, answer: SliceAnswer
    ) -> None:
        """Our own part of a slice we reduce, without the network; its averaged chunks from
        ``len(answer.chunks)`` on (a takeover may already hold the lost reducer's first ones)."""
        bad = reduction.check(self.peer_id, payloads.header(reduction.group, reduction.index))
        if bad is None:
            reduction.start(self.peer_id)
            async for c, payload in payloads:
                reduction.submit(self.peer_id, c, payload)
        else:
            reduction.exclude(self.peer_id, bad)
        for c in range(len(answer.chunks), len(reduction.chunks)):
            reply = await asyncio.shield(reduction.replies[c])
            await self._decode_into(reply, payloads.bounds[c], out, answer)
        answer.trailer = await asyncio.shield(reduction.trailer)

    async def _decode_into(
        self, reply: bytes | memoryview, bounds: tuple[int, int], out: torch.Tensor, answer: SliceAnswer
    ) -> None:
        lo, hi = bounds
        reply = bytes(reply)
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: out[lo:hi].copy_(self.codec.decode(reply, hi - lo))
            )
        except CodecError as e:
            raise RoundFailed(f"a reducer sent a malformed average: {e}") from None
        answer.chunks.append(reply)

    async def _send(
        self,
        state: RoundState,
        reducer: str,
        part: OutgoingPart,
        payloads: _Payloads,
        out: torch.Tensor,
        answer: SliceAnswer,
        *,
        takeover: bool,
    ) -> None:
        step, index = state.group.outer_step, part.slice_index
        try:
            await asyncio.wait_for(
                self._exchange(state, reducer, payloads, out, answer, takeover), self._reply_timeout
            )
        except asyncio.TimeoutError:
            raise _ReducerLost(f"no average within {self._reply_timeout:g}s") from None
        except wire.FrameError as e:  # it answered, but not in the protocol: hostile or broken, not gone
            raise RoundFailed(f"round {step}: reducer {reducer} of slice {index} failed: {e}") from None
        except (RoundFailed, SliceFailed, CodecError):
            raise
        except Exception as e:  # unreachable, reset, closed: the peer is gone
            raise _ReducerLost(f"{type(e).__name__}: {e}".strip().rstrip(":")) from None

    async def _exchange(
        self,
        state: RoundState,
        reducer: str,
        payloads: _Payloads,
        out: torch.Tensor,
        answer: SliceAnswer,
        takeover: bool,
    ) -> None:
        _, reader, writer = await self._p2p.call_binary_stream_handler(
            PeerID.from_base58(reducer), self._handler
        )
        sending = None
        try:
            header = payloads.header(state.group, payloads.part.slice_index, takeover=takeover)
            await wire.send_message(writer, header, state.traffic)
            sending = asyncio.ensure_future(self._send_chunks(writer, payloads, state.traffic))
            answer.chunks.clear()  # a takeover replaces whatever the lost reducer sent
            for c, bounds in enumerate(payloads.bounds):
                tag, body = await wire.recv_tagged(reader, payloads.max_reply(c), state.traffic)
                if tag == wire.TAG_MESSAGE:
                    refusal = _parse_reply(body, ReduceRefusal)
                    answer.error = refusal.error
                    raise RoundFailed(f"round {state.group.outer_step}: reducer {reducer}: {refusal.error}")
                if tag != wire.TAG_CHUNK:
                    raise wire.FrameError(f"unknown frame tag {tag!r}")
                await self._decode_into(body, bounds, out, answer)
            tag, body = await wire.recv_tagged(reader, wire.MAX_HEADER_BYTES, state.traffic)
            if tag != wire.TAG_MESSAGE:
                raise wire.FrameError("a chunk after the last one")
            answer.trailer = _parse_reply(body, SliceTrailer)
        finally:
            if sending is not None and not sending.done():
                sending.cancel()
            await wire.close(writer)

    async def _send_chunks(
        self, writer: asyncio.StreamWriter, payloads: _Payloads, traffic: wire.Traffic
    ) -> None:
        async for _, payload in payloads:
            await wire.send_frame(writer, payload, traffic)

    async def _take_over(
        self, state: RoundState, index: int, part: OutgoingPart, payloads: _Payloads, out: torch.Tensor
    ) -> SliceTrailer:
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
            answer = SliceAnswer()
            try:
                if backup == self.peer_id:
                    await self._reduce_takeover_here(state, index, payloads, out, answer)
                else:
                    await self._send(state, backup, part, payloads, out, answer, takeover=True)
                return answer.trailer
            except _ReducerLost as e:
                state.mark_lost(backup, str(e))
            except SliceFailed as e:
                raise RoundFailed(f"round {step}: backup reducer of slice {index}: {e}") from None

    async def _reduce_takeover_here(
        self, state: RoundState, index: int, payloads: _Payloads, out: torch.Tensor, answer: SliceAnswer
    ) -> None:
        """We are the backup of lost slice ``index``: what we hold of it, the rest reduced afresh."""
        mine = await asyncio.shield(state.answer(index))
        known, error = backup_plan(mine, index)
        if error:
            raise RoundFailed(f"round {state.group.outer_step}: backup reducer of slice {index}: {error}")
        for c, reply in enumerate(known):
            await self._decode_into(reply, payloads.bounds[c], out, answer)
        if mine.complete:
            answer.trailer = mine.trailer
        else:
            await self._reduce_here(state.takeover_reduction(index, len(known)), payloads, out, answer)

    # ---- reducer side ----
    async def _handle_part(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender, traffic = info.peer_id.to_base58(), wire.Traffic()
        if self._streams[sender] >= _STREAMS_PER_PEER:
            logger.warning(
                f"refusing a part stream from {sender}: it has {self._streams[sender]} open already"
            )
            return await wire.close(writer)
        self._streams[sender] += 1
        try:
            header = await asyncio.wait_for(wire.recv_message(reader, (PartHeader,), traffic), self.timeout)
            state = await self._known_round(header.group_id)
            if state is None:
                return await self._refuse(writer, "unknown group", traffic)
            state.traffic.received += traffic.received
            traffic = state.traffic  # count this stream in the round's traffic from now on
            refusal = self._refusal(state, sender, header)
            if refusal is not None:
                return await self._refuse(writer, refusal, traffic)
            if header.takeover:
                await self._serve_takeover(state, sender, header, reader, writer, traffic)
            else:
                await self._serve(state.reduction, sender, header, reader, writer, traffic)
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            logger.info(f"part stream from {sender} broke off: {e!r}")
        except asyncio.CancelledError:  # we are shutting down; the sender sees the stream close
            return
        except Exception:
            logger.exception(f"failed to serve a part from {sender}")
        finally:
            self._streams[sender] -= 1
            if not self._streams[sender]:
                del self._streams[sender]
            await wire.close(writer)

    async def _refuse(self, writer: asyncio.StreamWriter, why: str, traffic: wire.Traffic) -> None:
        await wire.send_tagged(writer, wire.TAG_MESSAGE, dump(ReduceRefusal(error=why[:500])), traffic)

    def _refusal(self, state: RoundState, sender: str, header: PartHeader) -> str | None:
        """Why this stream gets no answer but an error, or None."""
        index, reducers = header.slice, state.group.reducers
        if state.group.member(sender) is None:
            return "not a member of this group"
        if header.takeover:
            if not 0 <= index < len(reducers) or reducers[index] == self.peer_id:
                return f"no slice {index} to take over here"
            if self.peer_id not in reducers:
                return "not a member of this group"
        elif state.reduction is None or index != state.reduction.index:
            return f"this peer does not reduce slice {index}"
        if header.group_digest != state.group.digest:
            if state.reduction is not None and not header.takeover:
                state.reduction.exclude(
                    sender, "it holds another member list for this group (the leader sent two)"
                )
            return "member lists differ: the leader sent two"
        return None

    async def _serve(
        self,
        reduction: SliceReduction,
        sender: str,
        header: PartHeader,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        traffic: wire.Traffic,
        known: list[bytes] = (),
        known_trailer: SliceTrailer | None = None,
    ) -> None:
        """Read ``sender``'s chunks into ``reduction`` while answering with each averaged chunk (the
        ``known`` ones as they are)."""
        bad = reduction.check(sender, header)
        if bad is not None:
            reduction.exclude(sender, bad)
            return await self._refuse(writer, bad, traffic)
        reduction.start(sender)
        receiving = asyncio.ensure_future(self._receive_chunks(reduction, sender, reader, traffic))
        try:
            for c in range(len(reduction.chunks)):
                reply = known[c] if c < len(known) else await asyncio.shield(reduction.replies[c])
                await wire.send_tagged(writer, wire.TAG_CHUNK, reply, traffic)
            trailer = known_trailer or await asyncio.shield(reduction.trailer)
            await wire.send_tagged(writer, wire.TAG_MESSAGE, dump(trailer), traffic)
        except SliceFailed as e:
            await self._refuse(writer, str(e), traffic)
        finally:
            if not receiving.done():
                # read a late part to its end anyway: closing a stream with unread data resets it, and
                # the sender would lose the average we sent (the same bytes as everyone's)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(receiving, _DRAIN_S)
                receiving.cancel()

    async def _receive_chunks(
        self, reduction: SliceReduction, sender: str, reader: asyncio.StreamReader, traffic: wire.Traffic
    ) -> None:
        try:
            for c in range(len(reduction.chunks)):
                await reduction.may_read(c)
                left = max(reduction.deadline - time.monotonic(), 0.0)
                payload = await asyncio.wait_for(
                    wire.recv_frame(reader, reduction.max_payload(c), traffic), left
                )
                reduction.submit(sender, c, payload)
        except asyncio.TimeoutError:
            reduction.exclude(sender, f"its part did not arrive within allreduce_timeout={self.timeout:g}s")
            # keep reading (and dropping) what is still coming: see _serve
            with contextlib.suppress(Exception):
                while True:
                    await wire.recv_frame(reader, 1 << 28, traffic)
        except wire.FrameError as e:
            reduction.exclude(sender, str(e))
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            reduction.exclude(sender, f"its stream broke off ({type(e).__name__})")

    async def _serve_takeover(
        self,
        state: RoundState,
        sender: str,
        header: PartHeader,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        traffic: wire.Traffic,
    ) -> None:
        """``sender`` found the reducer of a slice gone and asks us, its backup, for that slice."""
        index = header.slice
        # what our own exchange with that reducer gave (everyone must get those same bytes)
        answer = await asyncio.wait_for(asyncio.shield(state.answer(index)), self._reply_timeout)
        known, error = backup_plan(answer, index)
        if error:
            return await self._refuse(writer, error, traffic)
        if not answer.complete:  # gone for us too: the chunks we lack are reduced from the survivors' parts
            state.mark_lost(state.group.reducers[index], f"{sender} and this peer found it gone")
        reduction = state.takeover_reduction(index, len(known))
        await self._serve(reduction, sender, header, reader, writer, traffic, known, answer.trailer)


class _Payloads:
    """The encoded chunks of one outgoing part: encoded once (the next one while the current one is
    sent), kept for a takeover's resend, corrupted by the fault hook if there is one."""

    def __init__(self, reducer: AllReducer, part: OutgoingPart, bounds: list[tuple[int, int]]) -> None:
        self.codec, self.part, self.bounds = reducer.codec, part, bounds
        self._encoded: list[asyncio.Future[bytes]] = []

    def header(self, group: Group, index: int, *, takeover: bool = False) -> PartHeader:
        return PartHeader(
            group_id=group.group_id,
            group_digest=group.digest,
            slice=index,
            weight=self.part.weight,
            numel=self.part.values.numel(),
            takeover=takeover,
        )

    def max_reply(self, c: int) -> int:
        lo, hi = self.bounds[c]
        return 8 * (hi - lo) + (1 << 16)

    def _encode(self, c: int) -> asyncio.Future[bytes]:
        while len(self._encoded) <= c:
            lo, hi = self.bounds[len(self._encoded)]
            values = self.part.values[lo:hi]

            def encode(values: torch.Tensor = values) -> bytes:
                payload = self.codec.encode(values)
                return self.part.corrupt(payload, values) if self.part.corrupt else payload

            self._encoded.append(asyncio.get_running_loop().run_in_executor(None, encode))
        return self._encoded[c]

    async def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        for c in range(len(self.bounds)):
            payload = await self._encode(c)
            if c + 1 < len(self.bounds):
                self._encode(c + 1)  # encode the next chunk while this one goes out
            yield c, payload


def _parse_reply(body: memoryview, model: type[T]) -> T:
    try:
        return parse(model, bytes(body))
    except ProtocolError as e:
        raise wire.FrameError(str(e)) from None
