"""Fault hooks: functions of the part a peer is about to send (``OutgoingPart``), given to
``SwarmPeer(fault=...)``. They act on every part the peer sends, its own slice included.
``parse`` turns a command-line spec (``stall:3``, ``nan``, ...) into one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from p2p_trainer.swarm.allreduce import Fault, OutgoingPart


def nan_values(part: OutgoingPart) -> OutgoingPart:
    """Send NaN where the values should be (fp32 layout: raw little-endian float32)."""
    return replace(
        part, corrupt=lambda payload, values: np.full(values.numel(), np.nan, dtype="<f4").tobytes()
    )


def wrong_size(part: OutgoingPart) -> OutgoingPart:
    """Send chunks with half the bytes they should have."""
    return replace(part, corrupt=lambda payload, values: payload[: len(payload) // 2])


def absurd_weight(part: OutgoingPart) -> OutgoingPart:
    """Claim 1e12 tokens for this round."""
    return replace(part, weight=1e12)


def stall(seconds: float) -> Fault:
    """Send every part ``seconds`` late."""
    return lambda part: replace(part, delay_s=seconds)


def only(fault: Fault, when: Callable[[OutgoingPart], bool]) -> Fault:
    """Apply ``fault`` only to the parts for which ``when`` is true."""
    return lambda part: fault(part) if when(part) else part


_SIMPLE: dict[str, Fault] = {"nan": nan_values, "wrong_size": wrong_size, "absurd_weight": absurd_weight}
_WITH_SECONDS: dict[str, Callable[[float], Fault]] = {"stall": stall}


def parse(spec: str) -> Fault:
    """``name`` or ``name:seconds``; ValueError naming the choices otherwise."""
    name, _, arg = spec.partition(":")
    if name in _SIMPLE and not arg:
        return _SIMPLE[name]
    if name in _WITH_SECONDS and arg:
        try:
            return _WITH_SECONDS[name](float(arg))
        except ValueError:
            pass
    choices = [*_SIMPLE, *(f"{n}:SECONDS" for n in _WITH_SECONDS)]
    raise ValueError(f"unknown fault {spec!r}; choices: {', '.join(choices)}")
