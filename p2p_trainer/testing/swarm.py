"""Several swarm peers on 127.0.0.1 in one process, for tests and benchmarks: loopback configs with
short timeouts, starting peers, running one round on all of them at once, the reference mean."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from p2p_trainer.config import SwarmConfig
from p2p_trainer.contracts import RoundResult
from p2p_trainer.swarm.peer import SwarmPeer

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def local_config(run_id: str, initial_peers: Sequence[str] = (), **overrides: Any) -> SwarmConfig:
    """A loopback config with timeouts short enough for tests."""
    values: dict[str, Any] = dict(
        run_id=run_id,
        initial_peers=list(initial_peers),
        host_maddrs=list(LOOPBACK),
        codec="fp32",
        min_group_size=1,
        matchmaking_timeout=5.0,
        allreduce_timeout=5.0,
        join_timeout=10.0,
    )
    values.update(overrides)
    return SwarmConfig(**values)


def start_peers(
    n: int,
    run_id: str,
    *,
    initial_peers: Sequence[str] = (),
    fingerprint: dict | None = None,
    client_mode: Sequence[bool] = (),
    **overrides: Any,
) -> list[SwarmPeer]:
    """Start ``n`` peers one after another; each joins through the first (or ``initial_peers``)."""
    peers: list[SwarmPeer] = []
    try:
        for i in range(n):
            through = list(initial_peers) or (peers[0].visible_maddrs if peers else [])
            client = bool(client_mode[i]) if i < len(client_mode) else False
            cfg = local_config(run_id, through, client_mode=client, **overrides)
            peers.append(SwarmPeer(cfg, fingerprint if fingerprint is not None else {"run": run_id}))
    except BaseException:
        for peer in peers:
            peer.shutdown()
        raise
    return peers


def announce_step(
    peers: Sequence[SwarmPeer],
    step: int,
    *,
    tokens: int = 0,
    hashes: Sequence[str] = (),
    state_hashes: Sequence[str] = (),
    inner_step: int = 0,
    timeout: float = 20.0,
) -> None:
    """Publish progress at ``step`` on every peer (with the θ and state hashes of ``hashes`` and
    ``state_hashes``, if given) and wait until each one sees all of them there (a training loop does
    this while it trains, long before the round ends)."""
    for i, peer in enumerate(peers):
        peer.publish_progress(
            outer_step=step,
            tokens=tokens,
            tokens_per_s=0.0,
            loss=1.0,
            params_sha256=hashes[i] if hashes else "",
            state_sha256=state_hashes[i] if state_hashes else "",
            inner_step=inner_step,
        )
    ids = {p.peer_id for p in peers}
    deadline = time.monotonic() + timeout
    for peer in peers:
        while True:
            records = peer.swarm_records()
            if all(pid in records and records[pid].outer_step == step for pid in ids):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{peer.peer_id} does not see every peer at outer step {step}: {records}")
            time.sleep(0.05)


def run_round(
    peers: Sequence[SwarmPeer],
    step: int,
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    outs: Sequence[torch.Tensor | None] = (),
) -> list[RoundResult | None]:
    """``all_reduce`` on every peer at once (one thread each), as separate processes would; each
    peer's average into ``outs[i]`` when given."""
    results: list[RoundResult | None] = [None] * len(peers)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            out = outs[i] if outs else None
            results[i] = peers[i].all_reduce(outer_step=step, vector=vectors[i], weight=weights[i], out=out)
        except BaseException as e:  # surfaced in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), name=f"round-{i}") for i in range(len(peers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def reference_mean(
    vectors: dict[str, torch.Tensor], weights: dict[str, float], order: Sequence[str]
) -> torch.Tensor:
    """The fp32 weighted mean in the group's order, with the reducers' arithmetic."""
    acc = torch.zeros_like(next(iter(vectors.values())))
    for peer_id in order:
        acc.add_(vectors[peer_id] * weights[peer_id])
    return acc.div_(sum(weights[p] for p in order))
