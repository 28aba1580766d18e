"""A private run (``swarm.private``) hears nobody outside its list, even an outsider that copies its
fingerprint: its records are ignored, its joins and parts refused, and it gets no state."""

import random

import pytest
import torch

from p2p_trainer.contracts import params_sha256
from p2p_trainer.swarm import SwarmError, SwarmPeer, TrainingState
from p2p_trainer.swarm.identity import load_identity
from p2p_trainer.testing import swarm as st

pytestmark = pytest.mark.timeout(90)
FINGERPRINT = {"run": "private-test"}


def test_outsiders_are_refused_records_rounds_and_downloads(tmp_path):
    keys = [tmp_path / f"p{i}.key" for i in range(3)]
    ids = [load_identity(str(k)).peer_id for k in keys]
    allowed = ids[:2]
    peers = []
    try:
        first = SwarmPeer(
            st.local_config("private-test", identity=str(keys[0]), private=allowed), FINGERPRINT
        )
        peers.append(first)
        via = first.visible_maddrs
        peers.append(
            SwarmPeer(
                st.local_config("private-test", via, identity=str(keys[1]), private=allowed), FINGERPRINT
            )
        )
        # the outsider copies the fingerprint but is not in the list (its own config says: open run)
        outsider = SwarmPeer(st.local_config("private-test", via, identity=str(keys[2])), FINGERPRINT)
        peers.append(outsider)
        master = torch.randn(1000)
        for peer in peers[:2]:
            peer.publish_state(TrainingState(3, params_sha256(master), master, None, inner_step=0))
        st.announce_step(peers[:2], 3, hashes=[params_sha256(master)] * 2)
        outsider.publish_progress(outer_step=3, tokens=0, tokens_per_s=0.0, loss=1.0, params_sha256="")
        # the outsider sees the insiders (DHT reads are open) but they never see it
        for _ in range(40):
            if set(outsider.swarm_records()) >= set(allowed):
                break
        assert set(outsider.swarm_records()) >= set(allowed)
        assert ids[2] not in peers[0].swarm_records() and ids[2] not in peers[1].swarm_records()
        # its download is refused (insiders close its streams), and its round finds no group with them
        assert outsider.download_state(numel=1000, want_inner=False, rng=random.Random(0)) is None
        results = st.run_round(
            peers, 3, [torch.ones(1000), torch.zeros(1000), torch.full((1000,), 99.0)], [1.0] * 3
        )
        assert (
            results[0] is not None
            and results[0].members == results[1].members
            and ids[2] not in results[0].members
        )
        assert results[2] is None or ids[0] not in results[2].members
        assert torch.equal(results[0].average, torch.full((1000,), 0.5))
        # and a peer that is not on the list cannot take part at all
        with pytest.raises(SwarmError, match="not in swarm.private"):
            SwarmPeer(st.local_config("private-test", via, private=allowed), FINGERPRINT)
    finally:
        for peer in peers:
            peer.shutdown()
