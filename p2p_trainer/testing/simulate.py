"""DiLoCo with several workers in one process, averaged exactly as the swarm's reducers average
(the codec on both legs, one slice per worker, the same aggregation code), for the tests and
benchmarks that need many runs: the attack matrix, convergence. A hostile worker trains like the
others, then sends something else (see ``ATTACKS``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from p2p_trainer.codec import Codec, get_codec
from p2p_trainer.config_file import load_config
from p2p_trainer.data import TokenStream, build_tokenizer, eval_batches
from p2p_trainer.diloco import DiLoCo
from p2p_trainer.inner import InnerLoop
from p2p_trainer.model import build_model
from p2p_trainer.swarm import aggregation
from p2p_trainer.swarm.combine import combine
from p2p_trainer.swarm.partition import slice_bounds


def swarm_average(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    codec: Codec,
    mode: str = "mean",
    tau: float = 2.0,
    raw: dict[int, Callable[[int, int], bytes]] | None = None,
    return_codec: Codec | None = None,
) -> torch.Tensor:
    """decode(encode(combine(decode(encode(Δ_j))))) slice by slice, as the reducers compute it;
    ``raw[j](lo, hi)`` replaces worker j's encoded part of a slice with any bytes; ``return_codec``
    (default ``codec``) encodes the average that goes back."""
    if mode != "mean":
        weights = aggregation.bounded_weights(weights)
    numel = deltas[0].numel()
    out = torch.empty(numel)
    for lo, hi in slice_bounds(numel, len(deltas)):
        parts = [
            (str(j), w, (raw or {}).get(j, lambda lo, hi, d=d: codec.encode(d[lo:hi].contiguous()))(lo, hi))
            for j, (d, w) in enumerate(zip(deltas, weights, strict=True))
        ]
        outcome = combine(codec, mode, tau, parts, hi - lo)
        back = return_codec or codec
        out[lo:hi] = back.decode(back.encode(outcome.average), hi - lo)
    return out


@dataclass
class Sent:
    delta: torch.Tensor
    weight: float
    raw: Callable[[int, int], bytes] | None = None


# attack -> (the hostile worker's own Δ, the Δs it sent before, its honest weight) -> what it sends
ATTACKS: dict[str, Callable[[torch.Tensor, list[torch.Tensor], float], Sent]] = {
    "huge": lambda d, past, w: Sent(d * 1e4, w),
    "sign_flip_x10": lambda d, past, w: Sent(d * -10.0, w),
    "weight_x1e6": lambda d, past, w: Sent(-d, w * 1e6),  # the heaviest claim, pulling the other way
    "nan": lambda d, past, w: Sent(d, w, lambda lo, hi: np.full(hi - lo, np.nan, "<f4").tobytes()),
    "stale_5_rounds": lambda d, past, w: Sent(past[-5] if len(past) >= 5 else past[0], w),
    "noise": lambda d, past, w: Sent(
        torch.randn(d.shape, generator=torch.Generator().manual_seed(len(past)))
        * (d.norm() / d.numel() ** 0.5),
        w,
    ),
}

TINY = {
    "model.hidden_size": 64,
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.intermediate_size": 128,
    "model.seq_len": 64,
    "data.batch_size": 8,
    "data.micro_batch_size": 8,
    "inner.warmup_steps": 5,
    "inner.total_steps": 400,
    "inner.decay_steps": 0,
}


def run_diloco(
    *,
    workers: int = 4,
    rounds: int = 8,
    h: int = 5,
    attack: str | None = None,
    mode: str = "mean",
    tau: float = 2.0,
    codec: str = "fp32",
    seed: int = 0,
) -> float:
    """Held-out loss of θ after ``rounds`` outer steps of ``workers`` workers (the last one hostile
    with ``attack``), the debug data and a tiny model; every worker and the outer step run here."""
    cfg = load_config("debug", {**TINY, "outer.lr": 0.7, "outer.momentum": 0.9})
    tok = build_tokenizer(cfg.data)
    model = build_model(cfg.model, len(tok), seed=cfg.inner.seed)
    loops = [
        InnerLoop(
            model if i == 0 else build_model(cfg.model, len(tok), seed=cfg.inner.seed),
            cfg.inner,
            cfg.data.micro_batch_size,
        )
        for i in range(workers)
    ]
    streams = [
        TokenStream(cfg.data, tok, cfg.model.seq_len, peer_seed=1000 * seed + i) for i in range(workers)
    ]
    held_out = eval_batches(cfg.data, tok, cfg.model.seq_len)[:4]
    diloco, wire = DiLoCo(loops[0].export_params(), cfg.outer), get_codec(codec)
    past: list[torch.Tensor] = []
    for _ in range(rounds):
        deltas, weights, raw = [], [], {}
        for j, (loop, stream) in enumerate(zip(loops, streams, strict=True)):
            for _ in range(h):
                loop.step(stream.next_batch())
            delta, weight = diloco.pseudo_gradient(loop.export_params()), float(h * 8 * 64)
            if attack is not None and j == workers - 1:
                past.append(delta)
                sent = ATTACKS[attack](delta, past, weight)
                delta, weight = sent.delta, sent.weight
                if sent.raw is not None:
                    raw[j] = sent.raw
            deltas.append(delta)
            weights.append(weight)
        average = swarm_average(deltas, weights, codec=wire, mode=mode, tau=tau, raw=raw)
        if torch.isfinite(average).all():
            theta = diloco.apply(average)
            for loop in loops:
                loop.import_params(theta)
    loss = loops[0].evaluate(held_out)
    return loss if np.isfinite(loss) else float("inf")
