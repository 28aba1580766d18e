"""The all-reduce's parts that need no network, each alone: slicing, one slice's reduction
(validation, fixed summation order, deadline), and the takeover rules of a round."""

import asyncio

import pytest
import torch

from p2p_trainer.codec import get_codec
from p2p_trainer.swarm.matchmaking import Group, Member
from p2p_trainer.swarm.partition import SliceReduction, slice_bounds
from p2p_trainer.swarm.takeover import RoundState, backup_answer
from p2p_trainer.testing.swarm import reference_mean

pytestmark = pytest.mark.timeout(30)

CODEC = get_codec("fp32")


def _group(*members: tuple[str, float, bool]) -> Group:
    return Group("g1", 3, 1000, tuple(Member(p, w, c) for p, w, c in members))


GROUP = _group(("a", 100.0, False), ("b", 300.0, False), ("c", 50.0, True))


def test_slices_cover_the_vector_in_near_equal_contiguous_parts():
    for numel, parts in [(10, 3), (7, 7), (100_003, 4), (5, 8)]:
        bounds = slice_bounds(numel, parts)
        assert bounds[0][0] == 0 and bounds[-1][1] == numel
        assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def _reduce(parts: dict[str, tuple[object, object, torch.Tensor]], *, order, timeout=5.0, takeover=False):
    """Submit ``parts`` (peer -> (weight, numel, values)) in ``order`` to slice 0 = all 1000 values."""

    async def scenario():
        reduction = SliceReduction(
            GROUP, 0, (0, 1000), codec=CODEC, timeout=timeout, max_weight=1e9, takeover=takeover
        )
        task = asyncio.create_task(reduction.reduce())
        for peer in order:
            weight, numel, values = parts[peer]
            await reduction.submit(peer, weight, numel, CODEC.encode(values))
        await task
        header, payload = reduction.result.result()
        return header, (CODEC.decode(payload, 1000) if payload else None), reduction.excluded

    return asyncio.run(scenario())


def _vectors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randn(1000, generator=gen) for p in "abc"}


def test_the_sum_follows_group_order_not_arrival_order():
    vec = _vectors()
    weights = {m.peer_id: m.weight for m in GROUP.members}
    parts = {p: (weights[p], 1000, vec[p]) for p in "abc"}
    expected = reference_mean(vec, weights, ["a", "b", "c"])
    for order in (["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"]):
        header, average, excluded = _reduce(parts, order=order)
        assert torch.equal(average, expected), order
        assert header["total_weight"] == 450.0 and header["included"] == 3 and excluded == {}


@pytest.mark.parametrize(
    "bad, reason",
    [
        ((300.0, 1000), "differs from the 100 it declared"),  # a weight other than the one it joined with
        ((100.0, 999), "part of 999 values"),
        (("100", 1000), "is not a number"),
        ((float("nan"), 1000), "not a positive finite number"),
    ],
)
def test_a_bad_part_is_left_out_with_its_reason(bad, reason):
    vec = _vectors(1)
    parts = {"a": (*bad, vec["a"]), "b": (300.0, 1000, vec["b"]), "c": (50.0, 1000, vec["c"])}
    header, average, excluded = _reduce(parts, order=["a", "b", "c"])
    assert set(excluded) == {"a"} and reason in excluded["a"], excluded
    assert torch.equal(average, reference_mean(vec, {"b": 300.0, "c": 50.0}, ["b", "c"]))
    assert header["total_weight"] == 350.0


def test_a_stranger_cannot_submit_and_a_silent_member_is_left_out_at_the_deadline():
    vec = _vectors(2)
    parts = {"a": (100.0, 1000, vec["a"]), "b": (300.0, 1000, vec["b"]), "z": (1.0, 1000, vec["c"])}
    header, average, excluded = _reduce(parts, order=["z", "a", "b"], timeout=0.5)
    assert set(excluded) == {"c"} and "sent nothing within" in excluded["c"]
    assert torch.equal(average, reference_mean(vec, {"a": 100.0, "b": 300.0}, ["a", "b"]))


def test_a_takeover_with_a_silent_member_fails_instead_of_guessing():
    vec = _vectors(3)
    parts = {"a": (100.0, 1000, vec["a"]), "b": (300.0, 1000, vec["b"])}
    header, average, _ = _reduce(parts, order=["a", "b"], timeout=0.5, takeover=True)
    assert (
        average is None
        and "cannot be taken over" in header["error"]
        and "c did not take part" in header["error"]
    )


def test_takeover_rules():
    group = _group(("a", 1.0, False), ("b", 1.0, False), ("d", 1.0, False), ("c", 1.0, True))

    async def scenario():
        made = []

        def make(index, takeover):
            made.append((index, takeover))
            return SliceReduction(
                group, index, (0, 10), codec=CODEC, timeout=5.0, max_weight=1e9, takeover=takeover
            )

        state = RoundState(group, slice_bounds(30, 3), make)
        state.reduction = make(2, False)  # we are "d", reducer of slice 2
        assert state.backup(0) == "b" and state.backup(2) == "a"
        state.mark_lost("b", "reset")
        assert state.backup(0) == "d" and state.alive() == ["a", "d", "c"]
        assert state.reduction.excluded == {"b": "it is gone (reset)"}
        takeover = state.takeover_reduction(1)
        assert takeover is state.takeover_reduction(1) and made == [(2, False), (1, True)]
        assert "b" in takeover.excluded  # a lost member is never waited for
        state.mark_lost("a", "timeout")
        assert state.backup(1) == "d" and state.backup(2) is None
        state.settle(0, None)
        state.settle(0, ({"total_weight": 1.0}, b"x"))  # the first answer stands
        assert state.answer(0).result() is None
        state.fail_unanswered()
        assert state.answer(1).result()[0] == "failed"

    asyncio.run(scenario())
    assert backup_answer(None, 3) is None  # gone for the backup too: reduce afresh
    reply = ({"total_weight": 2.0}, b"bytes")
    assert backup_answer(reply, 3) is reply  # hand out the lost reducer's very bytes
    assert "failed here too" in backup_answer(("failed", "boom"), 3)[0]["error"]
