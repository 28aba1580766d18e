"""Slicing the flat vector and reducing one slice, chunk by chunk: the all-reduce's bookkeeping, no
networking (one chunk's arithmetic is ``combine``'s).

The vector is cut into contiguous, near-equal slices, one per full member in group order, and each
slice into chunks of ``group.chunk`` values that stream one after another. The reducer of a slice
collects every member's part of each chunk (``SliceReduction``); as soon as a chunk is complete
(every member still in the round sent it, or the deadline passed) it is combined (``combine``,
``aggregation``) in group order, so the result never depends on arrival order, encoded once, and
its bytes go to every member while later chunks are still arriving. A member that sends something
wrong, or nothing in time, is left out of the rest of the slice, named, with the reason.

Memory: a fast member may run at most ``WINDOW`` chunks, and about ``WINDOW_BYTES`` of them (never
under 2 chunks), ahead of the slowest; beyond that its stream is not read (TCP holds it back), so a
reducer buffers that much per member whatever the codec's bytes per value.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from p2p_trainer.codec import Codec
from p2p_trainer.swarm import aggregation
from p2p_trainer.swarm.combine import ChunkOutcome, Scratch, combine
from p2p_trainer.swarm.group import Group, check_weight
from p2p_trainer.swarm.messages import PartHeader, SliceTrailer, slice_digest

logger = logging.getLogger(__name__)

WINDOW = 4  # chunks a member's stream may run ahead of the slice's slowest member
WINDOW_BYTES = 8 << 20  # ... and at most about these many bytes of them (chunks of 4 MiB: 2)


def read_ahead(largest: int) -> int:
    """Chunks a stream may be read ahead when its chunks take up to ``largest`` bytes: ``WINDOW``,
    and about ``WINDOW_BYTES`` of them, never fewer than 2 (so that reading and reducing overlap)."""
    return max(2, min(WINDOW, WINDOW_BYTES // max(largest, 1)))


def slice_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [lo, hi) slices; the first ``numel % parts`` are one longer."""
    base, extra = divmod(numel, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + base + (i < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def chunk_bounds(numel: int, chunk: int) -> list[tuple[int, int]]:
    """[lo, hi) chunks of ``chunk`` values (the last one shorter); one empty chunk for an empty slice."""
    return [(lo, min(lo + chunk, numel)) for lo in range(0, numel, chunk)] or [(0, 0)]


def part_weights(group: Group, mode: str) -> dict[str, float]:
    """Each member's weight in the average: its declared tokens (capped by ``clip``: a token count
    is only its sender's claim)."""
    declared = [m.weight for m in group.members]
    if mode != "mean":
        declared = aggregation.bounded_weights(declared)
    return dict(zip((m.peer_id for m in group.members), declared, strict=True))


class SliceFailed(Exception):
    """This slice cannot be completed (no valid part, a failed takeover, ...); the text says why."""


class SliceReduction:
    """Reducer-side state for one slice of one group."""

    def __init__(
        self,
        group: Group,
        index: int,
        bounds: tuple[int, int],
        *,
        codec: Codec,
        timeout: float,
        max_weight: float,
        aggregation_mode: str = "mean",
        tau: float = 2.0,
        takeover: bool = False,
        first_chunk: int = 0,
        seal: Callable[[str, int, str], str] | None = None,
        scratch: Scratch | None = None,
    ) -> None:
        self.group, self.index, (self.lo, self.hi) = group, index, bounds
        self.codec, self.timeout, self.max_weight = codec, timeout, max_weight
        self.aggregation, self.tau = aggregation_mode, tau
        self.seal = seal  # (group id, slice, digest of the averaged chunks) -> our signature
        # the slice of a lost reducer: every live member must take part (see ``takeover``)
        self.takeover = takeover
        # ``timeout``: this round's part deadline (see ``deadlines``); ``arrived``: when each member's
        # last chunk came, seconds after we started, what the next rounds' deadlines are learned from
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.arrived: dict[str, float] = {}
        self.chunks = chunk_bounds(self.numel, group.chunk)
        self.order = [m.peer_id for m in group.members]
        self.weights = part_weights(group, aggregation_mode)
        self.expected = set(self.order)  # members not (yet) left out
        self.streaming: set[str] = set()  # members whose part is coming in
        self.excluded: dict[str, str] = {}
        self.clipped: dict[str, float] = {}  # member -> smallest share of its deviation kept
        self.payloads: list[dict[str, bytes | bytearray]] = [{} for _ in self.chunks]
        self._largest = 0  # the largest part of a chunk seen: what the read-ahead window is sized by
        self.totals: list[float] = []
        self.done = first_chunk  # chunks reduced so far (a takeover may start where the lost reducer stopped)
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.replies: list[asyncio.Future[bytes]] = [loop.create_future() for _ in self.chunks]
        # who reads the averaged chunks (``add_reader``) and, per chunk, how many of them are done
        # with its reply: a reply every one of them has passed is dropped (see ``passed``)
        self._readers, self._passed = 0, [0] * len(self.chunks)
        self.trailer: asyncio.Future[SliceTrailer] = loop.create_future()
        self._hash = slice_digest()  # of the replies in order, updated where each is encoded
        self.scratch = scratch or Scratch()

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    # ---- who takes part ----
    def check(self, sender: str, header: PartHeader) -> str | None:
        """Why ``sender``'s part of this slice is refused before any of its bytes are read, or None."""
        declared = self.group.member(sender)
        if declared is None:
            return "not a member of this group"
        if sender in self.streaming or sender not in self.expected:
            return "a second part for the same slice" if sender in self.streaming else self.excluded[sender]
        bad = check_weight(header.weight, self.max_weight)
        if bad is None and header.weight != declared.weight:
            bad = f"weight {header.weight:g} differs from the {declared.weight:g} it declared when joining"
        if bad is None and header.numel != self.numel:
            bad = f"part of {header.numel} values, the slice has {self.numel}"
        return bad

    def start(self, sender: str) -> None:
        self.streaming.add(sender)

    # ---- its readers: who is sent the averaged chunks ----
    def add_reader(self) -> None:
        """Someone will read every averaged chunk in order (``reply``), and say when it is ``passed``."""
        self._readers += 1

    async def reply(self, c: int) -> bytes:
        """The averaged chunk ``c`` (SliceFailed when the slice failed), as bytes of its own (a
        stream's write buffer may still hold them after the round)."""
        reply = await asyncio.shield(self.replies[c])
        return bytes(reply) if isinstance(reply, memoryview) else reply

    def share(self, c: int, view: memoryview) -> None:
        """Our own output holds the averaged chunk ``c`` as decoded (a lossless codec: the same
        bytes, see ``Replies``): the reply becomes a view of it, and members slower than the
        reduction no longer make us keep a slice's worth of replies (``release`` copies what they
        still need before the round hands the output back)."""
        if not self.takeover and self._held(c) is not None:
            self._hold(c, view)

    def release(self) -> None:
        """The round is over and its output goes back to the caller: a reply still to be read by a
        member stops being a view of it."""
        for c in range(len(self.replies)):
            held = self._held(c)
            if isinstance(held, memoryview):
                self._hold(c, bytes(held))

    def passed(self, first: int, end: int | None = None) -> None:
        """A reader is done with the replies of chunks ``first`` to ``end`` (to the last, when it
        stops early). A reply every reader has passed is dropped: the members hold it (for fp32 as
        their output's own bytes), the digest already covers it, and no reader can come later (a
        remote member reads on the stream its part came on, and chunk 0 waits for every part still
        expected; we register before our own part goes in). So a reducer keeps the replies in
        flight, not its whole slice once more. A lost reducer's slice (``takeover``) keeps them: its
        members may ask for it one after another."""
        for c in range(first, len(self.chunks) if end is None else end):
            self._passed[c] += 1
            self._drop_if_passed(c)

    def _drop_if_passed(self, c: int) -> None:
        if self.takeover or not self._readers or self._passed[c] < self._readers or self._held(c) is None:
            return
        self._hold(c, SliceFailed(f"the reply of chunk {c} of slice {self.index} was dropped"))

    def _held(self, c: int) -> bytes | memoryview | None:
        """The reply of chunk ``c`` as held now; None when not reduced yet, failed or dropped."""
        future = self.replies[c]
        return future.result() if future.done() and future.exception() is None else None

    def _hold(self, c: int, reply: bytes | memoryview | SliceFailed) -> None:
        """Chunk ``c``'s reply is now ``reply`` (a SliceFailed: dropped; a reader there would be a bug)."""
        self.replies[c] = future = asyncio.get_running_loop().create_future()
        if isinstance(reply, SliceFailed):
            future.set_exception(reply)
            future.exception()  # marked retrieved: nobody is meant to wait for it
        else:
            future.set_result(reply)

    def exclude(self, peer_id: str, reason: str) -> None:
        """Leave ``peer_id`` out of every chunk not reduced yet."""
        if peer_id in self.expected:
            logger.warning(
                f"round {self.group.outer_step} slice {self.index}: leaving out {peer_id}: {reason}"
            )
            self.expected.discard(peer_id)
            self.excluded[peer_id] = reason
            for pending in self.payloads[self.done :]:
                pending.pop(peer_id, None)
            self._changed.set()

    def max_payload(self, chunk: int) -> int:
        lo, hi = self.chunks[chunk]
        return 8 * (hi - lo) + (1 << 16)  # more than any codec needs; refuses absurd lengths

    @property
    def window(self) -> int:
        """Chunks a member may run ahead of the slowest (see ``read_ahead``)."""
        return read_ahead(self._largest)

    async def may_read(self, chunk: int) -> None:
        """Wait until reading ``chunk`` of a member keeps it within ``window`` chunks of the slowest."""
        while chunk >= self.done + self.window and not self.trailer.done():
            self._changed.clear()
            await self._changed.wait()

    def submit(self, sender: str, chunk: int, payload: bytes | bytearray) -> None:
        """``sender``'s encoded part of ``chunk`` (decoded and checked when the chunk is reduced)."""
        if sender in self.expected and chunk >= self.done:
            self.payloads[chunk][sender] = payload
            self._largest = max(self._largest, len(payload))
            if chunk == len(self.chunks) - 1:
                self.arrived.setdefault(sender, time.monotonic() - self.started)
            self._changed.set()

    # ---- reducing ----
    async def run(self) -> None:
        """Reduce the chunks in order as they complete; then the trailer. Never raises: a failure
        becomes an exception on every reply still open, with the reason."""
        loop = asyncio.get_running_loop()
        try:
            for c in range(self.done, len(self.chunks)):
                await self._wait_for_chunk(c)
                parts = [
                    (p, self.weights[p], self.payloads[c][p]) for p in self.order if p in self.payloads[c]
                ]
                outcome = await loop.run_in_executor(None, self._reduce_chunk, c, parts)
                for peer_id, error in outcome.refused:
                    self.exclude(peer_id, f"malformed part: {error}")
                for peer_id, scale in outcome.clipped.items():
                    self.clipped[peer_id] = min(scale, self.clipped.get(peer_id, 1.0))
                self.totals.append(outcome.total)
                self.payloads[c] = {}
                self.done = c + 1
                self.replies[c].set_result(outcome.reply)
                self._drop_if_passed(c)  # every member stopped reading before this chunk
                self._changed.set()
            self.trailer.set_result(self._make_trailer())
        except SliceFailed as e:
            self._fail(str(e))
        except Exception as e:  # e.g. the weighted sum overflowed
            logger.warning(f"round {self.group.outer_step}: cannot reduce slice {self.index}: {e!r}")
            self._fail(f"reducer failed on slice {self.index}: {e}")

    def _fail(self, why: str) -> None:
        for future in [*self.replies, self.trailer]:
            if not future.done():
                future.set_exception(SliceFailed(why))
                future.exception()  # marked retrieved: nobody may be waiting for this one
        self._changed.set()

    async def _wait_for_chunk(self, c: int) -> None:
        while not self.expected <= self.payloads[c].keys():
            left = self.deadline - time.monotonic()
            if left <= 0:
                late = sorted(self.expected - self.payloads[c].keys())
                if self.takeover:
                    # a silent member may hold the lost reducer's own average for this slice (or never
                    # noticed it was gone): an average without it could differ from what it applies
                    why = f"{', '.join(late)} did not take part, so its copy of the slice may differ"
                    raise SliceFailed(f"slice {self.index} cannot be taken over: {why}")
                for peer_id in late:
                    self.exclude(peer_id, f"sent nothing within the part deadline of {self.timeout:.1f}s")
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        if not self.expected:
            raise SliceFailed(f"no valid part for slice {self.index} of round {self.group.outer_step}")

    def _reduce_chunk(self, c: int, parts: list[tuple[str, float, bytes | bytearray]]) -> ChunkOutcome:
        """(an executor thread, one chunk at a time) Decode, check and combine the parts of chunk
        ``c`` in group order, encode the average and add it to the slice's hash."""
        lo, hi = self.chunks[c]
        with self.scratch.lock:
            outcome = combine(self.codec, self.aggregation, self.tau, parts, hi - lo, self.scratch)
            if outcome.average is None:
                raise SliceFailed(f"no valid part for slice {self.index} of round {self.group.outer_step}")
            outcome.reply = self.codec.encode(outcome.average)
            outcome.average = None  # it lives in the scratch buffer, which the next chunk reuses
        self._hash.update(outcome.reply)
        return outcome

    def _make_trailer(self) -> SliceTrailer:
        digest = self._hash.hexdigest()
        return SliceTrailer(
            total_weight=min(self.totals, default=0.0),
            included=len(self.expected),
            excluded=dict(self.excluded),
            clipped=dict(self.clipped),
            digest=digest,
            signature=self.seal(self.group.group_id, self.index, digest) if self.seal else "",
        )

    @property
    def digest(self) -> str:
        """Hash of every averaged chunk's bytes, in order (complete once the trailer is set)."""
        return self._hash.hexdigest()
