"""The two streamed sides of one member's exchange with a reducer, chunk by chunk: the part that
goes out (encoded once per chunk, the next while the current one is sent; the fault-injection seam
for tests) and the averaged chunks that come back (hashed in order, decoded into the output off the
event loop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import torch

from p2p_trainer.codec import Codec, CodecError
from p2p_trainer.contracts import TensorVector, VectorSink, VectorSource
from p2p_trainer.swarm.combine import empty_f32
from p2p_trainer.swarm.errors import RoundFailed
from p2p_trainer.swarm.group import Group
from p2p_trainer.swarm.messages import PartHeader, slice_digest
from p2p_trainer.swarm.takeover import SliceAnswer


@dataclass(frozen=True)
class OutgoingPart:
    """One part as it is about to leave its sender: the fault-injection seam for tests."""

    slice_index: int
    reducer: str
    source: VectorSource  # the sender's slice of the vector, read chunk by chunk as it is sent
    weight: float
    delay_s: float = 0.0  # sleep this long before sending
    # (encoded chunk, its values) -> the bytes that go on the wire instead
    corrupt: Callable[[bytes, torch.Tensor], bytes] | None = None
    outer_step: int = 0  # the round it belongs to

    @property
    def values(self) -> torch.Tensor:
        """The whole slice at once (for a fault hook; sending reads it chunk by chunk)."""
        return self.source.read(0, self.source.numel)

    def with_values(self, values: torch.Tensor) -> OutgoingPart:
        return replace(self, source=TensorVector(values))


Fault = Callable[[OutgoingPart], OutgoingPart]


class Payloads:
    """The encoded chunks of one outgoing part: each encoded once for the ``readers`` that stream
    all of them (the send, a re-check copy), the next one while the current one goes out, and
    dropped once every reader has it (a takeover's resend encodes it again: the same bytes);
    corrupted by the fault hook if there is one."""

    def __init__(
        self,
        codec: Codec,
        part: OutgoingPart,
        bounds: list[tuple[int, int]],
        readers: int = 1,
        sent: VectorSink | None = None,
    ) -> None:
        self.codec, self.part, self.bounds, self.readers = codec, part, bounds, readers
        self.sent = sent  # where to decode what we send (for error feedback), if anywhere
        self._encoded: dict[int, asyncio.Future[bytes]] = {}
        self._taken = [0] * len(bounds)

    def header(self, group: Group, index: int, *, takeover: bool = False) -> PartHeader:
        return PartHeader(
            group_id=group.group_id,
            group_digest=group.digest,
            slice=index,
            weight=self.part.weight,
            numel=self.part.source.numel,
            takeover=takeover,
        )

    def max_reply(self, c: int) -> int:
        lo, hi = self.bounds[c]
        return 8 * (hi - lo) + (1 << 16)

    def _encode(self, c: int) -> asyncio.Future[bytes]:
        if c not in self._encoded:
            lo, hi = self.bounds[c]

            def encode() -> bytes:
                values = self.part.source.read(lo, hi)  # off the event loop: it may ask other ranks
                payload = self.codec.encode(values)
                if self.sent is not None:
                    self.sent.write(lo, hi, self.codec.decode(payload, hi - lo))
                return self.part.corrupt(payload, values) if self.part.corrupt else payload

            self._encoded[c] = asyncio.get_running_loop().run_in_executor(None, encode)
        return self._encoded[c]

    def prefetch(self) -> None:
        """Start encoding the first chunk now (while the stream it goes out on opens)."""
        self._encode(0)

    async def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        for c in range(len(self.bounds)):
            payload = await self._encode(c)
            if c + 1 < len(self.bounds):
                self._encode(c + 1)  # encode the next chunk while this one goes out
            self._taken[c] += 1
            if self._taken[c] >= self.readers:
                self._encoded.pop(c, None)
            yield c, payload


class Replies:
    """The averaged chunks of one slice as they come: kept in ``answer.chunks`` (a takeover hands
    them out, a re-check compares them), hashed in order for the seal, and decoded straight into
    the output, in an executor thread while the next chunk is being received."""

    def __init__(
        self, codec: Codec, out: torch.Tensor | None, payloads: Payloads, answer: SliceAnswer
    ) -> None:
        # ``out`` None: the caller streams the encoded chunks later; each is only checked here
        self.codec, self.out, self.bounds, self.answer = codec, out, payloads.bounds, answer
        self._check = (
            torch.empty(0)
            if out is not None
            else empty_f32(max((hi - lo for lo, hi in self.bounds), default=0))
        )
        self._hash = slice_digest()
        for chunk in answer.chunks:
            self._hash.update(chunk)
        self.hashing = True
        # the decode running in the executor: (its future, the chunk's index, the reply)
        self._decoding: tuple[asyncio.Future[None], int, bytes | memoryview] | None = None
        # a lossless codec's reply is the bytes it decodes to: once decoded into the output, the
        # output's own bytes stand in for it (fp32: a round keeps 1x of the vector, not 2x)
        self._view = getattr(codec, "payload_view", None) if out is not None else None
        # told of each chunk held as such a view (a reducer's own slice: its reply goes too, see
        # ``SliceReduction.share``)
        self.on_share: Callable[[int, memoryview], None] | None = None

    @property
    def held(self) -> int:
        return len(self.answer.chunks)

    async def add(self, reply: bytes | memoryview) -> None:
        """The next averaged chunk; RoundFailed when the one before it does not decode."""
        await self._wait()
        c = len(self.answer.chunks)
        lo, hi = self.bounds[c]
        self.answer.chunks.append(reply)
        decoding = asyncio.get_running_loop().run_in_executor(None, self._decode, reply, lo, hi)
        self._decoding = (decoding, c, reply)

    def _decode(self, reply: bytes | memoryview, lo: int, hi: int) -> None:
        if self.hashing:
            self._hash.update(reply)  # here, in order: one decode runs at a time
        if self.out is not None:
            self.codec.decode_into(reply, self.out[lo:hi])
            return
        values = self._check[: hi - lo]
        self.codec.decode_into(reply, values)
        if not bool(torch.isfinite(values).all()):
            raise RoundFailed("a reducer sent an average with non-finite values")

    async def finish(self) -> str:
        """The hash of every chunk held, once all are decoded."""
        await self._wait()
        return self._hash.hexdigest()

    async def settle(self) -> None:
        """Wait for a decode still running (on the way out of a failed exchange: a takeover may
        write the same part of the output next)."""
        with contextlib.suppress(Exception):
            await self._wait()

    async def _wait(self) -> None:
        pending, self._decoding = self._decoding, None
        if pending is not None:
            decoding, c, reply = pending
            try:
                await asyncio.shield(decoding)
            except CodecError as e:
                raise RoundFailed(f"a reducer sent a malformed average: {e}") from None
            self._share(c, reply)

    def _share(self, c: int, reply: bytes | memoryview) -> None:
        """Hold decoded chunk ``c`` as a view of the output where the codec allows (see ``_view``)."""
        chunks = self.answer.chunks
        if self._view is not None and c < len(chunks) and chunks[c] is reply:
            lo, hi = self.bounds[c]
            chunks[c] = self._view(self.out[lo:hi])
            if self.on_share is not None:
                self.on_share(c, chunks[c])
