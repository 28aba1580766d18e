"""Progress records and the pure rules that read them.

A progress record is what one peer says of itself on the DHT: its outer step, its tokens this
round, its speed, its loss and the hash of its θ. Everything a peer decides about the swarm (the
swarm's step, the agreed θ, whether it is out of sync, whom to download from, when its round
closes) is a pure function of such records, defined here beside them and tested without a network.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Optional

import pydantic.v1 as pv1


class _ProgressModel(pv1.BaseModel):
    peer_id: pv1.StrictStr
    outer_step: pv1.conint(ge=0, strict=True)
    tokens: pv1.conint(ge=0, strict=True)
    tokens_per_s: pv1.confloat(ge=0.0, strict=True)
    loss: Optional[pv1.StrictFloat]
    params_sha256: pv1.constr(regex=r"^([0-9a-f]{64})?$", strict=True)
    client_mode: pv1.StrictBool
    time: pv1.StrictFloat
    last_round_tokens: pv1.conint(ge=0, strict=True) = 0
    last_round_loss: Optional[pv1.StrictFloat] = None
    relayed: pv1.StrictBool = False

    class Config:
        extra = pv1.Extra.forbid


# added later: older peers omit them
_OPTIONAL_ON_WIRE = {"last_round_tokens": 0, "last_round_loss": None, "relayed": False}


@dataclass(frozen=True)
class ProgressRecord:
    peer_id: str
    outer_step: int  # rounds this peer has completed = the round it is training now
    tokens: int  # tokens processed in this round so far
    tokens_per_s: float
    loss: float | None
    params_sha256: str  # hash of θ after the last outer step, "" if none yet
    client_mode: bool
    time: float  # wall-clock (DHT) time of publication
    # how this peer's last completed round ended (0 / None before its first); the board fills them in,
    # `p2p-trainer status` turns them into a loss trend and the next round's ETA
    last_round_tokens: int = 0
    last_round_loss: float | None = None
    relayed: bool = False  # reachable only through a relay (behind NAT), see ``swarm.node``

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["tokens_per_s"] = float(self.tokens_per_s) if math.isfinite(self.tokens_per_s) else 0.0
        for key in ("loss", "last_round_loss"):
            value = wire[key]
            wire[key] = float(value) if value is not None and math.isfinite(value) else None
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> ProgressRecord:
        """Raise ValueError unless ``value`` matches the schema exactly (no type conversions)."""
        model = _ProgressModel.parse_obj(value)
        if model.dict() != {**_OPTIONAL_ON_WIRE, **value}:
            raise ValueError("record needs type conversions")
        return cls(**model.dict())

    @property
    def finished_round(self) -> bool:
        """Its owner stopped training its round and waits in matchmaking (the record it publishes
        as it enters matchmaking has its exact tokens and no speed)."""
        return self.tokens > 0 and self.tokens_per_s == 0.0


Records = dict[str, ProgressRecord]  # live records by peer id


# ---- where the swarm is ---------------------------------------------------------------------------
def swarm_outer_step(records: Records) -> int | None:
    """The outer step the swarm agrees on: the (lower) median of live records, so one peer that
    claims a huge step cannot drag everyone along. None when there are no records."""
    steps = [r.outer_step for r in records.values()]
    return statistics.median_low(steps) if steps else None


def agreed_hash(records: Records, step: int, extra: str = "") -> str | None:
    """The θ hash most live records at ``step`` carry (plus ``extra``, one more vote); ties go to the
    smallest hash, so every peer that sees the same records picks the same one."""
    votes = Counter(r.params_sha256 for r in records.values() if r.outer_step == step and r.params_sha256)
    if extra:
        votes[extra] += 1
    if not votes:
        return None
    return min(votes, key=lambda h: (-votes[h], h))


def others(records: Records, peer_id: str) -> Records:
    return {pid: r for pid, r in records.items() if pid != peer_id}


# ---- catching up ----------------------------------------------------------------------------------
def out_of_sync(records: Records, peer_id: str, step: int, sha: str, *, check_hash: bool) -> str | None:
    """Why this peer (at ``step`` with θ hash ``sha``) must download the swarm's state, or None.

    Behind: the other peers' agreed step (median, never the max one record claims) is ahead of
    ours, e.g. we joined late or missed a round the others completed. Diverged: at our own step
    most live records (ours counted) hold another θ, e.g. we were alone in a round or the swarm
    split into two groups at start-up."""
    rest = others(records, peer_id)
    swarm_step = swarm_outer_step(rest)
    if swarm_step is None:
        return None
    if swarm_step > step:
        return f"the swarm is at outer step {swarm_step}, this peer at {step}"
    if check_hash and swarm_step == step and sha:
        agreed = agreed_hash(rest, step, extra=sha)
        if agreed is not None and agreed != sha:
            holders = sum(1 for r in rest.values() if r.outer_step == step and r.params_sha256 == agreed)
            return (
                f"after outer step {step} this peer's θ ({sha[:12]}) differs from the one {holders} "
                f"other peer(s) hold ({agreed[:12]})"
            )
    return None


def donors(records: Records, peer_id: str, rng: random.Random) -> tuple[int, str, list[str]]:
    """(step, hash, donors in a random order): the swarm's step, the hash most records hold there,
    and the full peers that published it. Empty when nobody has anything worth downloading."""
    rest = others(records, peer_id)
    step = swarm_outer_step(rest)
    sha = agreed_hash(rest, step) if step is not None else None
    if step is None or sha is None:
        return -1, "", []
    found = sorted(
        pid
        for pid, r in rest.items()
        if r.outer_step == step and r.params_sha256 == sha and not r.client_mode
    )
    rng.shuffle(found)
    return step, sha, found


# ---- when a round closes --------------------------------------------------------------------------
def round_should_close(
    rest: Records, step: int, *, local_tokens: int, target: int, now: float, ttl: float
) -> bool:
    """Token-target mode: True once the swarm's tokens for round ``step`` (ours now, the others'
    extrapolated from their records at their speed, for at most ``ttl``) reach ``target``, or when
    most of the swarm already closed this round (we are late)."""
    if local_tokens >= target:
        return True
    ahead = swarm_outer_step(rest)
    if ahead is not None and ahead > step:
        return True
    total = float(local_tokens)
    for r in rest.values():
        if r.outer_step == step:
            total += r.tokens + r.tokens_per_s * min(max(now - r.time, 0.0), ttl)
    return total >= target


def round_is_late(rest: Records, step: int, *, catching_up: bool) -> bool:
    """Fixed-H mode: True when this peer should end its round before its H steps: the swarm already
    moved past ``step`` (it will catch up by downloading), or, while it is catching up after a
    download, every other live peer at this step finished training it and waits."""
    ahead = swarm_outer_step(rest)
    if ahead is not None and ahead > step:
        return True
    if catching_up:
        at_step = [r for r in rest.values() if r.outer_step == step]
        return bool(at_step) and all(r.finished_round for r in at_step)
    return False
