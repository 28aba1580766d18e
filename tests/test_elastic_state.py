"""Elastic membership, in process on real swarm peers (DHT + p2pd on 127.0.0.1): downloading the
state checked against the swarm's hash (a lying donor and an empty one are skipped; donors are
spread), a reducer that vanishes mid-round has its slice taken over, a blocking all-reduce gives up
at once when the peer is asked to leave, and the rules that decide when a peer is out of sync."""

import random
import threading
import time

import pytest
import torch

from p2p_trainer.contracts import params_sha256
from p2p_trainer.swarm import ProgressRecord, TrainingState
from p2p_trainer.swarm.records import agreed_hash, donors, out_of_sync
from p2p_trainer.testing import faults
from p2p_trainer.testing import swarm as st

NUMEL = 50_001
STEP = 3


def _moments(numel: int) -> dict:
    """AdamW moments laid out like θ (see state_format), for two parameter tensors."""
    gen = torch.Generator().manual_seed(3)
    return {
        "inner.exp_avg": torch.randn(numel, generator=gen),
        "inner.exp_avg_sq": torch.rand(numel, generator=gen),
        "inner.step": torch.tensor([7.0, 7.0]),
    }


def _vector(file, name):
    return file.read(name, 0, file.length(name))


@pytest.fixture(scope="module")
def donor_swarm():
    """liar: publishes the swarm's hash but serves another θ; empty: has no state to serve;
    honest_a/b: serve the true state; joiner: downloads."""
    peers = st.start_peers(5, "elastic-state", allreduce_timeout=3.0)
    liar, empty, honest_a, honest_b, joiner = peers
    gen = torch.Generator().manual_seed(0)
    master, momentum = torch.randn(NUMEL, generator=gen), torch.randn(NUMEL, generator=gen)
    sha = params_sha256(master)
    honest = TrainingState(STEP, sha, master, momentum, inner_step=42, inner=_moments(NUMEL))
    for peer in (honest_a, honest_b):
        peer.publish_state(honest)
    tampered = master.clone()
    tampered[7] += 1.0
    liar.publish_state(TrainingState(STEP, sha, tampered, momentum, inner_step=42))
    st.announce_step(peers, STEP, hashes=[sha, sha, sha, sha, ""], inner_step=42)
    yield peers, honest
    for peer in peers:
        peer.shutdown()


@pytest.mark.timeout(60)
def test_download_is_checked_against_the_swarm_hash_and_spreads_over_donors(donor_swarm):
    peers, honest = donor_swarm
    liar, empty, honest_a, honest_b, joiner = peers
    records = joiner.swarm_records()
    # seeds that make each donor come first: the liar, the empty one, each honest one
    firsts = {}
    for seed in range(200):
        first = donors(records, joiner.peer_id, random.Random(seed)).peers[0]
        firsts.setdefault(first, seed)
    assert set(firsts) == {liar.peer_id, empty.peer_id, honest_a.peer_id, honest_b.peer_id}

    used = set()
    for first, seed in firsts.items():
        got = joiner.download_state(numel=NUMEL, want_inner=True, rng=random.Random(seed))
        assert got is not None, first
        assert torch.equal(_vector(got.state, "master"), honest.master)
        assert torch.equal(_vector(got.state, "momentum"), honest.momentum)
        assert got.state.outer_step == STEP and got.state.inner_step == 42
        assert torch.equal(_vector(got.state, "inner.exp_avg_sq"), honest.inner["inner.exp_avg_sq"])
        assert torch.equal(_vector(got.state, "inner.step"), torch.tensor([7.0, 7.0]))
        got.state.discard()
        assert not got.state.path.exists()
        assert got.donor in (honest_a.peer_id, honest_b.peer_id)
        used.add(got.donor)
        if first == liar.peer_id:  # refused on the swarm's word, not the donor's, then another donor
            assert any(liar.peer_id in f and "hashes to" in f for f in got.failures), got.failures
        if first == empty.peer_id:
            assert any(empty.peer_id in f and "no state" in f for f in got.failures), got.failures
    assert used == {honest_a.peer_id, honest_b.peer_id}  # newcomers do not all hammer one donor


@pytest.mark.timeout(60)
def test_a_download_is_checked_as_a_whole_momentum_and_schedule_included():
    """Donors that serve the agreed θ but another outer momentum, or an implausible schedule
    position, are refused; the blob is checked against its announced hash before it is parsed."""
    peers = st.start_peers(4, "elastic-whole")
    try:
        momentum_liar, schedule_liar, honest, joiner = peers
        gen = torch.Generator().manual_seed(5)
        master, momentum = torch.randn(NUMEL, generator=gen), torch.randn(NUMEL, generator=gen)
        good = TrainingState(STEP, params_sha256(master), master, momentum, inner_step=40)
        honest.publish_state(good)
        momentum_liar.publish_state(
            TrainingState(STEP, good.params_sha256, master, momentum * 2, inner_step=40)
        )
        schedule_liar.publish_state(
            TrainingState(STEP, good.params_sha256, master, momentum, inner_step=10**9)
        )
        sha, state = good.params_sha256, good.state_sha256
        st.announce_step(
            peers, STEP, hashes=[sha, sha, sha, ""], state_hashes=[state, state, state, ""], inner_step=40
        )
        seen = set()
        for seed in range(40):
            got = joiner.download_state(numel=NUMEL, want_inner=False, rng=random.Random(seed))
            assert got is not None and got.donor == honest.peer_id
            assert torch.equal(_vector(got.state, "momentum"), momentum) and got.state.inner_step == 40
            got.state.discard()
            seen |= {f.split(":")[0] for f in got.failures}
            if seen >= {momentum_liar.peer_id, schedule_liar.peer_id}:
                break
        reasons = " ".join(got.failures)
        assert seen >= {momentum_liar.peer_id, schedule_liar.peer_id}, seen
        assert "outer momentum or step does not match" in reasons or "schedule position" in reasons
    finally:
        for peer in peers:
            peer.shutdown()


@pytest.mark.timeout(60)
def test_a_reducer_that_vanishes_mid_round_has_its_slice_taken_over():
    peers = st.start_peers(3, "elastic-takeover", allreduce_timeout=4.0, min_group_size=3)
    try:
        st.announce_step(peers, 1)
        victim = peers[1]
        victim.fault = faults.stall(30.0)  # it joins the group, then sends nothing
        gen = torch.Generator().manual_seed(1)
        vectors = [torch.randn(30_000, generator=gen) for _ in peers]
        results: list = [None] * 3

        def one(i):
            results[i] = peers[i].all_reduce(outer_step=1, vector=vectors[i], weight=100.0 * (i + 1))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # the group is formed and the victim's parts are on hold
        started = time.monotonic()
        victim.shutdown()  # gone: its streams break, as when the process is killed
        for t in threads:
            t.join(timeout=30)
        survivors = [results[0], results[2]]
        assert all(r is not None and r.group_size == 3 for r in survivors), [peers[0].last_error]
        assert time.monotonic() - started < 4.0 + 2.0  # within allreduce_timeout (plus slack)
        assert torch.equal(survivors[0].average, survivors[1].average)  # bit-identical
        assert victim.peer_id in survivors[0].excluded
        order = [m for m in survivors[0].members if m != victim.peer_id]
        vec = {p.peer_id: v for p, v in zip(peers, vectors, strict=True)}
        wts = {p.peer_id: 100.0 * (i + 1) for i, p in enumerate(peers)}
        assert torch.equal(survivors[0].average, st.reference_mean(vec, wts, order))
    finally:
        for peer in peers:
            peer.shutdown()


@pytest.mark.timeout(60)
def test_a_failed_round_is_retried_with_a_fresh_group_not_the_dead_one():
    peers = st.start_peers(2, "elastic-retry", allreduce_timeout=3.0)
    try:
        st.announce_step(peers, 1)
        leader, victim = sorted(peers, key=lambda p: p.peer_id)  # the smallest id leads step 1
        victim.fault = faults.stall(30.0)
        out = {}
        thread = threading.Thread(
            target=lambda: out.update(v=victim.all_reduce(outer_step=1, vector=torch.ones(100), weight=5.0))
        )
        thread.start()
        first = threading.Thread(
            target=lambda: out.update(l=leader.all_reduce(outer_step=1, vector=torch.ones(100), weight=5.0))
        )
        first.start()
        time.sleep(1.5)
        victim.shutdown()
        first.join(timeout=30)
        thread.join(timeout=30)
        assert out["l"] is None  # one survivor cannot take the lost slice over: the round failed
        # the leader tries step 1 again, with the same weight: a new group, not the frozen one
        again = leader.all_reduce(outer_step=1, vector=torch.ones(100), weight=5.0)
        assert again is not None and again.members == [leader.peer_id], leader.last_error
        assert again.group_id != ""
    finally:
        for peer in peers:
            peer.shutdown()


@pytest.mark.timeout(30)
def test_interrupt_gives_up_a_blocking_round_at_once():
    (peer,) = st.start_peers(1, "elastic-interrupt", min_group_size=2, matchmaking_timeout=60.0)
    try:
        st.announce_step([peer], 1)
        out = {}
        thread = threading.Thread(
            target=lambda: out.update(r=peer.all_reduce(outer_step=1, vector=torch.ones(10), weight=1.0))
        )
        thread.start()
        time.sleep(1.0)  # waiting for a partner that never comes
        started = time.monotonic()
        peer.interrupt()
        thread.join(timeout=10)
        assert not thread.is_alive() and out["r"] is None
        assert time.monotonic() - started < 1.0
        assert "shutting down" in peer.last_error
    finally:
        peer.shutdown()


def _rec(step: int, sha: str = "", tokens: int = 0, client: bool = False) -> ProgressRecord:
    return ProgressRecord("x", step, tokens, 0.0, None, sha, client, 0.0)


H1, H2 = "1" * 64, "2" * 64


def test_out_of_sync_rules():
    # behind: the others' median step is ahead; one peer claiming a huge step does not count
    recs = {"a": _rec(5, H1), "b": _rec(5, H1), "c": _rec(10**6, H2), "me": _rec(4, H2)}
    assert "the swarm is at outer step 5, this peer at 4" == out_of_sync(recs, "me", 4, H2, check_hash=True)
    assert out_of_sync({"a": _rec(4), "b": _rec(10**6)}, "me", 4, "", check_hash=True) is None
    # diverged: at our step most records hold another θ (our own vote counts)
    recs = {"a": _rec(5, H1), "b": _rec(5, H1), "me": _rec(5, H2)}
    assert "differs" in out_of_sync(recs, "me", 5, H2, check_hash=True)
    assert out_of_sync(recs, "me", 5, H1, check_hash=True) is None
    # a tie goes to the smaller hash, the same on both sides: exactly one of the two re-downloads
    assert out_of_sync({"a": _rec(5, H1)}, "me", 5, H2, check_hash=True) is not None
    assert out_of_sync({"a": _rec(5, H2)}, "me", 5, H1, check_hash=True) is None
    # ahead of the others, alone, or before any hash: nothing to download
    assert out_of_sync({"a": _rec(3, H1)}, "me", 5, H2, check_hash=True) is None
    assert out_of_sync({}, "me", 5, H2, check_hash=True) is None
    assert agreed_hash({"a": _rec(5, H2), "b": _rec(5, H2), "c": _rec(5, H1)}, 5) == H2
    # donors: full peers at the swarm's step holding the agreed hash
    recs = {"a": _rec(5, H1), "b": _rec(5, H1, client=True), "c": _rec(5, H2), "d": _rec(4, H1)}
    found = donors(recs, "me", random.Random(0))
    assert (found.step, found.params_sha256, found.peers) == (5, H1, ["a"])
