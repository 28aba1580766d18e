"""Fault hooks: functions of the part a peer is about to send (``OutgoingPart``), given to
``SwarmPeer(fault=...)``. They act on every part the peer sends, its own slice included.
``parse`` turns a command-line spec (``stall:3``, ``nan``, ...) into one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from p2p_trainer.codec import Codec
from p2p_trainer.swarm.allreduce import Fault, OutgoingPart
from p2p_trainer.swarm.reducer import ReducerFault


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


# ---- a lying reducer (``SwarmPeer(reducer_fault=...)``): what it sends back instead of the average ----
def wrong_average(codec: Codec, factor: float) -> ReducerFault:
    """Send every member the same wrong average: the true one times ``factor``."""

    def hook(member: str, chunk: int, reply: bytes) -> bytes:
        values = codec.decode(reply, _numel(codec, reply))
        return codec.encode(values * factor)

    return hook


def equivocate(codec: Codec, victims: Callable[[str], bool]) -> ReducerFault:
    """Send the members for which ``victims`` is true another average (the true one negated)."""
    lie = wrong_average(codec, -1.0)
    return lambda member, chunk, reply: lie(member, chunk, reply) if victims(member) else reply


def _numel(codec: Codec, payload: bytes) -> int:
    """How many values a payload of our codecs holds (fp32: raw; int8: the u64 after the magic)."""
    return len(payload) // 4 if codec.name == "fp32" else int.from_bytes(payload[8:16], "little")
