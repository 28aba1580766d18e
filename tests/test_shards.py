"""The canonical vector's layout over local ranks, and rank 0's pump over it (real gloo, 3 ranks)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from p2p_trainer.pump import Pump
from p2p_trainer.shards import Layout, gather_share, read_views, scatter_share
from tests.volunteers import free_port

pytestmark = pytest.mark.timeout(120)
SHAPES = [(5, 3), (5,), (1, 5), (1,), (7, 2), (0, 4), (130,)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_pieces_tile_the_vector_and_follow_fsdp_rows(world):
    layout = Layout(SHAPES, world)
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    assert layout.numel == numel and sum(layout.share_numel) == numel
    covered = torch.zeros(numel, dtype=torch.int64)
    for piece in layout.pieces:
        covered[piece.canon : piece.canon + piece.length] += 1
    assert torch.equal(covered, torch.ones(numel, dtype=torch.int64))
    canon = torch.arange(numel, dtype=torch.float32)
    params = list(canon.split([torch.Size(s).numel() for s in SHAPES]))
    params = [p.view(s) for p, s in zip(params, SHAPES, strict=True)]
    for rank in range(world):  # a rank's share is its torch.chunk rows of every parameter
        rows = [p.chunk(world)[rank] if rank < len(p.chunk(world)) else p[:0] for p in params]
        rows = [r.reshape(-1) for r in rows]
        share = gather_share(layout, rank, rows, torch.empty(layout.share_numel[rank]))
        assert torch.equal(share, torch.cat(rows))
        assert torch.equal(read_views(layout, rank, rows, 1, share.numel()), share[1:])
        back = [torch.zeros_like(r) for r in rows]
        scatter_share(layout, rank, share, back)
        assert all(torch.equal(a, b) for a, b in zip(back, rows, strict=True))


def test_windows_cut_at_any_offset():
    layout = Layout(SHAPES, 3)
    for lo in range(0, layout.numel, 7):
        for hi in (lo, lo + 1, lo + 13, layout.numel):
            got = layout.window(lo, min(hi, layout.numel))
            assert sum(b - a for _, a, b in got) == min(hi, layout.numel) - lo
    with pytest.raises(ValueError, match="outside"):
        layout.window(0, layout.numel + 1)


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    layout = Layout(SHAPES, world)
    canon = torch.arange(layout.numel, dtype=torch.float32)
    own = layout.own(rank)
    share = torch.cat([canon[p.canon : p.canon + p.length] for p in own]) if own else torch.empty(0)
    written = torch.zeros_like(share)
    pump = Pump(layout, rank, world)
    pump.provide("theta", read=lambda a, b: share[a:b].clone())
    pump.provide("theta", write=lambda a, b, v: written[a:b].copy_(v))
    pump.provide("broken", read=lambda a, b: 1 / 0)
    pump.start()
    if rank == 0:
        reads = [pump.read("theta", lo, min(lo + 11, layout.numel)) for lo in range(0, layout.numel, 11)]
        out["read"] = torch.cat(reads)
        for lo in range(0, layout.numel, 5):
            hi = min(lo + 5, layout.numel)
            pump.write("theta", lo, hi, -canon[lo:hi])
        if world > 1:
            out["broken"] = pump.read("broken", 0, layout.numel)
    pump.close()
    out[f"written{rank}"] = (written, -share)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 3])
def test_pump_reads_and_writes_canonical_windows(world):
    if world == 1:  # no process group: reads and writes are plain calls
        out = {}
        _worker(0, 1, 0, out)
    else:
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(_worker, args=(world, free_port(), out), nprocs=world, join=True)
            out = dict(out)
    numel = Layout(SHAPES, world).numel
    assert torch.equal(out["read"], torch.arange(numel, dtype=torch.float32))
    for rank in range(world):
        written, expected = out[f"written{rank}"]
        assert torch.equal(written, expected)
    if world > 1:  # a rank whose read fails sends NaN (no codec encodes it: the round fails, none hangs)
        assert out["broken"].isnan().all()
