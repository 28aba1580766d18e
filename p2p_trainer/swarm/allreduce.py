"""The butterfly all-reduce's wire protocol inside a frozen group, streamed chunk by chunk;
bit-identical on every member.

Every member opens one stream to the reducer of each slice, sends a ``PartHeader``, then its part of
the slice as encoded chunks, one frame each; the reducer answers on the same stream with each
averaged chunk as soon as it is reduced (while later chunks are still arriving), then a
``SliceTrailer``. So encoding, transfer, reduction and decoding overlap, and client members never
need an incoming connection. The member decodes each averaged chunk straight into its output.
A member's stream to a remote reducer is ``exchange``; what a reducer does with the parts is
``partition.SliceReduction``; what happens when a reducer is gone is ``takeover``. Replies are
tagged frames: a chunk, or a message (a trailer or a refusal).

Everything read from a peer is bounded: headers are typed messages, frames have a size cap, a peer
gets at most ``_STREAMS_PER_PEER`` concurrent streams here, parts of unknown groups wait in a small
table of their own (they can never push a running round out), and a reducer buffers at most
``partition.WINDOW`` chunks (``WINDOW_BYTES``) per member.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

import torch
from hivemind.p2p import P2P

from p2p_trainer.codec import Codec, CodecError
from p2p_trainer.contracts import RoundResult, TensorVector, VectorSink, VectorSource, Window
from p2p_trainer.swarm import deadlines
from p2p_trainer.swarm.combine import Scratch, empty_f32
from p2p_trainer.swarm.commit import CommitPhase
from p2p_trainer.swarm.errors import RoundFailed
from p2p_trainer.swarm.exchange import Exchange, ReducerLost
from p2p_trainer.swarm.group import Group
from p2p_trainer.swarm.messages import SliceTrailer
from p2p_trainer.swarm.partition import SliceFailed, SliceReduction, chunk_bounds, part_weights, slice_bounds
from p2p_trainer.swarm.parts import Fault, OutgoingPart, Payloads, Replies
from p2p_trainer.swarm.reducer import ReducerService
from p2p_trainer.swarm.takeover import RoundState, SliceAnswer, backup_plan
from p2p_trainer.swarm.verify import CheckBuffer, CommitPool, Signer, checked_slices, verifier_of

logger = logging.getLogger(__name__)


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
        signer: Signer,
        aggregation: str = "mean",
        tau: float = 2.0,
        recheck: float = 0.0,
        ban: Callable[[str, str], None] | None = None,
        admitted: Callable[[str], bool] = lambda peer_id: True,
        fault: Fault | None = None,
        wait_for_slower: float = 2.0,
        deadline_floor: float = 2.0,
        read_keys: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._p2p, self.peer_id, self.client_mode = p2p, peer_id, client_mode
        self._read_keys = read_keys  # a fresh read of the records, which carry the peers' signing keys
        self.codec, self.timeout, self.max_weight = codec, timeout, max_weight
        self.signer, self.aggregation, self.tau, self.recheck = signer, aggregation, tau, recheck
        self._ban = ban or (lambda peer_id, why: None)
        self.fault = fault
        self.commit_timeout = min(timeout, 10.0)
        # what recent rounds took, for each round's deadlines (see ``deadlines``); ``timeout``: the ceiling
        policy = deadlines.Policy(deadline_floor, timeout, wait_for_slower)
        self.part_delays = deadlines.Recent(policy)  # when the typical member's part reached our slice
        self.answer_delays = deadlines.Recent(policy)  # when the last answer of our round came
        self.service = ReducerService(
            p2p,
            run_id,
            timeout=timeout,
            commit_timeout=self.commit_timeout,
            seal=signer.seal,
            admitted=admitted,
        )
        self.commit = CommitPhase(
            p2p,
            self.service,
            signer,
            peer_id=peer_id,
            commit_timeout=self.commit_timeout,
            check=(codec, aggregation, tau),
            ban=self._ban,
            read_keys=read_keys,
        )
        self.exchange = Exchange(p2p, peer_id, self.service, self.commit, signer, codec, timeout)
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        if not self.client_mode:  # a client accepts no incoming streams: it reduces and witnesses nothing
            await self.service.start(self.peer_id)

    def _reduction(
        self,
        group: Group,
        bounds: list[tuple[int, int]],
        index: int,
        timeout: float,
        *,
        takeover: bool = False,
        first_chunk: int = 0,
        scratch: Scratch | None = None,
    ) -> SliceReduction:
        reduction = SliceReduction(
            group,
            index,
            bounds[index],
            codec=self.codec,
            timeout=timeout,
            max_weight=self.max_weight,
            aggregation_mode=self.aggregation,
            tau=self.tau,
            takeover=takeover,
            first_chunk=first_chunk,
            seal=self.signer.seal,
            scratch=scratch,
        )
        self._spawn(reduction.run())
        return reduction

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _new_round(self, group: Group) -> RoundState:
        reducers = group.reducers
        bounds = slice_bounds(group.numel, len(reducers))
        scratch = Scratch()  # one buffer for every slice we reduce or re-check this round (see Scratch)
        # a takeover waits up to the ceiling: members find a reducer gone at different times
        takeover = functools.partial(
            self._reduction, group, bounds, timeout=self.timeout, takeover=True, scratch=scratch
        )
        state = RoundState(group, bounds, lambda i, first: takeover(i, first_chunk=first))
        part_deadline = self.part_delays.wait()
        self.service.reply_timeout = deadlines.reply_timeout(self.answer_delays, reducers)
        logger.info(
            f"round {group.outer_step}: part deadline {part_deadline:.1f}s, reply timeout "
            f"{self.service.reply_timeout:.1f}s (from {self.part_delays.rounds} and "
            f"{self.answer_delays.rounds} recent rounds; allreduce_timeout={self.timeout:g}s is the ceiling)"
        )
        if self.peer_id in reducers:
            state.reduction = self._reduction(
                group, bounds, reducers.index(self.peer_id), part_deadline, scratch=scratch
            )
            deadlines.learn_arrivals(self.part_delays, state.reduction, self.peer_id)
            state.pool = CommitPool(group, self.signer)
        deadlines.learn_answers(self.answer_delays, state)
        weights = part_weights(group, self.aggregation)
        for index in checked_slices(group.group_id, len(reducers), self.recheck):
            if verifier_of(group, index) == self.peer_id:
                early = dict(codec=self.codec, mode=self.aggregation, tau=self.tau)  # see CheckBuffer
                state.checks[index] = CheckBuffer(
                    group, index, bounds[index], weights, **early, scratch=scratch
                )
        return state

    # ---- member side ----
    async def run(
        self,
        group: Group,
        vector: torch.Tensor | VectorSource,
        weight: float,
        *,
        sent: VectorSink | None = None,
        keep_average: bool = True,
        out: torch.Tensor | None = None,
    ) -> RoundResult:
        """Average ``vector`` (read chunk by chunk) with the group; RoundFailed when a slice cannot be
        completed, or when the commit phase shows that the members do not all hold the same average
        (see ``verify``). ``sent``: where what our parts decode to goes (for error feedback).
        ``keep_average``: decode the average into one tensor (``out`` when given, else a new one);
        else the result keeps the reducers' encoded chunks (``encoded``), each checked to decode,
        for the caller to stream."""
        started = time.monotonic()
        source = vector if not isinstance(vector, torch.Tensor) else TensorVector(vector)
        members = [m.peer_id for m in group.members]
        if len(group.members) == 1:
            whole = None
            if keep_average or sent is not None:
                own = source.read(0, source.numel)
                whole = out.copy_(own) if out is not None and keep_average else own.clone()
            if sent is not None:
                sent.write(0, source.numel, whole)
            return RoundResult(
                whole if keep_average else None, 1, float(weight), 0, 0, 0.0, 0.0, [], {}, members,
                group.group_id,
            )  # fmt: skip
        state = self._new_round(group)
        self.service.register(state)
        average = (out if out is not None else empty_f32(group.numel)) if keep_average else None
        try:
            contributions = [
                self._contribute(
                    state,
                    i,
                    reducer,
                    Window(source, lo, hi),
                    weight,
                    None if average is None else average[lo:hi],
                    None if sent is None else Window(sent, lo, hi),
                )
                for i, (reducer, (lo, hi)) in enumerate(zip(group.reducers, state.bounds, strict=True))
            ]
            trailers = await asyncio.gather(*contributions, return_exceptions=True)
            if state.reduction is not None:  # the others need our slice even if our own part failed
                await asyncio.wait([state.reduction.trailer])
            state.fail_unanswered()
            failure = next((t for t in trailers if isinstance(t, BaseException)), None)
            await self.commit.run(state, failure)
        finally:
            state.fail_unanswered()
            if state.reduction is not None:
                state.reduction.release()
            self.service.retire(group.group_id)
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
            encoded=None if keep_average else _encoded(state),
        )

    async def _contribute(
        self,
        state: RoundState,
        index: int,
        reducer: str,
        values: VectorSource,
        weight: float,
        out: torch.Tensor | None,
        sent: VectorSink | None = None,
    ) -> SliceTrailer:
        """Stream our part of slice ``index`` and decode the averaged slice into ``out`` (None: only
        check that it decodes), and what our part decodes to into ``sent``, if given."""
        step = state.group.outer_step
        part = OutgoingPart(index, reducer, values, float(weight), outer_step=step)
        if self.fault is not None:
            part = self.fault(part)
        if part.delay_s > 0:
            await asyncio.sleep(part.delay_s)
        checked = index in checked_slices(state.group.group_id, len(state.group.reducers), self.recheck)
        payloads = Payloads(
            self.codec, part, chunk_bounds(values.numel, state.group.chunk), 1 + checked, sent
        )
        if checked:
            self._spawn(self.exchange.send_check(state, index, payloads))
        answer = SliceAnswer(server=reducer)
        try:
            if reducer == self.peer_id:
                replies = Replies(self.codec, out, payloads, answer)
                await self._reduce_here(state.reduction, payloads, replies)
            else:
                await self.exchange.run(state, reducer, payloads, out, answer, takeover=False)
        except ReducerLost as e:
            state.mark_lost(reducer, str(e))
            answer.gone = True
            state.settle(index, answer)
            answer = await self._take_over(state, index, part, payloads, out)
            state.final[index] = answer
            return answer.trailer
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
        state.final[index] = answer
        return answer.trailer

    async def _reduce_here(self, reduction: SliceReduction, payloads: Payloads, replies: Replies) -> None:
        """Our own part of a slice we reduce, without the network; its averaged chunks from
        ``replies.held`` on (a takeover may already hold the lost reducer's first ones)."""
        reduction.add_reader()  # first: we read the averages even when our own part is left out
        bad = reduction.check(self.peer_id, payloads.header(reduction.group, reduction.index))
        feeding: asyncio.Future[None] | None = None
        if bad is None:
            reduction.start(self.peer_id)
            # our part goes in while we read the averages, as a remote member's does
            feeding = asyncio.ensure_future(self._feed(reduction, payloads))
        else:
            reduction.exclude(self.peer_id, bad)
        # the reduction hashed its bytes as it encoded them: hash them again only when we hold a lost
        # reducer's first chunks or a fault hook may change what we are handed
        replies.hashing = replies.held > 0 or self.service.fault is not None
        if not replies.hashing:  # we decode the reduction's own bytes
            replies.on_share = reduction.share
        read = replies.held  # the first chunk whose reply we have not passed on
        try:
            for c in range(replies.held, len(reduction.chunks)):
                reply = await reduction.reply(c)
                await replies.add(self.service.deliver(self.peer_id, c, reply))
                reduction.passed(c, c + 1)
                read = c + 1
            digest = await replies.finish()
            if feeding is not None:
                await feeding  # its error, if it had one (the slice went on without our part)
        finally:
            reduction.passed(read)
            if feeding is not None and not feeding.done():
                feeding.cancel()
            elif feeding is not None and not feeding.cancelled():
                feeding.exception()  # seen: when the reading failed too, its error is the one raised
            await replies.settle()
        trailer = await asyncio.shield(reduction.trailer)
        digest = digest if replies.hashing else reduction.digest
        replies.answer.trailer = self.service.sealed(reduction, trailer, digest)

    async def _feed(self, reduction: SliceReduction, payloads: Payloads) -> None:
        """Our own part into the slice we reduce, read no further ahead than the members' parts."""
        try:
            async for c, payload in payloads:
                await reduction.may_read(c)
                reduction.submit(self.peer_id, c, payload)
        except CodecError as e:
            reduction.exclude(self.peer_id, f"its own vector cannot be encoded: {e}")
            raise

    async def _take_over(
        self, state: RoundState, index: int, part: OutgoingPart, payloads: Payloads, out: torch.Tensor | None
    ) -> SliceAnswer:
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
            answer = SliceAnswer(server=backup)
            try:
                if backup == self.peer_id:
                    await self._reduce_takeover_here(state, index, payloads, out, answer)
                else:
                    await self.exchange.run(state, backup, payloads, out, answer, takeover=True)
                return answer
            except ReducerLost as e:
                state.mark_lost(backup, str(e))
            except SliceFailed as e:
                raise RoundFailed(f"round {step}: backup reducer of slice {index}: {e}") from None

    async def _reduce_takeover_here(
        self,
        state: RoundState,
        index: int,
        payloads: Payloads,
        out: torch.Tensor | None,
        answer: SliceAnswer,
    ) -> None:
        """We are the backup of lost slice ``index``: what we hold of it, the rest reduced afresh."""
        mine = await asyncio.shield(state.answer(index))
        known, error = backup_plan(mine, index)
        if error:
            raise RoundFailed(f"round {state.group.outer_step}: backup reducer of slice {index}: {error}")
        replies = Replies(self.codec, out, payloads, answer)
        try:
            for reply in known:
                await replies.add(reply)
            await replies.finish()
        finally:
            await replies.settle()
        if mine.complete:
            answer.trailer, answer.server = mine.trailer, mine.server
        else:
            await self._reduce_here(state.takeover_reduction(index, len(known)), payloads, replies)


def _encoded(state: RoundState) -> list[tuple[int, int, bytes]]:
    """Every slice's averaged chunks as the reducers sent them, with their place in the vector."""
    found = []
    for index, (lo, hi) in enumerate(state.bounds):
        chunks = state.final[index].chunks
        for (a, b), payload in zip(chunk_bounds(hi - lo, state.group.chunk), chunks, strict=True):
            found.append((lo + a, lo + b, bytes(payload)))
    return found
