"""One round's bookkeeping on one member, and the rules for taking over a lost reducer's slice.

A reducer that is gone (its stream breaks, or it sends nothing within the reply timeout: a crashed
peer) is left out: the next live reducer in group order takes its slice over. Chunk by chunk, a
backup that already holds the lost reducer's average of a chunk hands out those very bytes; the
chunks it does not hold it reduces afresh from the survivors' parts, and only when every live member
sent one (a member that stays silent may hold the lost reducer's average, and the copies must not
differ). A takeover needs two live members; with fewer, or a silent one, or a reducer that answers
with an error, the round fails for everyone who needs that slice. Members that take a slice over
discard whatever they received from the lost reducer and keep the backup's bytes, so everyone who
asks the backup ends with the same slice. No networking here: the wire protocol asks these rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from p2p_trainer.swarm import wire
from p2p_trainer.swarm.group import Group
from p2p_trainer.swarm.messages import SliceTrailer
from p2p_trainer.swarm.partition import SliceReduction
from p2p_trainer.swarm.verify import CheckBuffer, CommitPool


@dataclass
class SliceAnswer:
    """What the reducer of a slice gave this member, once its exchange with it ended."""

    chunks: list[bytes] = field(default_factory=list)  # averaged chunks received, in order
    trailer: SliceTrailer | None = None  # set when the slice completed
    gone: bool = False  # the reducer was found gone (stream broke, or silence)
    error: str = ""  # the reducer answered with an error
    server: str = ""  # who sent the chunks and signed the trailer (the reducer, or its backup)

    @property
    def complete(self) -> bool:
        return self.trailer is not None


@dataclass
class RoundState:
    group: Group
    bounds: list[tuple[int, int]]
    # (slice index, first chunk to reduce) -> a started takeover reduction of that slice
    make_takeover: Callable[[int, int], SliceReduction]
    traffic: wire.Traffic = field(default_factory=wire.Traffic)
    reduction: SliceReduction | None = None  # the slice we reduce, if we are a reducer
    lost: dict[str, str] = field(default_factory=dict)  # reducers found gone -> why
    takeovers: dict[int, SliceReduction] = field(default_factory=dict)  # slices of lost reducers we reduce
    answers: dict[int, asyncio.Future[SliceAnswer]] = field(default_factory=dict)
    final: dict[int, SliceAnswer] = field(default_factory=dict)  # what we apply, slice by slice
    checks: dict[int, CheckBuffer] = field(default_factory=dict)  # slices we verify (see ``verify``)
    pool: CommitPool | None = None  # the seals and accusations members posted to us

    def answer(self, index: int) -> asyncio.Future[SliceAnswer]:
        """What slice ``index``'s reducer gave us (resolved once our exchange with it ended)."""
        if index not in self.answers:
            self.answers[index] = asyncio.get_running_loop().create_future()
        return self.answers[index]

    def settle(self, index: int, value: SliceAnswer) -> None:
        if not self.answer(index).done():
            self.answers[index].set_result(value)

    def mark_lost(self, peer_id: str, why: str) -> None:
        """``peer_id`` will send nothing more this round: stop waiting for its parts anywhere."""
        if peer_id in self.lost:
            return
        self.lost[peer_id] = why
        for reduction in [self.reduction, *self.takeovers.values()]:
            if reduction is not None:
                reduction.exclude(peer_id, f"it is gone ({why})")

    def alive(self) -> list[str]:
        return [m.peer_id for m in self.group.members if m.peer_id not in self.lost]

    def backup(self, index: int) -> str | None:
        """The reducer that takes slice ``index`` over: the next live one in group order."""
        reducers = self.group.reducers
        for k in range(1, len(reducers)):
            candidate = reducers[(index + k) % len(reducers)]
            if candidate not in self.lost:
                return candidate
        return None

    def takeover_reduction(self, index: int, known: int) -> SliceReduction:
        """Our fresh reduction of lost slice ``index`` from chunk ``known`` on (started on first use),
        without the lost members."""
        if index not in self.takeovers:
            reduction = self.takeovers[index] = self.make_takeover(index, known)
            for peer_id, why in self.lost.items():
                reduction.exclude(peer_id, f"it is gone ({why})")
        return self.takeovers[index]

    def fail_unanswered(self) -> None:
        """This member's round ended: nobody may wait on its answers any more."""
        for index in range(len(self.group.reducers)):
            self.settle(index, SliceAnswer(error="this peer's round ended"))


def backup_plan(answer: SliceAnswer, index: int) -> tuple[list[bytes], str]:
    """As the backup of slice ``index``: (the lost reducer's chunks we hand out as they are, an error
    that fails the slice or ""). The chunks after those are reduced afresh."""
    if answer.error:
        return [], f"slice {index} failed here too ({answer.error})"
    return answer.chunks, ""
