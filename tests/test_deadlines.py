"""Deadlines that follow the swarm: the pure rules of ``swarm.deadlines``, then real peers on
127.0.0.1 whose rounds take a known time (every member's parts wait ``BASE`` seconds, as if
computing and sending took that long). A member 3x slower than the rest is waited for with
``wait_for_slower=3`` and left out with the default 2; a peer that never joins, and one that dies in
the middle of a round, cost seconds, not the ceilings (``matchmaking_timeout``, ``allreduce_timeout``)."""

import itertools
import logging
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from p2p_trainer.config import ConfigError, SwarmConfig
from p2p_trainer.swarm import deadlines
from p2p_trainer.swarm.deadlines import Policy, Recent, reply_timeout, typical_delay
from p2p_trainer.testing import faults
from p2p_trainer.testing import swarm as st

BASE = 2.0  # seconds every member's parts wait in a normal round: the typical peer
FLOOR = 1.0  # swarm.deadline_floor of the test swarms
ALLREDUCE_CEILING = 60.0  # allreduce_timeout: far above what any round here should take
MATCHMAKING_CEILING = 20.0
NUMEL = 1_000

pytestmark = pytest.mark.timeout(30)  # the swarm tests below say their own (starting 6 peers is slow)
_steps = itertools.count(1)


# ---- the pure rules ----
def test_typical_delay_is_the_lower_median_with_the_missing_counted_last():
    assert typical_delay([3.0, 1.0, 2.0], 3) == 2.0
    assert typical_delay([1.0, 9.0], 2) == 1.0  # of two, the slow one is the one judged
    assert typical_delay([1.0], 2) == 1.0  # the other one never came: later than everyone
    assert typical_delay([5.0, 1.0], 4) == 5.0
    assert typical_delay([1.0], 3) is None  # the typical member is among the missing
    assert typical_delay([], 1) is None
    with pytest.raises(ValueError, match="3 delays for 2 expected"):
        typical_delay([1.0, 2.0, 3.0], 2)


def test_policy_waits_for_slower_peers_up_to_the_ceiling():
    policy = Policy(floor=1.0, ceiling=30.0, wait_for_slower=3.0)
    assert policy.wait(None) == 30.0  # nothing known: the configured timeout
    assert policy.wait(2.0) == 1.0 + 3.0 * 2.0
    assert policy.wait(20.0) == 30.0
    assert policy.wait(0.0) == 1.0
    for bad, needle in (
        (dict(floor=0.0, ceiling=1.0, wait_for_slower=2.0), "floor=0.0"),
        (dict(floor=float("inf"), ceiling=1.0, wait_for_slower=2.0), "floor=inf"),
        (dict(floor=1.0, ceiling=-1.0, wait_for_slower=2.0), "ceiling=-1.0"),
        (dict(floor=1.0, ceiling=1.0, wait_for_slower=0.5), "wait_for_slower=0.5"),
        (dict(floor=1.0, ceiling=1.0, wait_for_slower=float("nan")), "wait_for_slower=nan"),
    ):
        with pytest.raises(ValueError, match=needle):
            Policy(**bad)


def test_recent_rounds_give_the_slowest_estimate_and_forget_old_ones():
    recent = Recent(Policy(floor=0.5, ceiling=100.0, wait_for_slower=2.0), window=4, min_rounds=2)
    recent.observe(3.0)
    assert recent.estimate() is None and recent.wait() == 100.0  # too few rounds to judge
    recent.observe(1.0)
    assert recent.estimate() == 3.0 and recent.wait() == 0.5 + 2.0 * 3.0
    recent.observe(float("nan"))
    recent.observe(-1.0)
    assert recent.rounds == 2  # nonsense is not a round
    for _ in range(3):
        recent.observe(1.0)
    assert recent.estimate() == 1.0  # the slow round of long ago is forgotten
    with pytest.raises(ValueError, match="min_rounds=5"):
        Recent(recent.policy, window=4, min_rounds=5)


def test_recent_rounds_know_the_peers_seen_often_enough():
    recent = Recent(Policy(floor=0.5, ceiling=100.0, wait_for_slower=2.0), window=4, min_rounds=2)
    recent.observe(1.0, ["a", "b"])
    recent.observe(1.0, ["a"])
    assert recent.knows(["a"]) and not recent.knows(["a", "b"]) and recent.knows([])


def test_the_reply_timeout_outlasts_every_reducers_deadline_from_the_same_rounds():
    """In each round, a member's last answer came no earlier than the typical part reached any
    reducer; so its reply timeout is at least each reducer's part deadline plus a margin."""
    rng = random.Random(0)
    for _ in range(200):
        floor, ceiling, slower = rng.uniform(0.1, 3), rng.uniform(5, 100), rng.uniform(1, 4)
        policy = Policy(floor=floor, ceiling=ceiling, wait_for_slower=slower)
        reducer, member = Recent(policy), Recent(policy)
        for _ in range(rng.randint(3, 12)):
            typical_part = rng.uniform(0.0, 40.0)
            reducer.observe(typical_part, ["r", "m"])
            member.observe(typical_part + rng.uniform(0.0, 5.0), ["r", "m"])
        reply = reply_timeout(member, ["r", "m"])
        assert reply >= reducer.wait() + min(policy.floor, 5.0), (policy, reply, reducer.wait())
        assert reply <= deadlines.reply_ceiling(policy.ceiling)
    fresh = Recent(Policy(floor=1.0, ceiling=30.0, wait_for_slower=2.0))
    assert reply_timeout(fresh, ["r"]) == deadlines.reply_ceiling(30.0) == 60.0
    for _ in range(deadlines.MIN_ROUNDS):
        fresh.observe(1.0, ["r"])
    assert reply_timeout(fresh, ["r"]) == 1.0 + 2.0 * 1.0 + 1.0
    assert reply_timeout(fresh, ["r", "newcomer"]) == 60.0  # it may still wait up to its ceiling


@pytest.mark.parametrize(
    "field, value", [("wait_for_slower", 0.5), ("wait_for_slower", float("inf")), ("deadline_floor", 0.0)]
)
def test_bad_deadline_settings_name_themselves(field, value):
    with pytest.raises(ConfigError, match=f"swarm.{field}={value!r}"):
        SwarmConfig(**{field: value}).validate()


# ---- real peers ----
def _start(n: int, run_id: str, **overrides) -> list:
    return st.start_peers(
        n,
        run_id,
        min_group_size=2,
        matchmaking_timeout=MATCHMAKING_CEILING,
        allreduce_timeout=ALLREDUCE_CEILING,
        deadline_floor=FLOOR,
        recheck=0.0,  # no copies for verifiers: a round's timing is its parts' alone
        **overrides,
    )


def _round(peers, stalls) -> tuple[list, float]:
    """One round on ``peers`` whose parts wait ``stalls`` seconds: (results, seconds it took)."""
    step = next(_steps)
    st.announce_step(peers, step)
    for peer, stall in zip(peers, stalls, strict=True):
        peer.fault = faults.stall(stall) if stall else None
    vectors = [torch.full((NUMEL,), float(i)) for i in range(len(peers))]
    started = time.monotonic()
    try:
        results = st.run_round(peers, step, vectors, [100.0] * len(peers))
    finally:
        for peer in peers:
            peer.fault = None
    return results, time.monotonic() - started


def _warm_up(peers) -> list[float]:
    """Enough normal rounds for every peer to know how long one takes; their durations."""
    took = []
    for _ in range(deadlines.MIN_ROUNDS):
        results, seconds = _round(peers, [BASE] * len(peers))
        assert all(r is not None and r.excluded == [] for r in results), [p.last_error for p in peers]
        took.append(seconds)
    return took


@pytest.fixture(scope="module")
def swarms():
    """Two swarms, started and warmed up side by side (a round is mostly waiting): three full peers
    that wait for a peer 3x slower than the typical one, and two full peers and a client with the
    default wait_for_slower (2), with their normal rounds' durations."""
    with ThreadPoolExecutor(2) as pool:
        starting = [
            pool.submit(_start, 3, "deadlines-patient", wait_for_slower=3.0),
            pool.submit(_start, 3, "deadlines-default", client_mode=[False, False, True]),
        ]
        started = [f.result() for f in starting if f.exception() is None]
        try:
            assert len(started) == 2, [f.exception() for f in starting]
            patient, default = started
            warming = [pool.submit(_warm_up, patient), pool.submit(_warm_up, default)]
            took = [f.result() for f in warming][1]
            yield {"patient": patient, "default": (default, took)}
        finally:
            for peer in itertools.chain(*started):
                peer.shutdown()


@pytest.fixture
def patient(swarms):
    return swarms["patient"]


@pytest.fixture
def default(swarms):
    return swarms["default"]


@pytest.mark.timeout(150)
def test_a_peer_3x_slower_is_waited_for_when_wait_for_slower_allows_it(patient):
    slow = patient[2]
    results, _ = _round(patient, [BASE, BASE, 3 * BASE])
    assert all(r is not None for r in results), [p.last_error for p in patient]
    for r in results:
        assert r.excluded == [] and r.group_size == 3 and torch.equal(r.average, results[0].average)
        assert r.allreduce_s >= 3 * BASE - 0.5  # everyone waited for the slow member's parts
    assert slow.peer_id in results[0].members
    assert torch.allclose(results[0].average, torch.full((NUMEL,), 1.0))  # the mean of 0, 1 and 2


@pytest.mark.timeout(150)
def test_a_peer_3x_slower_is_left_out_with_the_default_wait_for_slower(default, caplog):
    peers, _ = default
    slow = peers[1]
    with caplog.at_level(logging.WARNING, logger="p2p_trainer.swarm"):
        results, _ = _round(peers, [BASE, 3 * BASE, BASE])
    others = [results[0], results[2]]
    assert all(r is not None for r in others), [p.last_error for p in peers]
    for r in others:
        assert r.excluded == [slow.peer_id], r.reasons
        assert "part deadline" in r.reasons[slow.peer_id]
        assert r.allreduce_s < 3 * BASE - 0.5  # nobody waited for it
        assert torch.equal(r.average, others[0].average)
    assert results[1] is None or torch.equal(results[1].average, others[0].average)
    named = [rec.getMessage() for rec in caplog.records if slow.peer_id in rec.getMessage()]
    assert any("leaving out" in m for m in named), caplog.text


@pytest.mark.timeout(150)
def test_a_peer_that_never_joins_costs_seconds_not_the_matchmaking_timeout(default, caplog):
    peers, _ = default
    absent = peers[2]  # its record says it is at the step, but it never asks to join
    step = next(_steps)
    st.announce_step(peers, step)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="p2p_trainer.swarm.matchmaking"):
        results = st.run_round(peers[:2], step, [torch.zeros(NUMEL), torch.ones(NUMEL)], [1.0, 1.0])
    seconds = time.monotonic() - started
    assert all(r is not None for r in results), [p.last_error for p in peers]
    assert all(absent.peer_id not in r.members for r in results)
    assert seconds < MATCHMAKING_CEILING / 4, seconds
    assert f"did not join: {absent.peer_id}" in caplog.text and "as recent lobbies call for" in caplog.text


@pytest.mark.timeout(150)
def test_a_peer_that_dies_mid_round_costs_about_twice_a_normal_round(default):
    peers, normal = default
    victim = peers[2]  # a client: no stream to it breaks when it dies, so only a deadline finds it gone
    step = next(_steps)
    st.announce_step(peers, step)
    stalls = [BASE, BASE, 600.0]  # the victim joins the group, holds its parts, then dies
    results: list = [None] * 3
    took: list = [None] * 3

    def one(i: int) -> None:
        peers[i].fault = faults.stall(stalls[i])
        begun = time.monotonic()
        results[i] = peers[i].all_reduce(outer_step=step, vector=torch.full((NUMEL,), float(i)), weight=100.0)
        took[i] = time.monotonic() - begun

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(BASE / 2)
        victim.shutdown()
        for thread in threads:
            thread.join(timeout=ALLREDUCE_CEILING)
    finally:
        for peer in peers:
            peer.fault = None
    assert not any(thread.is_alive() for thread in threads)
    survivors = results[:2]
    assert all(r is not None for r in survivors), [p.last_error for p in peers]
    for r in survivors:  # found gone by the deadline, not by a broken stream
        assert r.excluded == [victim.peer_id] and "part deadline" in r.reasons[victim.peer_id], r.reasons
    assert torch.equal(survivors[0].average, survivors[1].average)
    assert torch.allclose(survivors[0].average, torch.full((NUMEL,), 0.5))  # the survivors' mean
    usual = statistics.median(normal)
    # the deadline is deadline_floor + 2 x the typical arrival; a normal round is that arrival plus a little
    assert max(took[:2]) < 2 * usual + FLOOR + 1.0, (took, normal)
    assert max(took[:2]) < ALLREDUCE_CEILING / 4
