"""A lying reducer is caught in the round it lies (real peers on 127.0.0.1): one that sends different
averages to different members is proven by its own signatures and banned, on every honest member
alike; one that sends the same wrong average to all is caught by the random re-check, as often as
its probability says."""

import logging

import pytest
import torch

from p2p_trainer.codec import get_codec
from p2p_trainer.swarm.verify import checked_slices
from p2p_trainer.testing import faults
from p2p_trainer.testing import swarm as st

pytestmark = pytest.mark.timeout(120)
NUMEL = 20_000
CODEC = get_codec("fp32")


@pytest.fixture(scope="module")
def peers():
    swarm = st.start_peers(3, "verify-test", min_group_size=2, allreduce_timeout=3.0, recheck=0.0)
    yield swarm
    for peer in swarm:
        peer.shutdown()


def _vectors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(NUMEL, generator=gen) for _ in range(3)]


def test_an_equivocating_reducer_fails_the_round_everywhere_and_is_banned(peers, caplog):
    liar, *honest = peers
    victim = honest[0].peer_id
    st.announce_step(peers, 1)
    liar.reducer_fault = faults.equivocate(CODEC, lambda member: member == victim)
    try:
        with caplog.at_level(logging.WARNING):
            results = st.run_round(peers, 1, _vectors(1), [1.0, 1.0, 1.0])
    finally:
        liar.reducer_fault = None
    assert results[1] is None and results[2] is None  # both honest members keep θ, not just the victim
    for peer in honest:
        assert "sent different averages to different members" in peer.last_error, peer.last_error
    assert caplog.text.count(f"banning {liar.peer_id}") >= 2  # on each honest member
    # banned: the honest members' next round leaves it out (its joins are refused by the leader)
    st.announce_step(peers, 2)
    results = st.run_round(honest, 2, _vectors(2)[:2], [1.0, 1.0])
    assert all(r is not None and liar.peer_id not in r.members for r in results)


def test_a_wrong_average_sent_to_all_is_caught_as_often_as_the_recheck_says():
    # chunks of 500 values: a slice streams 14, so copies are read behind the reducer's chunks. Every
    # peer answers at once, so the timeout only bounds a round on a loaded machine (3 s was too short)
    peers = st.start_peers(
        3, "recheck-test", min_group_size=3, allreduce_timeout=10.0, recheck=0.5, allreduce_chunk=500
    )
    try:
        liar = peers[0]
        liar.reducer_fault = faults.wrong_average(CODEC, -1.0)
        caught = applied = 0
        for step in range(1, 13):
            st.announce_step(peers, step)
            results = st.run_round(peers, step, _vectors(step), [1.0, 1.0, 1.0])
            group_id = next(r.group_id for r in results if r is not None) if any(results) else None
            honest = results[1:]
            if all(r is None for r in honest):
                caught += 1
                assert all("found reducer" in p.last_error and "wrong" in p.last_error for p in peers[1:])
            else:
                applied += 1
                # not re-checked this round: the draw from the group id said so (the same on every member)
                assert all(r is not None for r in honest) and group_id is not None
                liar_slice = results[1].members.index(liar.peer_id)
                assert liar_slice not in checked_slices(group_id, 3, 0.5)
        # the draw is Binomial(12, 0.5) per round the liar reduces: far from never and from always
        assert 2 <= caught <= 10, (caught, applied)
    finally:
        for peer in peers:
            peer.shutdown()
