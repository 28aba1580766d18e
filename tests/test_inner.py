import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from p2p_trainer.config import InnerConfig, ModelConfig
from p2p_trainer.inner import InnerLoop, causal_lm_loss, init_distributed
from p2p_trainer.model import build_model
from p2p_trainer.schedule import wsd_factor

pytestmark = pytest.mark.timeout(120)
MODEL = ModelConfig(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, seq_len=32
)
INNER = InnerConfig(lr=3e-3, warmup_steps=2, total_steps=10, decay_steps=2, z_loss=1e-4, grad_clip=0.5)
VOCAB, STEPS = 97, 4


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (8, MODEL.seq_len + 1), generator=g) for _ in range(STEPS)]


def _train(rank: int, world: int, micro: int) -> tuple[list[float], torch.Tensor]:
    """Losses of a few steps, then the held-out loss, and the final parameters."""
    model = build_model(MODEL, VOCAB, seed=1)
    loop = InnerLoop(model, INNER, micro_batch_size=micro, rank=rank, world=world)
    losses = [loop.step(b).loss for b in _batches()]
    return [*losses, loop.evaluate(_batches()[:2])], loop.export_params()


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    r, w, _ = init_distributed()
    assert (r, w) == (rank, world)
    # micro 2: accumulation on every rank; micro 8 (the whole batch): one micro-batch of 4 rows per rank
    out[rank] = {micro: _train(rank, world, micro) for micro in (2, 8)}
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_two_ranks_match_one_rank():
    single_losses, single_params = _train(0, 1, 2)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        for micro in (2, 8):
            losses, params = results[rank][micro]
            assert losses == pytest.approx(single_losses, rel=1e-4, abs=1e-5)
            torch.testing.assert_close(params, single_params, rtol=1e-4, atol=1e-5)
    assert single_losses[STEPS - 1] < single_losses[0]


def test_wsd_schedule_shapes():
    cfg = InnerConfig(
        warmup_steps=10, total_steps=100, decay_steps=20, min_lr_ratio=0.1, decay_shape="linear"
    )
    assert wsd_factor(0, cfg) == pytest.approx(0.1)
    assert wsd_factor(9, cfg) == pytest.approx(1.0)
    assert wsd_factor(50, cfg) == 1.0
    assert wsd_factor(90, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert wsd_factor(100, cfg) == pytest.approx(0.1)
    sqrt_cfg = InnerConfig(warmup_steps=10, total_steps=100, decay_steps=20, decay_shape="1-sqrt")
    assert wsd_factor(85, sqrt_cfg) == pytest.approx(1 - 0.25**0.5)


def test_z_loss_adds_normaliser_penalty():
    logits = torch.randn(2, 5, 11) + 3.0
    targets = torch.randint(0, 11, (2, 5))
    plain, ce = causal_lm_loss(logits, targets, 0.0)
    with_z, ce2 = causal_lm_loss(logits, targets, 0.1)
    assert torch.equal(ce, ce2) and torch.equal(plain, ce)
    expected = ce + 0.1 * torch.logsumexp(logits.flatten(0, 1), -1).pow(2).mean()
    torch.testing.assert_close(with_z, expected)


def test_gradient_clipping_bounds_the_gradient():
    model = build_model(MODEL, VOCAB, seed=1)
    loop = InnerLoop(model, InnerConfig(grad_clip=1e-3, warmup_steps=0, decay_steps=0), micro_batch_size=8)
    loss, _ = loop._forward_loss(_batches()[0])
    loss.backward()
    raw = loop._clip()
    clipped = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert raw > 1e-2 and clipped == pytest.approx(1e-3, rel=1e-3)


def test_export_import_round_trip():
    model = build_model(MODEL, VOCAB, seed=1)
    loop = InnerLoop(model, INNER, micro_batch_size=8)
    flat = loop.export_params()
    loop.import_params(torch.zeros_like(flat))
    assert loop.export_params().abs().sum() == 0
    loop.import_params(flat)
    assert torch.equal(loop.export_params(), flat)
    with pytest.raises(ValueError, match="values"):
        loop.import_params(torch.zeros(flat.numel() + 1))
