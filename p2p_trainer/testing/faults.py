"""Fault hooks: functions of the part a peer is about to send (``OutgoingPart``), given to
``SwarmPeer(fault=...)``. They act on every part the peer sends, its own slice included.
``parse`` turns a command-line spec (``stall:3``, ``nan``, ...) into one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from p2p_trainer.codec import Codec
from p2p_trainer.swarm.parts import Fault, OutgoingPart
from p2p_trainer.swarm.peer import SwarmPeer
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


# ---- a hostile member for end-to-end tests: one attack per round ----
ATTACKS = ("huge", "sign_flip_x10", "weight_x1e6", "nan", "stale_5_rounds", "noise")


class Attacker:
    """The fault hook of a member that attacks in round ``r`` with ``attacks[r % len(attacks)]``:
    huge values (x1e4), a sign flip x10, a weight claim x1e6 (with its part's sign flipped: the
    heaviest claim pulling the other way; see ``HostilePeer``), NaN, its part of 5 rounds ago, or
    random noise of its part's norm."""

    def __init__(self, attacks: list[str]) -> None:
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown or not attacks:
            raise ValueError(f"unknown attack(s) {unknown or attacks}; choices: {', '.join(ATTACKS)}")
        self.attacks = attacks
        self._past: dict[tuple[int, int], list[torch.Tensor]] = {}

    @classmethod
    def from_spec(cls, spec: str) -> Attacker:
        return cls([a.strip() for a in spec.split(",") if a.strip()])

    def attack(self, outer_step: int) -> str:
        return self.attacks[outer_step % len(self.attacks)]

    def __call__(self, part: OutgoingPart) -> OutgoingPart:
        values = part.values.clone()
        past = self._past.setdefault((part.slice_index, values.numel()), [])
        past.append(values)
        del past[:-6]
        attack = self.attack(part.outer_step)
        if attack == "huge":
            return part.with_values(values * 1e4)
        if attack in ("sign_flip_x10", "weight_x1e6"):
            return part.with_values(values * (-10.0 if attack == "sign_flip_x10" else -1.0))
        if attack == "nan":
            return nan_values(part)
        if attack == "stale_5_rounds":
            return part.with_values(past[0] if len(past) < 6 else past[-6])
        noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(part.outer_step))
        return part.with_values(noise * (values.norm() / max(values.numel(), 1) ** 0.5))

    def weight_factor(self, outer_step: int) -> float:
        return 1e6 if self.attack(outer_step) == "weight_x1e6" else 1.0


class HostilePeer(SwarmPeer):
    """A swarm peer that attacks with ``attacker``; its weight claim is made where an attacker makes
    it, when it joins the group (so its parts agree with it)."""

    def __init__(self, cfg, fingerprint, *, attacker: Attacker) -> None:
        self.attacker = attacker
        super().__init__(cfg, fingerprint, fault=attacker)

    def start_all_reduce(self, *, outer_step: int, weight: float, **kwargs):
        weight = weight * self.attacker.weight_factor(outer_step)
        return super().start_all_reduce(outer_step=outer_step, weight=weight, **kwargs)
