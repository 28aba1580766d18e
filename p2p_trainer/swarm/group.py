"""The frozen, ordered group of one round: what every member must agree on (its id, step, vector
size, chunk size and ordered members, compared through ``digest``), its wire form, and the rule for
a claimed token weight. Formed by ``matchmaking``; read by every part of the all-reduce."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from p2p_trainer.swarm.messages import GroupInfo, MemberInfo, ProtocolError


@dataclass(frozen=True)
class Member:
    peer_id: str
    weight: float
    client_mode: bool


@dataclass(frozen=True)
class Group:
    group_id: str
    outer_step: int
    numel: int
    chunk: int  # values per streamed chunk of the all-reduce (the leader's setting)
    members: tuple[Member, ...]  # the agreed order: full peers by id, then client peers by id

    @property
    def reducers(self) -> tuple[str, ...]:
        return tuple(m.peer_id for m in self.members if not m.client_mode)

    def member(self, peer_id: str) -> Member | None:
        return next((m for m in self.members if m.peer_id == peer_id), None)

    @property
    def digest(self) -> str:
        """Members compare this, so a leader that sent conflicting lists is caught."""
        wire_form = self.to_info().model_dump(mode="json")
        return hashlib.sha256(json.dumps(wire_form, sort_keys=True).encode()).hexdigest()[:32]

    def to_info(self) -> GroupInfo:
        members = [
            MemberInfo(peer_id=m.peer_id, weight=m.weight, client_mode=m.client_mode) for m in self.members
        ]
        return GroupInfo(
            group_id=self.group_id,
            outer_step=self.outer_step,
            numel=self.numel,
            chunk=self.chunk,
            members=members,
        )

    @classmethod
    def from_info(cls, info: GroupInfo) -> Group:
        members = tuple(Member(m.peer_id, m.weight, m.client_mode) for m in info.members)
        if len({m.peer_id for m in members}) != len(members):
            raise ProtocolError("the group lists a member twice")
        if list(members) != sorted(members, key=lambda m: (m.client_mode, m.peer_id)):
            raise ProtocolError("the group's members are not in the agreed order")
        if all(m.client_mode for m in members):
            raise ProtocolError("the group has no full member to reduce")
        return cls(info.group_id, info.outer_step, info.numel, info.chunk, members)


def check_weight(weight: Any, max_weight: float) -> str | None:
    """Why a claimed token weight is unacceptable, or None if it is fine."""
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        return f"weight {weight!r} is not a number"
    if not math.isfinite(weight) or weight <= 0:
        return f"weight {weight!r} is not a positive finite number"
    if weight > max_weight:
        return f"weight {weight:g} exceeds max_weight={max_weight:g}"
    return None
