"""The all-reduce's parts that need no network, each alone: slicing, one slice's chunked reduction
(validation, fixed summation order, deadline), and the takeover rules of a round."""

import asyncio
import threading
import time

import blake3
import numpy as np
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from p2p_trainer.codec import get_codec
from p2p_trainer.contracts import TensorVector
from p2p_trainer.swarm.allreduce import AllReducer
from p2p_trainer.swarm.combine import combine
from p2p_trainer.swarm.exchange import Exchange
from p2p_trainer.swarm.group import Group, Member
from p2p_trainer.swarm.messages import PartHeader, SliceTrailer
from p2p_trainer.swarm.partition import WINDOW, SliceReduction, chunk_bounds, slice_bounds
from p2p_trainer.swarm.parts import OutgoingPart, Payloads, Replies
from p2p_trainer.swarm.takeover import RoundState, SliceAnswer, backup_plan
from p2p_trainer.swarm.verify import CheckBuffer, Signer, verifier_of
from p2p_trainer.testing.swarm import reference_mean

pytestmark = pytest.mark.timeout(30)

CODEC = get_codec("fp32")
NUMEL = 1000


def _group(*members: tuple[str, float, bool], chunk: int = NUMEL) -> Group:
    return Group("0123456789abcdef", 3, NUMEL, chunk, tuple(Member(p, w, c) for p, w, c in members))


def _ids(n: int) -> list[str]:
    return [f"Qm{chr(ord('A') + i) * 44}" for i in range(n)]


A, B, C = _ids(3)
GROUP = _group((A, 100.0, False), (B, 300.0, False), (C, 50.0, True))
WEIGHTS = {A: 100.0, B: 300.0, C: 50.0}


def test_slices_and_chunks_cover_the_vector_in_near_equal_contiguous_parts():
    for numel, parts in [(10, 3), (7, 7), (100_003, 4), (5, 8)]:
        bounds = slice_bounds(numel, parts)
        assert bounds[0][0] == 0 and bounds[-1][1] == numel
        assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)] and chunk_bounds(0, 4) == [(0, 0)]


def _header(group: Group, weight: float, numel: int = NUMEL) -> PartHeader:
    return PartHeader(group_id=group.group_id, group_digest=group.digest, slice=0, weight=weight, numel=numel)


def _reduce(parts, *, order, group=GROUP, timeout=5.0, takeover=False, aggregation="mean", corrupt=None):
    """Stream ``parts`` (peer -> (weight, numel, values)) into slice 0 (all NUMEL values), chunk by
    chunk, members interleaved in ``order``; the trailer, the decoded average and who was excluded."""

    async def scenario():
        reduction = SliceReduction(
            group,
            0,
            (0, NUMEL),
            codec=CODEC,
            timeout=timeout,
            max_weight=1e9,
            aggregation_mode=aggregation,
            takeover=takeover,
        )
        task = asyncio.create_task(reduction.run())
        streaming = []
        for peer in order:
            weight, numel, _ = parts[peer]
            bad = reduction.check(peer, _header(group, weight, numel))
            if bad is None:
                reduction.start(peer)
                streaming.append(peer)
            else:
                reduction.exclude(peer, bad)
        for c, (lo, hi) in enumerate(reduction.chunks):  # chunk c from everyone, in arrival order
            for peer in streaming:
                payload = CODEC.encode(parts[peer][2][lo:hi])
                if corrupt and peer == corrupt[0] and c == corrupt[1]:
                    payload = payload[:-4]
                reduction.submit(peer, c, payload)
                await asyncio.sleep(0)
        await task
        if reduction.trailer.exception() is not None:
            return reduction.trailer.exception(), None, reduction.excluded
        average = torch.cat(
            [
                CODEC.decode(f.result(), hi - lo)
                for f, (lo, hi) in zip(reduction.replies, reduction.chunks, strict=True)
            ]
        )
        return reduction.trailer.result(), average, reduction.excluded

    return asyncio.run(scenario())


async def _reduced_by_two(takeover: bool = False) -> SliceReduction:
    """A 4-chunk slice reduced from A's and B's equal parts (chunk c holds lo..hi-1), both readers."""
    group = _group((A, 1.0, False), (B, 1.0, False), chunk=250)
    reduction = SliceReduction(
        group, 0, (0, NUMEL), codec=CODEC, timeout=5.0, max_weight=1e9, takeover=takeover
    )
    for peer in (A, B):
        reduction.start(peer)
        reduction.add_reader()
    task = asyncio.create_task(reduction.run())
    for c, (lo, hi) in enumerate(reduction.chunks):
        for peer in (A, B):
            reduction.submit(peer, c, CODEC.encode(torch.arange(lo, hi, dtype=torch.float32)))
    await task
    return reduction


_BY_TWO = [CODEC.encode(torch.arange(lo, lo + 250, dtype=torch.float32)) for lo in range(0, NUMEL, 250)]


def test_a_reducer_drops_each_reply_once_every_reader_passed_it():
    """The reducer's averaged chunks go once every reader has passed them (a reader cut short
    passes the rest); a lost reducer's slice keeps them for members that ask later."""

    async def scenario(takeover: bool):
        reduction = await _reduced_by_two(takeover)
        held = lambda: [f.exception() is None for f in reduction.replies]  # noqa: E731
        replies = [bytes(await reduction.reply(c)) for c in range(4)]
        for c in range(4):  # A reads every chunk
            reduction.passed(c, c + 1)
        seen = [held()]
        reduction.passed(0, 1)  # B reads chunk 0, then its stream breaks
        seen.append(held())
        reduction.passed(1)
        return replies, [*seen, held()]

    replies, seen = asyncio.run(scenario(takeover=False))
    assert replies == _BY_TWO
    assert seen == [[True] * 4, [False, True, True, True], [False] * 4]
    assert asyncio.run(scenario(takeover=True))[1] == [[True] * 4] * 3


def test_a_reducer_holds_its_replies_as_views_of_its_output_until_the_round_hands_it_back():
    """fp32: once the reducer's own output holds an averaged chunk, the reply is a view of it (no
    second copy for members still to be sent it); ``release`` copies what is left before the caller
    may overwrite the output, and members are always sent bytes of their own."""

    async def scenario():
        reduction = await _reduced_by_two()
        out = torch.empty(NUMEL)
        for c, (lo, hi) in enumerate(reduction.chunks):
            CODEC.decode_into(await reduction.reply(c), out[lo:hi])
            reduction.share(c, CODEC.payload_view(out[lo:hi]))
        held = [np.frombuffer(f.result(), np.uint8) for f in reduction.replies]
        views = [np.shares_memory(h, out.numpy()) for h in held]
        sent = [await reduction.reply(c) for c in range(4)]
        reduction.release()
        out.fill_(7.0)  # the caller's next use of its output
        return views, sent, [await reduction.reply(c) for c in range(4)]

    views, sent, after = asyncio.run(scenario())
    assert views == [True] * 4
    assert all(type(r) is bytes for r in sent + after)
    assert sent == after == _BY_TWO


def _vectors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randn(NUMEL, generator=gen) for p in (A, B, C)}


@pytest.mark.parametrize("chunk", [NUMEL, 300, 1])
def test_the_sum_follows_group_order_not_arrival_order(chunk):
    group = _group((A, 100.0, False), (B, 300.0, False), (C, 50.0, True), chunk=chunk)
    vec = _vectors()
    parts = {p: (WEIGHTS[p], NUMEL, vec[p]) for p in (A, B, C)}
    expected = reference_mean(vec, WEIGHTS, [A, B, C])
    for order in ([A, B, C], [C, B, A], [B, C, A]):
        trailer, average, excluded = _reduce(parts, order=order, group=group)
        assert torch.equal(average, expected), order
        assert trailer.total_weight == 450.0 and trailer.included == 3 and excluded == {}


@pytest.mark.parametrize(
    "bad, reason",
    [((300.0, NUMEL), "differs from the 100 it declared"), ((100.0, 999), "part of 999 values")],
)
def test_a_bad_header_is_left_out_with_its_reason(bad, reason):
    vec = _vectors(1)
    parts = {A: (*bad, vec[A]), B: (300.0, NUMEL, vec[B]), C: (50.0, NUMEL, vec[C])}
    trailer, average, excluded = _reduce(parts, order=[A, B, C])
    assert set(excluded) == {A} and reason in excluded[A], excluded
    assert torch.equal(average, reference_mean(vec, {B: 300.0, C: 50.0}, [B, C]))
    assert trailer.total_weight == 350.0


def test_a_malformed_chunk_leaves_its_sender_out_of_the_rest_of_the_slice():
    group = _group((A, 100.0, False), (B, 300.0, False), (C, 50.0, True), chunk=250)
    vec = _vectors(4)
    parts = {p: (WEIGHTS[p], NUMEL, vec[p]) for p in (A, B, C)}
    trailer, average, excluded = _reduce(parts, order=[A, B, C], group=group, corrupt=(C, 2))
    assert set(excluded) == {C} and "malformed part" in excluded[C]
    full, partial = reference_mean(vec, WEIGHTS, [A, B, C]), reference_mean(vec, {A: 100.0, B: 300.0}, [A, B])
    assert torch.equal(average[:500], full[:500]) and torch.equal(average[500:], partial[500:])
    assert trailer.total_weight == 400.0  # the smallest over the chunks


def test_a_stranger_cannot_submit_and_a_silent_member_is_left_out_at_the_deadline():
    vec = _vectors(2)
    stranger = _ids(4)[3]
    parts = {A: (100.0, NUMEL, vec[A]), B: (300.0, NUMEL, vec[B]), stranger: (1.0, NUMEL, vec[C])}
    trailer, average, excluded = _reduce(parts, order=[stranger, A, B], timeout=0.5)
    assert set(excluded) == {C} and "sent nothing within" in excluded[C]  # the stranger never counted
    assert torch.equal(average, reference_mean(vec, {A: 100.0, B: 300.0}, [A, B]))


def test_a_takeover_with_a_silent_member_fails_instead_of_guessing():
    vec = _vectors(3)
    parts = {A: (100.0, NUMEL, vec[A]), B: (300.0, NUMEL, vec[B])}
    error, average, _ = _reduce(parts, order=[A, B], timeout=0.5, takeover=True)
    assert average is None and "cannot be taken over" in str(error) and f"{C} did not take part" in str(error)


def test_robust_aggregation_is_the_exact_mean_when_nobody_strays():
    vec = _vectors(5)
    parts = {p: (100.0, NUMEL, vec[p]) for p in (A, B, C)}  # equal weights: no cap applies
    group = _group((A, 100.0, False), (B, 100.0, False), (C, 100.0, True))
    trailer, average, _ = _reduce(parts, order=[A, B, C], group=group, aggregation="clip")
    assert torch.equal(average, reference_mean(vec, {A: 100.0, B: 100.0, C: 100.0}, [A, B, C]))
    assert trailer.clipped == {}


def test_robust_aggregation_bounds_a_huge_part_and_a_huge_weight():
    vec = _vectors(6)
    honest = reference_mean(vec, {A: 100.0, B: 100.0}, [A, B])
    attacked = {A: (100.0, NUMEL, vec[A]), B: (100.0, NUMEL, vec[B]), C: (100.0, NUMEL, vec[C] * -1e6)}
    group = _group((A, 100.0, False), (B, 100.0, False), (C, 1e8, True))
    parts = {**attacked, C: (1e8, NUMEL, vec[C] * -1e6)}
    for agg in ("mean", "clip"):
        trailer, average, _ = _reduce(parts, order=[A, B, C], group=group, aggregation=agg)
        err = float((average - honest).norm() / honest.norm())
        if agg == "mean":
            assert err > 1e5  # the plain mean is wherever the liar wants it
        else:
            # the liar's weight counts 2x the median (200 of 400) and its part only up to the clip radius
            assert err < 3.0 and C in trailer.clipped and trailer.total_weight == 400.0


def test_takeover_rules():
    D = _ids(4)[3]
    group = _group((A, 1.0, False), (B, 1.0, False), (D, 1.0, False), (C, 1.0, True))

    async def scenario():
        made = []

        def make(index, first):
            made.append((index, first))
            return SliceReduction(
                group,
                index,
                (0, 10),
                codec=CODEC,
                timeout=5.0,
                max_weight=1e9,
                takeover=True,
                first_chunk=first,
            )

        state = RoundState(group, slice_bounds(30, 3), make)
        state.reduction = SliceReduction(
            group, 2, (0, 10), codec=CODEC, timeout=5.0, max_weight=1e9
        )  # we are D
        assert state.backup(0) == B and state.backup(2) == A
        state.mark_lost(B, "reset")
        assert state.backup(0) == D and state.alive() == [A, D, C]
        assert state.reduction.excluded == {B: "it is gone (reset)"}
        takeover = state.takeover_reduction(1, 0)
        assert takeover is state.takeover_reduction(1, 0) and made == [(1, 0)]
        assert B in takeover.excluded  # a lost member is never waited for
        state.mark_lost(A, "timeout")
        assert state.backup(1) == D and state.backup(2) is None
        state.settle(0, SliceAnswer(gone=True))
        state.settle(0, SliceAnswer(chunks=[b"x"]))  # the first answer stands
        assert state.answer(0).result().gone
        state.fail_unanswered()
        assert state.answer(1).result().error

    asyncio.run(scenario())
    assert backup_plan(SliceAnswer(chunks=[b"a", b"b"], gone=True), 3) == ([b"a", b"b"], "")
    assert "failed here too" in backup_plan(SliceAnswer(error="boom"), 3)[1]


def test_the_read_ahead_window_is_bounded_in_bytes_not_only_in_chunks():
    """A member may run ``WINDOW`` chunks ahead of the slowest, but chunks of 4 MiB only 2."""

    async def window_after(payload_bytes: int) -> int:
        group = _group((A, 100.0, False), (B, 300.0, False), chunk=100)
        reduction = SliceReduction(group, 0, (0, NUMEL), codec=CODEC, timeout=5.0, max_weight=1e9)
        before = reduction.window
        reduction.start(A)
        reduction.submit(A, 0, b"\0" * payload_bytes)  # kept unread: B has not sent chunk 0
        ahead = asyncio.ensure_future(reduction.may_read(reduction.window))
        await asyncio.sleep(0.05)
        assert before == WINDOW and not ahead.done()  # beyond the window: A's stream is not read
        ahead.cancel()
        return reduction.window

    assert asyncio.run(window_after(1 << 20)) == WINDOW  # int8's 1 MiB chunks
    assert asyncio.run(window_after(4 << 20)) == 2  # 4 MiB chunks (fp32 at 2^20 values)
    assert asyncio.run(window_after(64 << 20)) == 2  # never below 2: reading and reducing overlap


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_a_member_keeps_an_fp32_average_once_not_twice(name):
    """The averaged chunks a member keeps (for takeovers, re-checks, the seal) are the output's own
    bytes for the lossless codec, and the replies as they came for a lossy one; the same bytes."""
    codec = get_codec(name)
    bounds = chunk_bounds(NUMEL, 300)
    replies = [codec.encode(torch.randn(hi - lo)) for lo, hi in bounds]
    out = torch.zeros(NUMEL)
    answer = SliceAnswer()

    async def receive() -> str:
        part = OutgoingPart(0, A, TensorVector(torch.zeros(NUMEL)), 1.0)
        held = Replies(codec, out, Payloads(codec, part, bounds), answer)
        for reply in replies:
            await held.add(bytes(reply))
        return await held.finish()

    digest = asyncio.run(receive())
    assert digest == blake3.blake3(b"".join(replies)).hexdigest()
    assert [bytes(c) for c in answer.chunks] == replies
    shared = [np.shares_memory(np.frombuffer(c, np.uint8), out.numpy()) for c in answer.chunks]
    assert shared == [name == "fp32"] * len(bounds)
    for (lo, hi), reply in zip(bounds, replies, strict=True):
        assert torch.equal(out[lo:hi], codec.decode(reply, hi - lo))


class _Concurrency:
    """An fp32 codec that counts how many of its decodes run at once (a verifier's recomputes)."""

    name = "fp32"

    def __init__(self) -> None:
        self._lock, self.running, self.most, self.calls = threading.Lock(), 0, 0, 0

    def __getattr__(self, attr):
        return getattr(CODEC, attr)

    def decode_accumulate(self, payload, out, weight):
        with self._lock:
            self.running += 1
            self.most, self.calls = max(self.most, self.running), self.calls + 1
        time.sleep(0.01)  # long enough for recomputes run side by side to overlap
        CODEC.decode_accumulate(payload, out, weight)
        with self._lock:
            self.running -= 1


def test_a_verifier_recomputes_its_chunks_one_at_a_time_into_the_same_bytes():
    """A re-checked slice's chunks are recomputed as their copies arrive, but never side by side:
    each recompute takes (members + 1) chunks of fp32, which next to each other had added 1.4x the
    vector to a 4-peer round's peak. The results are the reducer's own bytes, chunk by chunk."""
    codec = _Concurrency()
    group = _group((A, 100.0, False), (B, 300.0, False), (C, 50.0, True), chunk=100)
    gen = torch.Generator().manual_seed(3)
    parts = {p: torch.randn(NUMEL, generator=gen) for p in (A, B, C)}
    bounds = chunk_bounds(NUMEL, 100)

    async def scenario() -> CheckBuffer:
        buffer = CheckBuffer(group, 0, (0, NUMEL), WEIGHTS, codec=codec, mode="mean")
        for p in (A, B, C):
            assert buffer.check(p, _header(group, WEIGHTS[p])) is None
        for c, (lo, hi) in enumerate(bounds):  # every chunk complete at once: all may start now
            for p in (A, B, C):
                buffer.submit(p, c, CODEC.encode(parts[p][lo:hi]))
        await asyncio.gather(*buffer.pending)
        return buffer

    buffer = asyncio.run(scenario())
    assert codec.calls == 3 * len(bounds) and codec.most == 1
    for c, (lo, hi) in enumerate(bounds):
        payloads = [(p, WEIGHTS[p], CODEC.encode(parts[p][lo:hi])) for p in (A, B, C)]
        assert buffer._expected[c] == CODEC.encode(combine(CODEC, "mean", 2.0, payloads, hi - lo).average)


def test_a_peer_reduces_its_slice_and_re_checks_another_in_one_buffer_taking_turns():
    """The slice a peer reduces and the slice it re-checks in the same round combine their chunks in
    the round's one scratch buffer, one chunk at a time: with a buffer each (``clip`` holds members
    + 1 chunks of fp32 there) a verifier peaked at 2.2x the vector in a 4-peer int8 round, the other
    peers at 1.7x. Each still gets the bytes it would alone."""
    codec = _Concurrency()
    group = _group((A, 100.0, False), (B, 300.0, False), (C, 50.0, False), chunk=100)
    signer = Signer("run", RSAPrivateKey(), A, lambda peer_id: None)
    allreducer = AllReducer(None, run_id="run", peer_id=A, client_mode=False, codec=codec, timeout=5.0,
                            max_weight=1e9, signer=signer, recheck=1.0)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    parts = {p: torch.randn(NUMEL, generator=gen) for p in (A, B, C)}

    async def scenario():
        state = allreducer._new_round(group)
        mine = state.reduction
        (index, check), = state.checks.items()  # A reduces slice 0 and verifies the one before it
        assert (mine.index, index) == (0, 2) and mine.scratch is check.scratch
        for target, (lo, hi) in ((mine, state.bounds[0]), (check, state.bounds[2])):
            for p in (A, B, C):
                assert target.check(p, _header(group, WEIGHTS[p], hi - lo)) is None
                if target is mine:
                    mine.start(p)
            for c, (a, b) in enumerate(chunk_bounds(hi - lo, 100)):
                for p in (A, B, C):
                    target.submit(p, c, CODEC.encode(parts[p][lo + a : lo + b]))
        await asyncio.gather(*check.pending)
        await mine.trailer
        return state, [r.result() for r in mine.replies], check

    state, replies, check = asyncio.run(scenario())
    assert codec.most == 1 and codec.calls == 3 * (len(replies) + len(check.chunks))

    def average(lo, hi):
        payloads = [(p, WEIGHTS[p], CODEC.encode(parts[p][lo:hi])) for p in (A, B, C)]
        return CODEC.encode(combine(CODEC, "mean", 2.0, payloads, hi - lo).average)

    for (slice_lo, slice_hi), got in ((state.bounds[0], replies), (state.bounds[2], check._expected)):
        for c, (a, b) in enumerate(chunk_bounds(slice_hi - slice_lo, 100)):
            assert got[c] == average(slice_lo + a, slice_lo + b)


def _checked_slice(replied: dict[int, bytes]):
    """A verifier's buffer of slice 0 (A, B, C; 10 chunks) with every copy in and recomputed early,
    told the reducer's chunks ``replied``; and each chunk's average of all three parts and of A, B."""
    group = _group((A, 100.0, False), (B, 300.0, False), (C, 50.0, True), chunk=100)
    gen = torch.Generator().manual_seed(4)
    parts = {p: torch.randn(NUMEL, generator=gen) for p in (A, B, C)}
    bounds = chunk_bounds(NUMEL, 100)

    def average(members, c):
        lo, hi = bounds[c]
        payloads = [(p, WEIGHTS[p], CODEC.encode(parts[p][lo:hi])) for p in members]
        return CODEC.encode(combine(CODEC, "mean", 2.0, payloads, hi - lo).average)

    async def scenario():
        buffer = CheckBuffer(group, 0, (0, NUMEL), WEIGHTS, codec=CODEC, mode="mean")
        for p in (A, B, C):
            buffer.check(p, _header(group, WEIGHTS[p]))
            for c, (lo, hi) in enumerate(bounds):
                buffer.submit(p, c, CODEC.encode(parts[p][lo:hi]))
        await asyncio.gather(*buffer.pending)
        for c, payload in replied.items():
            buffer.reply(c, payload)
        return buffer

    everyone = [average((A, B, C), c) for c in range(len(bounds))]
    return asyncio.run(scenario()), everyone, [average((A, B), c) for c in range(len(bounds))]


def _trailer(excluded: dict[str, str]):
    return SliceTrailer(
        total_weight=1.0,
        included=3 - len(excluded),
        excluded=excluded,
        clipped={},
        digest="0" * 64,
        signature="",
    )


def test_a_verifier_drops_each_chunk_sent_right_and_still_catches_one_sent_wrong():
    """Once the reducer's chunk is the average we computed, the copies of it are dropped (a
    verifier of an fp32 slice had held every member's whole part: the vector once more); a chunk
    sent wrong keeps its copies, and the check names it."""
    _, everyone, _ = _checked_slice({})
    wrong = CODEC.encode(torch.zeros(100))
    buffer, _, _ = _checked_slice({**{c: everyone[c] for c in range(9)}, 9: wrong})
    assert buffer.checked == set(range(9))
    assert all(parts[c] is None for parts in buffer.payloads.values() for c in range(9))
    assert all(parts[9] is not None for parts in buffer.payloads.values())
    why = buffer.mismatch(CODEC, "mean", 2.0, _trailer({}), [*everyone[:9], wrong])
    assert why is not None and why.startswith("chunk 9 differs")


def test_a_member_left_out_mid_slice_is_no_finding_against_the_reducer():
    """A reducer that leaves C out from chunk 5 on (its part came late) averaged C's chunks 0-4: the
    chunks before count every part, the rest only A's and B's; neither is a lie."""
    buffer, everyone, without = _checked_slice({})
    replies = everyone[:5] + without[5:]
    assert buffer.mismatch(CODEC, "mean", 2.0, _trailer({C: "sent nothing in time"}), replies) is None
    wrong = [*replies[:7], CODEC.encode(torch.zeros(100)), *replies[8:]]
    assert buffer.mismatch(CODEC, "mean", 2.0, _trailer({C: "sent nothing in time"}), wrong).startswith(
        "chunk 7"
    )


def test_a_verifier_reads_copies_a_window_ahead_of_its_checks_but_never_waits_on_a_missing_one():
    """Copies are read at most ``WINDOW`` chunks beyond the first chunk not yet compared with the
    reducer's (the rest waits at the senders), so once every reply is in the last copies are still
    coming and the re-check waits for them (``settle``); a member whose copy never comes holds back
    the others only until the reducer's chunks run ``WINDOW`` past it."""
    group = _group((A, 100.0, False), (B, 300.0, False), (C, 50.0, True), chunk=100)
    bounds = chunk_bounds(NUMEL, 100)
    gen = torch.Generator().manual_seed(5)
    parts = {p: torch.randn(NUMEL, generator=gen) for p in (A, B, C)}

    async def copies(buffer: CheckBuffer, sender: str) -> None:  # as ``ReducerService._serve_check``
        buffer.check(sender, _header(group, WEIGHTS[sender]))
        for c, (lo, hi) in enumerate(bounds):
            await buffer.may_read(c)
            buffer.submit(sender, c, CODEC.encode(parts[sender][lo:hi]))

    async def scenario(senders):
        buffer = CheckBuffer(group, 0, (0, NUMEL), WEIGHTS, codec=CODEC, mode="mean")
        reading = [asyncio.ensure_future(copies(buffer, p)) for p in senders]
        await asyncio.sleep(0.1)
        held = [len(buffer.payloads[p]) for p in senders]

        for c, (lo, hi) in enumerate(bounds):  # the reducer's chunks, as every member averages them
            payloads = [(p, WEIGHTS[p], CODEC.encode(parts[p][lo:hi])) for p in (A, B, C)]
            buffer.reply(c, CODEC.encode(combine(CODEC, "mean", 2.0, payloads, hi - lo).average))
        started = time.monotonic()  # every reply is in, the last copies are still to be read:
        await buffer.settle(list(senders), started + 5.0)  # the re-check waits for them
        assert all(len(buffer.payloads[p]) == len(bounds) for p in senders)
        assert time.monotonic() - started < 2.0
        await asyncio.wait_for(asyncio.gather(*reading), 1.0)
        return held, buffer

    held, buffer = asyncio.run(scenario((A, B, C)))
    assert held == [WINDOW] * 3
    assert buffer.checked == set(range(len(bounds)))
    held, buffer = asyncio.run(scenario((A, B)))  # C's copy never comes: A's and B's still do
    assert held == [WINDOW] * 2 and all(len(buffer.payloads[p]) == len(bounds) for p in (A, B))



def test_a_verifier_reads_copies_of_large_chunks_as_few_ahead_as_a_reducer_does():
    """Copies of 4 MiB chunks (fp32 at 2^20 values) are read 2 chunks ahead, not ``WINDOW``, as a
    reducer reads parts (``read_ahead``): 4 members' fp32 copies 4 chunks deep had kept a verifier
    at 2.1x the vector in a 4-peer round."""
    group = _group((A, 100.0, False), (B, 300.0, False), chunk=100)

    async def window_after(payload_bytes: int) -> tuple[int, bool]:
        buffer = CheckBuffer(group, 0, (0, NUMEL), {A: 100.0, B: 300.0}, codec=CODEC, mode="mean")
        for p in (A, B):
            assert buffer.check(p, _header(group, 100.0 if p == A else 300.0)) is None
        buffer.submit(A, 0, b"\0" * payload_bytes)  # kept: B's copy of chunk 0 is not in yet
        ahead = asyncio.ensure_future(buffer.may_read(2))
        await asyncio.sleep(0.05)
        read = ahead.done()
        ahead.cancel()
        return buffer.window, read

    assert asyncio.run(window_after(1 << 20)) == (WINDOW, True)  # int8's 1 MiB chunks
    assert asyncio.run(window_after(4 << 20)) == (2, False)  # chunk 2 waits at its sender

def test_a_verifiers_own_copy_of_a_slice_whose_reducer_stalls_ends_within_the_timeout():
    """The verifier's own copy is read behind the reducer's chunks, as the others' are; when those
    never come (the reducer stalled or died), the copy gives up after ``timeout`` as a remote
    verifier's read does, instead of holding the copy and our part beyond the round."""
    group = _group((A, 100.0, False), (B, 300.0, False), (C, 50.0, True), chunk=100)
    bounds = chunk_bounds(NUMEL, 100)
    me = verifier_of(group, 0)
    values = torch.randn(NUMEL, generator=torch.Generator().manual_seed(6))

    async def scenario():
        buffer = CheckBuffer(group, 0, (0, NUMEL), WEIGHTS, codec=CODEC, mode="mean")
        state = RoundState(group, [(0, NUMEL)], lambda i, first: None)
        state.checks[0] = buffer
        exchange = Exchange(None, me, None, None, None, CODEC, timeout=0.5)
        part = OutgoingPart(0, group.reducers[0], TensorVector(values), WEIGHTS[me])
        payloads = Payloads(CODEC, part, bounds)
        started = time.monotonic()
        await asyncio.wait_for(exchange.send_check(state, 0, payloads), 5.0)
        return time.monotonic() - started, len(buffer.payloads[me])

    took, held = asyncio.run(scenario())
    assert 0.4 < took < 2.0 and held == WINDOW
