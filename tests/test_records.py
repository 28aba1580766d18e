"""When a round closes, from progress records alone (the pure rules the trainer asks each step)."""

import pytest

from p2p_trainer.swarm.records import ProgressRecord, round_is_late, round_should_close

pytestmark = pytest.mark.timeout(10)


def _rec(step: int, tokens: int = 0, speed: float = 0.0, age: float = 0.0) -> ProgressRecord:
    return ProgressRecord("x", step, tokens, speed, None, "", False, 100.0 - age)


def test_token_target_counts_the_others_at_their_speed():
    close = lambda rest, local: round_should_close(
        rest, 3, local_tokens=local, target=1000, now=100.0, ttl=30.0
    )  # noqa: E731
    assert close({}, 1000) and not close({}, 999)
    # 300 now + 200 tokens/s for the 2 s since its record = 700 more
    assert close({"a": _rec(3, 300, 200.0, age=2.0)}, 300)
    assert not close({"a": _rec(3, 300, 200.0, age=1.0)}, 300)
    # extrapolation stops at the record's ttl: a dead peer's record does not close rounds forever
    assert not close({"a": _rec(3, 0, 10.0, age=1e6)}, 500)
    # records of other steps do not count, unless most of the swarm moved on (we are late)
    assert not close({"a": _rec(2, 5000)}, 10)
    assert close({"a": _rec(4), "b": _rec(4), "c": _rec(3)}, 0)


def test_fixed_h_late_only_when_the_swarm_moved_on_or_waits_for_us():
    assert round_is_late({"a": _rec(5), "b": _rec(5)}, 4, catching_up=False)
    assert not round_is_late({"a": _rec(4, 100, 50.0)}, 4, catching_up=False)
    # catching up after a download: everyone else at our step finished training it and waits
    finished = _rec(4, 100, 0.0)
    assert round_is_late({"a": finished, "b": finished}, 4, catching_up=True)
    assert not round_is_late({"a": finished, "b": _rec(4, 100, 50.0)}, 4, catching_up=True)
    assert not round_is_late({}, 4, catching_up=True)


def test_the_step_horizon_believes_far_steps_only_as_fast_as_rounds_happen():
    from p2p_trainer.swarm.records import StepHorizon, donors, out_of_sync

    horizon = StepHorizon()
    assert horizon.max_step(0.0) is None  # a newcomer takes the swarm's word
    horizon.reached(5, 0.0, by_round=False)
    assert horizon.max_step(100.0) is None  # no round seen yet: nothing to measure the pace with
    horizon.reached(6, 10.0, by_round=True)  # a 10 s round
    assert horizon.max_step(10.0) == 7 and horizon.max_step(30.0) == 11  # one step per 5 s on top
    h1, h2 = "1" * 64, "2" * 64
    sybils = {f"s{i}": ProgressRecord(f"s{i}", 10**6, 0, 0.0, None, h2, False, 100.0) for i in range(3)}
    honest = {f"h{i}": ProgressRecord(f"h{i}", 7, 0, 0.0, None, h1, False, 100.0) for i in range(2)}
    records = {**sybils, **honest}
    assert "outer step 1000000" in out_of_sync(
        records, "me", 6, h1, check_hash=True
    )  # believed without a horizon
    assert out_of_sync(records, "me", 6, h1, check_hash=True, max_step=7) == (
        "the swarm is at outer step 7, this peer at 6"
    )
    import random

    found = donors(records, "me", random.Random(0), max_step=7)
    assert found.step == 7 and set(found.peers) == {"h0", "h1"}
