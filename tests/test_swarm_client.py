"""A client-mode peer (outgoing connections only) contributes its tokens to rounds, reduces no slice,
and ends with the same bytes as the full peers."""

import pytest
import torch

from p2p_trainer.testing import swarm as st


@pytest.fixture(scope="module")
def peers():
    # recheck 0: the byte counts below are those of the plain protocol, without re-check copies
    swarm = st.start_peers(3, "client-test", client_mode=[False, False, True], min_group_size=2, recheck=0.0)
    yield swarm
    for peer in swarm:
        peer.shutdown()


@pytest.mark.timeout(60)
def test_client_tokens_count_and_results_are_bitwise_equal(peers):
    numel = 40_000
    gen = torch.Generator().manual_seed(3)
    vectors = [torch.randn(numel, generator=gen) for _ in peers]
    weights = [1000.0, 1000.0, 2000.0]  # the client did half of this round's tokens
    client = peers[2]
    for step in (1, 2):
        st.announce_step(peers, step)
        records = peers[0].swarm_records()
        assert records[client.peer_id].client_mode and not records[peers[0].peer_id].client_mode
        results = st.run_round(peers, step, vectors, weights)

        assert all(r is not None and r.group_size == 3 for r in results)
        order = results[0].members
        assert order[-1] == client.peer_id  # full peers first: the client reduces no slice
        vec = {p.peer_id: v for p, v in zip(peers, vectors, strict=True)}
        wts = {p.peer_id: w for p, w in zip(peers, weights, strict=True)}
        expected = st.reference_mean(vec, wts, order)
        for r in results:
            assert torch.equal(r.average, expected)
            assert r.total_weight == sum(weights)
        # the client only sends its parts and reads the averages back on the same streams
        assert abs(results[2].bytes_sent - 4 * numel) / (4 * numel) < 0.05
        assert abs(results[2].bytes_received - 4 * numel) / (4 * numel) < 0.05
