"""The reducer side of the all-reduce: every stream another member opens to us in a round.

``part``: a member's part of the slice we reduce (or, as a backup, of a lost reducer's slice),
answered chunk by chunk with the averages; ``check``: a copy of a member's part for a slice we
re-check (see ``verify``), not answered; ``commit``: a member's seals and findings, answered with
everything we hold for that group once everyone posted. Everything read is bounded: typed headers,
capped frames, at most ``_STREAMS_PER_PEER`` concurrent streams per peer, and parts of unknown
groups wait in a small table of their own, so they never push a running round out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

from hivemind.p2p import P2P

from p2p_trainer.swarm import deadlines, wire
from p2p_trainer.swarm.messages import CommitPost, PartHeader, ReduceRefusal, SliceTrailer, dump, slice_digest
from p2p_trainer.swarm.partition import SliceFailed, SliceReduction
from p2p_trainer.swarm.takeover import RoundState, backup_plan
from p2p_trainer.swarm.verify import CheckBuffer

logger = logging.getLogger(__name__)

_DRAIN_S = 5.0  # how long a reducer keeps reading a late part before it closes the stream
_KEEP_ROUNDS = 4  # finished rounds whose state a reducer keeps for late takeover requests
_MAX_WAITING = 16  # groups we have not joined (yet) that streams may wait for
_STREAMS_PER_PEER = 4


# (member, chunk index, averaged chunk) -> the bytes that go to that member instead: the test seam for
# a reducer that lies (the same wrong bytes to all, or different bytes to different members)
ReducerFault = Callable[[str, int, bytes], bytes]


class ReducerService:
    def __init__(
        self,
        p2p: P2P,
        run_id: str,
        *,
        timeout: float,
        commit_timeout: float,
        seal: Callable[[str, int, str], str],
        admitted: Callable[[str], bool] = lambda peer_id: True,
    ) -> None:
        self._p2p, self.timeout, self.commit_timeout, self._seal = p2p, timeout, commit_timeout, seal
        # how long a member waits for a reducer's answer before calling it gone: set for each round from
        # what recent rounds took (``deadlines.reply_timeout``), never above this ceiling
        self.reply_timeout = deadlines.reply_ceiling(timeout)
        self._admitted = admitted
        self.fault: ReducerFault | None = None
        self.part_handler, self.commit_handler = f"p2p_trainer.{run_id}.part", f"p2p_trainer.{run_id}.commit"
        self.peer_id = ""
        self._rounds: dict[str, RoundState] = {}  # rounds we take part in
        self._finished: collections.deque[str] = collections.deque()
        self._waiting: dict[str, asyncio.Future[RoundState]] = {}  # streams that came before their round
        self._streams: collections.Counter[str] = collections.Counter()
        self._lingering = 0  # streams answered in full, whose member has not closed its end yet
        self._settled = asyncio.Event()

    async def start(self, peer_id: str) -> None:
        self.peer_id = peer_id
        await self._p2p.add_binary_stream_handler(self.part_handler, self._guarded(self._handle_part))
        await self._p2p.add_binary_stream_handler(self.commit_handler, self._guarded(self._handle_commit))

    async def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until every member we answered has read our answer: a peer
        that leaves right after its round may still have replies on their way to slower members."""
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(timeout):
                while self._lingering:
                    self._settled.clear()
                    await self._settled.wait()

    # ---- the rounds' table ----
    def register(self, state: RoundState) -> None:
        group_id = state.group.group_id
        self._rounds[group_id] = state
        waiting = self._waiting.pop(group_id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(state)

    def retire(self, group_id: str) -> None:
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

    # ---- every stream ----
    def _guarded(self, handler):
        """Admission, a per-peer stream limit, and nothing a peer sends ends our process."""

        async def guarded(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sender, traffic = info.peer_id.to_base58(), wire.Traffic()
            if not self._admitted(sender):
                return await wire.close(writer)  # a private run does not talk to peers outside it
            if self._streams[sender] >= _STREAMS_PER_PEER:
                logger.warning(
                    f"refusing a stream from {sender}: it has {self._streams[sender]} open already"
                )
                return await wire.close(writer)
            self._streams[sender] += 1
            try:
                await handler(sender, reader, writer, traffic)
            except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
                logger.info(f"stream from {sender} broke off: {e!r}")
            except asyncio.CancelledError:  # we are shutting down; the sender sees the stream close
                return
            except Exception:
                logger.exception(f"failed to serve a stream from {sender}")
            finally:
                self._lingering += 1
                try:  # our last reply reaches a slow member whole
                    await wire.finish(reader, writer, self.timeout)
                finally:
                    self._lingering -= 1
                    self._settled.set()
                self._streams[sender] -= 1
                if not self._streams[sender]:
                    del self._streams[sender]

        return guarded

    async def _refuse(self, writer: asyncio.StreamWriter, why: str, traffic: wire.Traffic) -> None:
        await wire.send_tagged(writer, wire.TAG_MESSAGE, dump(ReduceRefusal(error=why[:500])), traffic)

    # ---- parts ----
    async def _handle_part(
        self, sender: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, traffic: wire.Traffic
    ) -> None:
        header = await asyncio.wait_for(wire.recv_message(reader, (PartHeader,), traffic), self.timeout)
        state = await self._known_round(header.group_id)
        if state is None:
            return await self._refuse(writer, "unknown group", traffic)
        state.traffic.received += traffic.received
        traffic = state.traffic  # count this stream in the round's traffic from now on
        refusal = self._refusal(state, sender, header)
        if refusal is not None:
            return await self._refuse(writer, refusal, traffic)
        if header.check:
            await self._serve_check(state.checks[header.slice], sender, header, reader, traffic)
            await wire.close(writer)  # the copy's sender waits for this before it closes its end
        elif header.takeover:
            await self._serve_takeover(state, sender, header, reader, writer, traffic)
        else:
            await self._serve(state.reduction, sender, header, reader, writer, traffic)

    def _refusal(self, state: RoundState, sender: str, header: PartHeader) -> str | None:
        """Why this stream gets no answer but an error, or None."""
        index, reducers = header.slice, state.group.reducers
        if state.group.member(sender) is None:
            return "not a member of this group"
        if header.check:
            if index not in state.checks:
                return f"this peer does not check slice {index}"
        elif header.takeover:
            if not 0 <= index < len(reducers) or reducers[index] == self.peer_id:
                return f"no slice {index} to take over here"
            if self.peer_id not in reducers:
                return "not a member of this group"
        elif state.reduction is None or index != state.reduction.index:
            return f"this peer does not reduce slice {index}"
        if header.group_digest != state.group.digest:
            if state.reduction is not None and not (header.takeover or header.check):
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
        reduction.add_reader()
        receiving = asyncio.ensure_future(self._receive_chunks(reduction, sender, reader, traffic))
        # what we send is the reduction's own bytes, whose hash it keeps, unless we hand out a lost
        # reducer's chunks or a fault hook changes them: only then hash it here
        sent = slice_digest() if known or self.fault is not None else None
        read = 0  # the first chunk whose reply we have not passed on
        try:
            for c in range(len(reduction.chunks)):
                reply = known[c] if c < len(known) else await reduction.reply(c)
                reply = self.deliver(sender, c, reply)
                if sent is not None:
                    sent.update(reply)
                await wire.send_tagged(writer, wire.TAG_CHUNK, reply, traffic)
                reduction.passed(c, c + 1)
                read = c + 1
            trailer = known_trailer or await asyncio.shield(reduction.trailer)
            # a lost reducer's trailer is its seal, not ours: we vouch for what we hand out
            digest = sent.hexdigest() if sent is not None else reduction.digest
            trailer = self.sealed(reduction, trailer, digest, ours=known_trailer is not None)
            await wire.send_tagged(writer, wire.TAG_MESSAGE, dump(trailer), traffic)
        except SliceFailed as e:
            await self._refuse(writer, str(e), traffic)
        finally:
            reduction.passed(read)  # a stream cut short reads no more
            if not receiving.done():
                # read a late part to its end anyway: closing a stream with unread data resets it, and
                # the sender would lose the average we sent (the same bytes as everyone's)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(receiving, _DRAIN_S)
                receiving.cancel()

    def deliver(self, member: str, chunk: int, reply: bytes) -> bytes:
        """The averaged chunk as it goes to ``member`` (only a fault hook makes it differ)."""
        return self.fault(member, chunk, bytes(reply)) if self.fault is not None else reply

    def sealed(
        self, reduction: SliceReduction, trailer: SliceTrailer, digest: str, *, ours: bool = False
    ) -> SliceTrailer:
        """The trailer for the bytes actually sent (only a fault hook makes them differ from the
        seal), sealed by us (``ours``: even when another reducer sealed the same bytes)."""
        if trailer.digest == digest and not ours:
            return trailer
        signature = self._seal(reduction.group.group_id, reduction.index, digest)
        return trailer.model_copy(update={"digest": digest, "signature": signature})

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
            reduction.exclude(sender, f"its part missed the part deadline ({reduction.timeout:.1f}s)")
            with contextlib.suppress(Exception):  # keep reading (and dropping) what is still coming
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
        answer = await asyncio.wait_for(asyncio.shield(state.answer(index)), self.reply_timeout)
        known, error = backup_plan(answer, index)
        if error:
            return await self._refuse(writer, error, traffic)
        if not answer.complete:  # gone for us too: the chunks we lack are reduced from the survivors' parts
            state.mark_lost(state.group.reducers[index], f"{sender} and this peer found it gone")
        reduction = state.takeover_reduction(index, len(known))
        await self._serve(reduction, sender, header, reader, writer, traffic, known, answer.trailer)

    async def _serve_check(
        self,
        buffer: CheckBuffer,
        sender: str,
        header: PartHeader,
        reader: asyncio.StreamReader,
        traffic: wire.Traffic,
    ) -> None:
        """A copy of ``sender``'s part of a slice we re-check: kept, not answered."""
        if buffer.check(sender, header) is not None:
            return
        async with asyncio.timeout(self.timeout):
            for c in range(len(buffer.chunks)):
                await buffer.may_read(c)
                buffer.submit(sender, c, await wire.recv_frame(reader, buffer.max_payload(c), traffic))

    # ---- commits ----
    async def _handle_commit(
        self, sender: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, traffic: wire.Traffic
    ) -> None:
        post = await asyncio.wait_for(wire.recv_message(reader, (CommitPost,), traffic), self.reply_timeout)
        state = await self._known_round(post.group_id)
        if state is None or state.pool is None or state.group.member(sender) is None:
            return
        state.pool.add(sender, post)
        await state.pool.wait(expected_commits(state), time.monotonic() + self.commit_timeout)
        await wire.send_message(writer, state.pool.reply(), traffic)


def expected_commits(state: RoundState) -> set[str]:
    """The members whose seals a witness waits for: all but those found gone or left out."""
    gone = set(state.lost) | (set(state.reduction.excluded) if state.reduction is not None else set())
    return {m.peer_id for m in state.group.members} - gone
