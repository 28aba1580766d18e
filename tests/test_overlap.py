"""The overlapped outer step and error feedback, on real swarm peers (127.0.0.1) with real inner
loops: the round of step s runs while step s+1's inner steps compute, its average lands one boundary
late, the masters stay bit-identical, ``eager`` starts each peer from its own look-ahead and measures
the next pseudo-gradient from there, and error feedback keeps what the codec did not send."""

import threading

import pytest
import torch

from p2p_trainer.config import InnerConfig, ModelConfig, OuterConfig
from p2p_trainer.inner import InnerLoop
from p2p_trainer.model import build_model
from p2p_trainer.outer_sync import OuterSync
from p2p_trainer.ranks import LocalRanks
from p2p_trainer.testing import swarm as st

pytestmark = pytest.mark.timeout(120)
MODEL = ModelConfig(
    hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seq_len=16
)
CPU = LocalRanks(0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def peers():
    swarm = st.start_peers(2, "overlap-test", codec="int8", min_group_size=2, recheck=0.0)
    yield swarm
    for peer in swarm:
        peer.shutdown()


def _outer(peer, overlap: str, error_feedback: bool = False, ef_decay: float = 1.0) -> OuterSync:
    inner = InnerLoop(
        build_model(MODEL, 50, seed=0), InnerConfig(total_steps=100, warmup_steps=0, decay_steps=0), 4
    )
    cfg = OuterConfig(overlap=overlap, ef_decay=ef_decay)
    return OuterSync(CPU, inner, peer, cfg, error_feedback=error_feedback)


def _boundary(peers, outers, step, seed, *, last=False):
    """A few inner steps on each peer, then both sync at once (as two processes would)."""
    st.announce_step(peers, step)
    reports, ends = [None, None], [None, None]

    def one(i):
        gen = torch.Generator().manual_seed(seed * 10 + i)
        for _ in range(3):
            outers[i].inner.step(torch.randint(0, 50, (4, MODEL.seq_len + 1), generator=gen))
        ends[i] = outers[i].inner.export_params()
        reports[i] = outers[i].sync(step, 1000.0, last=last)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return reports, ends


@pytest.mark.parametrize("overlap", ["delayed", "eager"])
def test_the_average_lands_one_boundary_late_and_the_masters_stay_identical(peers, overlap):
    outers = [_outer(p, overlap) for p in peers]
    base = 10 if overlap == "delayed" else 20
    masters, started = [], None
    for k in range(4):
        reports, ends = _boundary(peers, outers, base + k, k, last=k == 3)
        if overlap == "eager" and k > 0:  # the round's part is the phase's progress from where it began
            for o, s, e in zip(outers, started, ends, strict=True):
                assert torch.allclose(o.state.delta, s - e, atol=1e-6)
        assert all(r.advanced for r in reports) and all(o.diloco.outer_step == k + 1 for o in outers)
        assert all(r.applied == (k > 0) for r in reports), (k, [r.error for r in reports])
        assert torch.equal(outers[0].diloco.master, outers[1].diloco.master)
        assert outers[0].diloco.committed_sha256 == outers[1].diloco.committed_sha256
        masters.append(outers[0].diloco.master.clone())
        started = [o.inner.export_params() for o in outers]
        master = outers[0].diloco.master
        if overlap == "delayed" or k == 3:  # from θ itself (the last boundary starts no round)
            assert all(torch.equal(s, master) for s in started)
        else:  # eager: θ moved on by the peer's own pseudo-gradient in flight, at 3/4 of the outer lr
            assert not torch.equal(started[0], started[1])
            for o, s in zip(outers, started, strict=True):
                assert torch.allclose(s, master - 0.75 * o.outer_lr * o.state.delta, atol=1e-7)
                assert float(o.state.delta.norm()) > 0
    assert torch.equal(masters[0], outers[0].diloco.master) is False
    assert outers[0]._in_flight is None  # the last boundary started no round it could never apply


def test_error_feedback_keeps_what_the_codec_did_not_send(peers):
    outers = [_outer(p, "none", error_feedback=True) for p in peers]
    for k in range(2):
        reports, _ = _boundary(peers, outers, 40 + k, k)
        assert all(r.applied for r in reports)
        for o in outers:  # int8 rounds what it sends: the residual is that rounding, small but not zero
            assert o.residual is not None and 0 < float(o.residual.abs().max()) < 1e-2
    assert torch.equal(outers[0].diloco.master, outers[1].diloco.master)


@pytest.mark.parametrize("overlap", ["none", "delayed"])
def test_error_feedback_takes_back_what_the_average_dropped(overlap):
    """What we sent where the applied average is zero (a sparse reducer kept other entries) comes
    back into the residual; where the average is not zero only the codec's own loss stays."""
    state = _outer(None, overlap, error_feedback=True).state
    pump, n = state.pump, state.numel
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in state.inner.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))  # the phase's progress: part = θ - model
    part = state.diloco.master - torch.cat([p.detach().flatten() for p in state.inner.model.parameters()])
    sent = torch.where(torch.rand(n, generator=gen) < 0.3, part.round(decimals=1), 0.0)
    average = torch.where(torch.rand(n, generator=gen) < 0.5, torch.randn(n, generator=gen), 0.0)
    dropped = (average == 0) & (sent != 0)
    assert 0 < int(dropped.sum()) < int((sent != 0).sum())
    try:
        if overlap == "none":
            pump.write("sent", 0, n, sent)
            pump.call("ef_blocking")
        else:
            pump.call("snapshot")
            pump.write("sent", 0, n, sent)
            pump.call("ef_overlap", 1.0)
            pump.call("snapshot")  # the next round's part takes the unsent rest along
            assert torch.allclose(state.part, part - sent + state.delta, atol=1e-6)
        pump.write("apply", 0, n, average)
        pump.call("end_step")
        back = torch.where(average == 0, sent, 0.0)
        # blocking: the unsent rest and what comes back; overlapped: the rest left with the next part
        expected = part - sent + back if overlap == "none" else back
        assert torch.allclose(state.residual, expected, atol=1e-6)
        assert state.returning is None  # until the next applied round
    finally:
        state.close()


@pytest.mark.parametrize("overlap", ["none", "delayed"])
def test_error_feedback_decay_carries_its_share_of_the_residual_into_the_next_part(overlap):
    """``outer.ef_decay``: the next round's part is the pseudo-gradient plus that share of what waited."""
    state = _outer(None, overlap, error_feedback=True, ef_decay=0.5).state
    pump, n = state.pump, state.numel
    gen = torch.Generator().manual_seed(4)
    try:
        with torch.no_grad():
            for p in state.inner.model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        model = torch.cat([p.detach().flatten() for p in state.inner.model.parameters()])
        delta = state.diloco.master - model
        waiting = torch.randn(n, generator=gen)
        pump.write("residual", 0, n, waiting)
        if overlap == "none":  # a blocking round reads its part as it sends it
            part = pump.read("part", 0, n)
        else:  # an overlapped round takes its part at the boundary, the residual with it
            pump.call("snapshot")
            part = state.part
            assert state.residual is None
        assert torch.allclose(part, delta + 0.5 * waiting, atol=1e-6)
        assert not torch.allclose(part, delta + waiting, atol=1e-3)
    finally:
        state.close()
