"""Catching a lying reducer: signed slice hashes that every member cross-checks, and random
re-checks of a reducer's arithmetic (as BTARD does). No networking here: the wire protocol moves
these messages, this module decides what they prove.

Seals. The reducer of a slice signs (run, group, slice, digest of every averaged chunk it sent, in
order) and puts the signature in its trailer; a member refuses a slice whose bytes do not hash to
the sealed value. After the data phase every member posts the seals it holds to every full member of
the group (the witnesses) and reads back every seal they hold. A seal is self-authenticating, so
a witness can withhold one but never forge one. Two different hashes for one slice mean the round
is not the same everywhere: every member that sees them keeps θ; when both carry the same reducer's
signature, that reducer equivocated, and it is banned.

Re-checks. With probability ``p`` per slice, drawn from the group id (the same draw on every
member), the slice's verifier (the next full member after its reducer) also receives every member's
part, recomputes the average of the parts the reducer says it used, and compares it with what the
reducer sent. A difference beyond rounding (``_TOLERANCE``, relative L2) becomes an accusation
signed by the verifier; every member that reads it keeps θ. So a reducer that sends one wrong result
to everyone is caught in a round with probability ``p``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from p2p_trainer.codec import Codec, CodecError
from p2p_trainer.swarm.combine import Scratch, combine
from p2p_trainer.swarm.group import Group
from p2p_trainer.swarm.messages import Accusation, CommitPost, CommitReply, PartHeader, Seal, SliceTrailer
from p2p_trainer.swarm.partition import chunk_bounds, read_ahead

_TOLERANCE = 1e-3  # relative L2 between a reducer's average and a verifier's recomputation


async def _until(changed: asyncio.Event, done: Callable[[], bool], deadline: float) -> None:
    """Until ``done()`` holds, checked each time ``changed`` is set, or until ``deadline``."""
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), left)
        except asyncio.TimeoutError:
            return


def checked_slices(group_id: str, n_slices: int, p: float) -> set[int]:
    """The slices re-checked this round: the same on every member (drawn from the group id)."""
    if n_slices < 2 or p <= 0:
        return set()
    draws = (
        int.from_bytes(hashlib.sha256(f"{group_id}|{i}".encode()).digest()[:8], "big")
        for i in range(n_slices)
    )
    return {i for i, draw in enumerate(draws) if draw < p * 2**64}


def verifier_of(group: Group, index: int) -> str:
    reducers = group.reducers
    return reducers[(index + 1) % len(reducers)]


class Signer:
    """Signs and checks seals and accusations of one run, with our key and the swarm's keys."""

    def __init__(
        self, run_id: str, private_key: RSAPrivateKey, peer_id: str, key_of: Callable[[str], bytes | None]
    ):
        self.run_id, self._key, self.peer_id, self._key_of = run_id, private_key, peer_id, key_of

    def _seal_bytes(self, group_id: str, index: int, digest: str) -> bytes:
        return f"p2p-trainer seal|{self.run_id}|{group_id}|{index}|{digest}".encode()

    def _accusation_bytes(self, group_id: str, a: Accusation) -> bytes:
        return f"p2p-trainer accusation|{self.run_id}|{group_id}|{a.slice}|{a.reducer}|{a.verifier}".encode()

    def seal(self, group_id: str, index: int, digest: str) -> str:
        return self._key.sign(self._seal_bytes(group_id, index, digest)).decode()

    def accuse(self, group_id: str, index: int, reducer: str, reason: str) -> Accusation:
        unsigned = Accusation(
            slice=index, reducer=reducer, verifier=self.peer_id, reason=reason[:500], signature=""
        )
        signature = self._key.sign(self._accusation_bytes(group_id, unsigned)).decode()
        return unsigned.model_copy(update={"signature": signature})

    def knows(self, peer_id: str) -> bool:
        """Whether we hold ``peer_id``'s signing key (a peer that just joined may not have read the
        record that carries it yet)."""
        return peer_id == self.peer_id or self._key_of(peer_id) is not None

    def _valid(self, peer_id: str, data: bytes, signature: str) -> bool:
        if peer_id == self.peer_id:
            return self._key.get_public_key().verify(data, signature.encode())
        key = self._key_of(peer_id)
        if key is None:
            return False
        try:
            return RSAPublicKey.from_bytes(key).verify(data, signature.encode())
        except ValueError:
            return False

    def valid_seal(self, group_id: str, seal: Seal) -> bool:
        return self._valid(seal.reducer, self._seal_bytes(group_id, seal.slice, seal.digest), seal.signature)

    def valid_accusation(self, group_id: str, accusation: Accusation) -> bool:
        data = self._accusation_bytes(group_id, accusation)
        return self._valid(accusation.verifier, data, accusation.signature)

    def check_trailer(
        self, group_id: str, index: int, reducer: str, trailer: SliceTrailer, digest: str
    ) -> str | None:
        """Why the trailer of slice ``index`` does not vouch for the bytes we got (``digest``), or None."""
        if trailer.digest != digest:
            return f"its averaged chunks hash to {digest[:12]}, its seal says {trailer.digest[:12]}"
        if not self.valid_seal(
            group_id, Seal(slice=index, reducer=reducer, digest=digest, signature=trailer.signature)
        ):
            return "its seal is not its signature"
        return None


class CommitPool:
    """A witness's view of one group's commit phase: the seals and accusations posted, by whom."""

    def __init__(self, group: Group, signer: Signer) -> None:
        self.group, self.signer = group, signer
        self.seals: dict[tuple[int, str, str], Seal] = {}
        self.accusations: dict[tuple[int, str, str], Accusation] = {}
        self.posted: set[str] = set()
        self._changed = asyncio.Event()

    def add(self, sender: str, post: CommitPost) -> None:
        if self.group.member(sender) is None:
            return
        self.posted.add(sender)
        n = len(self.group.reducers)
        for seal in post.seals:
            key = (seal.slice, seal.reducer, seal.digest)
            if seal.slice < n and key not in self.seals and self.signer.valid_seal(self.group.group_id, seal):
                self.seals[key] = seal
        for accusation in post.accusations:
            key = (accusation.slice, accusation.reducer, accusation.verifier)
            if key not in self.accusations and accusation.verifier == sender:
                if self.signer.valid_accusation(self.group.group_id, accusation):
                    self.accusations[key] = accusation
        self._changed.set()

    async def wait(self, expected: set[str], deadline: float) -> None:
        """Until everyone in ``expected`` posted, or the deadline."""
        await _until(self._changed, lambda: expected <= self.posted, deadline)

    def reply(self) -> CommitReply:
        return CommitReply(
            seals=list(self.seals.values())[: 4 * 256], accusations=list(self.accusations.values())
        )


def verdict(
    group: Group, signer: Signer, mine: list[Seal], replies: list[CommitReply]
) -> tuple[str, set[str]]:
    """(why the round must not be applied or "", reducers proven to equivocate)."""
    group_id = group.group_id
    hashes: dict[int, set[str]] = {}
    signed: dict[tuple[int, str], set[str]] = {}
    for seal in [*mine, *(s for r in replies for s in r.seals)]:
        if seal in mine or signer.valid_seal(group_id, seal):
            hashes.setdefault(seal.slice, set()).add(seal.digest)
            signed.setdefault((seal.slice, seal.reducer), set()).add(seal.digest)
    liars = {reducer for (_, reducer), found in signed.items() if len(found) > 1}
    accusations = [a for r in replies for a in r.accusations if signer.valid_accusation(group_id, a)]
    if liars:
        return f"reducer(s) {', '.join(sorted(liars))} sent different averages to different members", liars
    split = sorted(i for i, found in hashes.items() if len(found) > 1)
    if split:
        return f"members hold different averages of slice(s) {split} (a takeover that did not agree)", set()
    if accusations:
        a = accusations[0]
        return (
            f"verifier {a.verifier} found reducer {a.reducer}'s average of slice {a.slice} wrong: {a.reason}",
            set(),
        )
    return "", set()


class CheckBuffer:
    """A verifier's copy of every member's part of one slice, for recomputing the reducer's average.

    With ``codec`` given, each chunk is recomputed (as if every member took part, the usual case)
    in an executor thread as soon as every member's copy of it is in, so that the check overlaps
    the round instead of following it. Once the reducer's own chunk (``reply``) equals that
    recompute, the chunk is checked and its copies are dropped; and a copy is read at most
    ``window`` chunks ahead of the first chunk not compared yet (``may_read``; as many as a reducer
    reads ahead, ``partition.read_ahead``: 4 chunks of 1 MiB, 2 of 4 MiB), the rest waiting at its
    sender. So a verifier holds the chunks in flight, not every member's whole part (for fp32
    that was the whole vector once more).
    ``mismatch`` recomputes the chunks left from the parts the reducer says it used. The early
    recomputes run one at a time, in chunk order, in the round's ``Scratch`` buffer, which the slice
    we reduce ourselves uses too (never at the same time): run side by side, each took its own
    (members + 1) chunks of fp32 (20 MB at 4 members and 2^20 values), and a verifier that kept a
    buffer beside its reduction's peaked at 2.2x the vector in a 4-peer int8 round."""

    def __init__(
        self,
        group: Group,
        index: int,
        bounds: tuple[int, int],
        weights: dict[str, float],
        *,
        codec: Codec | None = None,
        mode: str = "mean",
        tau: float = 2.0,
        scratch: Scratch | None = None,
    ) -> None:
        self.group, self.index, (self.lo, self.hi), self.weights = group, index, bounds, weights
        self.chunks = chunk_bounds(self.hi - self.lo, group.chunk)
        self.payloads: dict[str, list[bytes | bytearray | None]] = {}  # None: a checked chunk's copy
        self._early = (codec, mode, tau)
        self._expected: dict[int, bytes | None] = {}  # chunk -> our encoded average (None: not computable)
        self._replied: dict[int, bytes | memoryview] = {}  # the reducer's chunks not compared yet
        self.checked: set[int] = set()  # chunks the reducer sent as every member's parts average
        self._recomputed: set[int] = set()
        self._compared: set[int] = set()
        self._ahead = 0  # the first chunk not compared yet: copies are read up to ``window`` beyond it
        self._largest = 0  # the largest copy of a chunk seen: what ``window`` is sized by
        self._changed = asyncio.Event()
        self.pending: list[asyncio.Future] = []
        self._turn = asyncio.Lock()  # one early recompute at a time (FIFO: in chunk order)
        self.scratch = scratch or Scratch()  # the round's, shared with the slices we reduce

    def check(self, sender: str, header: PartHeader) -> str | None:
        declared = self.group.member(sender)
        if declared is None or sender in self.payloads:
            return "not a member, or a second copy"
        if header.weight != declared.weight or header.numel != self.hi - self.lo:
            return "its copy does not match its join request"
        self.payloads[sender] = []
        return None

    def max_payload(self, chunk: int) -> int:
        lo, hi = self.chunks[chunk]
        return 8 * (hi - lo) + (1 << 16)

    def submit(self, sender: str, chunk: int, payload: bytes | bytearray) -> None:
        parts = self.payloads.get(sender)
        if parts is not None and len(parts) == chunk:
            parts.append(payload)
            self._largest = max(self._largest, len(payload))
            self._changed.set()
            members = self.group.members
            complete = all(len(self.payloads.get(m.peer_id, ())) > chunk for m in members)
            if self._early[0] is not None and complete:
                self.pending.append(asyncio.ensure_future(self._expect_in_turn(chunk)))

    async def settle(self, used: list[str], deadline: float) -> None:
        """Wait until the copies of the members in ``used`` are complete (copies are read behind the
        reducer's chunks, so the last ones may still be coming) or ``deadline`` passes, then for the
        recomputes under way."""

        def complete() -> bool:
            return all(len(self.payloads.get(p, ())) == len(self.chunks) for p in used)

        await _until(self._changed, complete, deadline)
        await asyncio.gather(*self.pending, return_exceptions=True)

    async def _expect_in_turn(self, c: int) -> None:
        async with self._turn:
            await asyncio.get_running_loop().run_in_executor(None, self._expect, c)
        self._recomputed.add(c)  # (with or without a result)
        self._compare(c)

    def reply(self, c: int, payload: bytes | memoryview) -> None:
        """(the event loop) The reducer's averaged chunk ``c``, as it reached us."""
        self._replied[c] = payload
        self._compare(c)
        self._changed.set()

    @property
    def window(self) -> int:
        return read_ahead(self._largest)

    async def may_read(self, c: int) -> None:
        """Wait until a copy's chunk ``c`` is within ``window`` chunks of the first not compared,
        unless that one lacks a member's copy while the reducer's chunks are ``window`` further on:
        a copy that never comes must not hold back the others (the reducer may leave its sender out,
        and the check is then made without it)."""
        while self._early[0] is not None and c >= self._ahead + self.window and not self._copy_missing():
            self._changed.clear()
            await self._changed.wait()

    def _copy_missing(self) -> bool:
        a = self._ahead
        replied = self._replied.keys() | self._compared
        if not any(r >= a + self.window for r in replied):
            return False
        return any(len(self.payloads.get(m.peer_id, ())) <= a for m in self.group.members)

    def _compare(self, c: int) -> None:
        """(the event loop) Chunk ``c`` is checked once the reducer's bytes are the average of every
        member's part as we computed it; its copies are not needed any more. That holds whatever
        the trailer later says: a member left out mid-slice took part in the chunks before."""
        if c not in self._replied or c not in self._recomputed:
            return
        reply, ours = self._replied.pop(c), self._expected.get(c)
        self._compared.add(c)
        while self._ahead in self._compared:
            self._ahead += 1
        self._changed.set()
        if ours is not None and ours == reply:
            self.checked.add(c)
            del self._expected[c]
            for parts in self.payloads.values():
                parts[c] = None

    def _expect(self, c: int) -> None:
        """(an executor thread) Chunk ``c``'s average of every member's part, encoded."""
        codec, mode, tau = self._early
        lo, hi = self.chunks[c]
        members = [m.peer_id for m in self.group.members]
        parts = [(p, self.weights[p], self.payloads[p][c]) for p in members]
        try:
            self._expected[c] = self._recompute(codec, mode, tau, parts, hi - lo)
        except CodecError:  # e.g. an average that overflowed: ``mismatch`` finds it again and says so
            pass

    def _recompute(
        self, codec: Codec, mode: str, tau: float, parts: list[tuple[str, float, bytes | bytearray]], n: int
    ) -> bytes | None:
        """(an executor thread) The encoded average of ``parts``, combined in the round's scratch
        buffer; None when a part is refused or none is left."""
        with self.scratch.lock:
            ours = combine(codec, mode, tau, parts, n, self.scratch)
            return None if ours.refused or ours.average is None else codec.encode(ours.average)

    def mismatch(
        self, codec: Codec, mode: str, tau: float, trailer: SliceTrailer, replies: list[bytes]
    ) -> str | None:
        """(an executor thread) Why the reducer's ``replies`` are not the average of the parts it
        says it used, or None (also None when we lack one of those parts: no finding without proof)."""
        used = [m.peer_id for m in self.group.members if m.peer_id not in trailer.excluded]
        if any(len(self.payloads.get(p, ())) != len(self.chunks) for p in used) or len(replies) != len(
            self.chunks
        ):
            return None
        early = self._early == (codec, mode, tau)
        for c, (lo, hi) in enumerate(self.chunks):
            if c in self.checked:
                continue  # every member's part, averaged as we do it (see ``_compare``)
            if early and c in self._expected and (not trailer.excluded or self._expected[c] == replies[c]):
                encoded = self._expected[c]
            else:
                parts = [(p, self.weights[p], self.payloads[p][c]) for p in used]
                encoded = self._recompute(codec, mode, tau, parts, hi - lo)
            if encoded is None:
                return None  # the reducer should have left that part out: not our finding to make
            if encoded == replies[c]:
                continue  # the very bytes we compute (the same code on the same parts)
            try:
                theirs = codec.decode(replies[c], hi - lo)
            except CodecError:
                return f"chunk {c} does not decode"
            expected = codec.decode(encoded, hi - lo)
            scale = max(float(expected.norm()), 1e-30)
            error = float((theirs - expected).norm()) / scale
            if error > _TOLERANCE:
                return f"chunk {c} differs from the average of its parts by {error:.3g} (relative L2)"
        return None
