"""A member's side of one slice whose reducer is another peer: one stream, our part out chunk by
chunk, the averaged chunks back as they are reduced, then the reducer's signed trailer. Also the
copy of our part that a slice's verifier asks for (see ``verify``).

The exchange sorts what goes wrong by who is to blame: a reducer that does not answer in time or
whose stream breaks is gone (``ReducerLost``: its slice is taken over), one that answers outside
the protocol or with a bad seal fails the round (``RoundFailed``).
"""

from __future__ import annotations

import asyncio
import logging

import torch
from hivemind.p2p import P2P, PeerID

from p2p_trainer.codec import Codec, CodecError
from p2p_trainer.swarm import wire
from p2p_trainer.swarm.commit import CommitPhase
from p2p_trainer.swarm.errors import RoundFailed
from p2p_trainer.swarm.messages import PartHeader, ProtocolError, ReduceRefusal, SliceTrailer, T, parse
from p2p_trainer.swarm.partition import SliceFailed
from p2p_trainer.swarm.parts import Payloads, Replies
from p2p_trainer.swarm.reducer import ReducerService
from p2p_trainer.swarm.takeover import RoundState, SliceAnswer
from p2p_trainer.swarm.verify import CheckBuffer, Signer, verifier_of

logger = logging.getLogger(__name__)


class ReducerLost(Exception):
    """The reducer of a slice is gone: its stream broke or no answer came in time."""


class Exchange:
    """Streams our parts to remote reducers and verifiers over ``p2p``."""

    def __init__(
        self,
        p2p: P2P,
        peer_id: str,
        service: ReducerService,
        commit: CommitPhase,
        signer: Signer,
        codec: Codec,
        timeout: float,
    ) -> None:
        self._p2p, self.peer_id, self.service, self.commit = p2p, peer_id, service, commit
        self.signer, self.codec, self.timeout = signer, codec, timeout

    async def run(
        self,
        state: RoundState,
        reducer: str,
        payloads: Payloads,
        out: torch.Tensor | None,
        answer: SliceAnswer,
        *,
        takeover: bool,
    ) -> None:
        """Our part of a slice to ``reducer``, its average decoded into ``out``; fills ``answer``."""
        step, index = state.group.outer_step, payloads.part.slice_index
        try:
            await asyncio.wait_for(
                self._stream(state, reducer, payloads, out, answer, takeover), self.service.reply_timeout
            )
        except asyncio.TimeoutError:
            raise ReducerLost(f"no average within {self.service.reply_timeout:g}s") from None
        except wire.FrameError as e:  # it answered, but not in the protocol: hostile or broken, not gone
            raise RoundFailed(f"round {step}: reducer {reducer} of slice {index} failed: {e}") from None
        except (RoundFailed, SliceFailed, CodecError):
            raise
        except Exception as e:  # unreachable, reset, closed: the peer is gone
            raise ReducerLost(f"{type(e).__name__}: {e}".strip().rstrip(":")) from None

    async def _stream(
        self,
        state: RoundState,
        reducer: str,
        payloads: Payloads,
        out: torch.Tensor | None,
        answer: SliceAnswer,
        takeover: bool,
    ) -> None:
        payloads.prefetch()
        _, reader, writer = await self._p2p.call_binary_stream_handler(
            PeerID.from_base58(reducer), self.service.part_handler
        )
        sending = None
        answer.chunks.clear()  # a takeover replaces whatever the lost reducer sent
        replies = Replies(self.codec, out, payloads, answer)
        check = None if takeover else state.checks.get(payloads.part.slice_index)  # we verify its reducer
        try:
            header = payloads.header(state.group, payloads.part.slice_index, takeover=takeover)
            await wire.send_message(writer, header, state.traffic)
            sending = asyncio.ensure_future(send_chunks(writer, payloads, state.traffic))
            for c in range(len(payloads.bounds)):
                tag, body = await wire.recv_tagged(reader, payloads.max_reply(c), state.traffic)
                if tag == wire.TAG_MESSAGE:
                    refusal = _parse_reply(body, ReduceRefusal)
                    answer.error = refusal.error
                    raise RoundFailed(f"round {state.group.outer_step}: reducer {reducer}: {refusal.error}")
                if tag != wire.TAG_CHUNK:
                    raise wire.FrameError(f"unknown frame tag {tag!r}")
                await replies.add(body)
                if check is not None:
                    check.reply(c, body)
            tag, body = await wire.recv_tagged(reader, wire.MAX_HEADER_BYTES, state.traffic)
            if tag != wire.TAG_MESSAGE:
                raise wire.FrameError("a chunk after the last one")
            trailer = _parse_reply(body, SliceTrailer)
            digest = await replies.finish()
            index = payloads.part.slice_index
            await self.commit.know(reducer)
            bad = self.signer.check_trailer(state.group.group_id, index, reducer, trailer, digest)
            if bad:
                answer.error = bad
                raise RoundFailed(
                    f"round {state.group.outer_step}: reducer {reducer} of slice {index}: {bad}"
                )
            answer.trailer, answer.server = trailer, reducer
        finally:
            if sending is not None and not sending.done():
                sending.cancel()
            await replies.settle()
            await wire.close(writer)

    async def send_check(self, state: RoundState, index: int, payloads: Payloads) -> None:
        """A copy of our part of slice ``index`` for its verifier (see ``verify``); best effort, and
        within ``timeout`` wherever the verifier is (its copies are read behind the reducer's chunks,
        which may never come: a reducer that stalls must not keep this copy, and our part, forever)."""
        verifier = verifier_of(state.group, index)
        header = payloads.header(state.group, index).model_copy(update={"check": True})
        try:
            async with asyncio.timeout(self.timeout):
                if verifier == self.peer_id:
                    await _copy_here(state.checks[index], verifier, header, payloads)
                else:
                    await self._copy_to(verifier, header, payloads, state.traffic)
        except Exception as e:  # the verifier is gone or slow: it will find nothing, which is no finding
            logger.info(f"round {state.group.outer_step}: copy of slice {index} for {verifier} failed: {e!r}")

    async def _copy_to(
        self, verifier: str, header: PartHeader, payloads: Payloads, traffic: wire.Traffic
    ) -> None:
        _, reader, writer = await self._p2p.call_binary_stream_handler(
            PeerID.from_base58(verifier), self.service.part_handler
        )
        try:
            await wire.send_message(writer, header, traffic)
            await send_chunks(writer, payloads, traffic)
            # our last frames may still be on their way, or lost and due again: closing now could
            # reset the stream under them (see ``wire.finish``), so the verifier closes first
            await wire.finish(reader, writer, self.timeout)
        finally:
            await wire.close(writer)


async def _copy_here(buffer: CheckBuffer, me: str, header: PartHeader, payloads: Payloads) -> None:
    """Our own copy, for a slice we re-check ourselves: read like any other (``CheckBuffer.may_read``)."""
    if buffer.check(me, header) is None:
        async for c, payload in payloads:
            await buffer.may_read(c)
            buffer.submit(me, c, payload)


async def send_chunks(writer: asyncio.StreamWriter, payloads: Payloads, traffic: wire.Traffic) -> None:
    async for _, payload in payloads:
        await wire.send_frame(writer, payload, traffic)


def _parse_reply(body: memoryview, model: type[T]) -> T:
    try:
        return parse(model, bytes(body))
    except ProtocolError as e:
        raise wire.FrameError(str(e)) from None
