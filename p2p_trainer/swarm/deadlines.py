"""Deadlines that follow the swarm: how long to wait for a group member, learned from recent rounds.

A fixed timeout is wrong both ways: a swarm whose rounds take 2 s waits 30 s for a dead peer, and one
whose transfers take 40 s leaves everyone out at 30 s. Instead each waiting side keeps what it saw in
its last ``WINDOW`` rounds (one number per round: how late the typical member's part, the last joiner
or the last answer came) and waits ``floor + wait_for_slower * estimate``, never longer than the
configured timeout, which stays the ceiling (and the whole deadline until ``MIN_ROUNDS`` rounds were
seen). The estimate is the slowest of the recent rounds: a round slower than the rest keeps the
deadline lenient for a while (waiting too long costs seconds, leaving a live peer out costs its
contribution), and a round whose typical member missed its deadline raises the next one at once.
No networking here: ``learn_arrivals`` and ``learn_answers`` only watch a round's futures.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2p_trainer.swarm.partition import SliceReduction
    from p2p_trainer.swarm.takeover import RoundState

WINDOW = 8  # rounds remembered
MIN_ROUNDS = 3  # rounds seen before a deadline may be shorter than the ceiling


@dataclass(frozen=True)
class Policy:
    """``floor`` and ``ceiling``: the shortest and longest wait in seconds; ``wait_for_slower``: a
    member up to this many times slower than the typical one (plus ``floor``) is waited for."""

    floor: float
    ceiling: float
    wait_for_slower: float

    def __post_init__(self) -> None:
        if not 0 < self.floor < math.inf:
            raise ValueError(f"deadline floor={self.floor!r} must be a positive, finite number of seconds")
        if not self.ceiling > 0:
            raise ValueError(f"deadline ceiling={self.ceiling!r} must be a positive number of seconds")
        if not 1.0 <= self.wait_for_slower < math.inf:
            raise ValueError(f"wait_for_slower={self.wait_for_slower!r} must be a number >= 1")

    def wait(self, typical: float | None) -> float:
        """Seconds to wait when the typical member takes ``typical`` (None: unknown, the ceiling)."""
        if typical is None:
            return self.ceiling
        return min(self.ceiling, self.floor + self.wait_for_slower * typical)


def typical_delay(delays: Iterable[float], expected: int) -> float | None:
    """How late the typical one of ``expected`` members came, ``delays`` holding those that came:
    the lower median, the missing ones counted as later than everyone. None when it is missing."""
    came = sorted(delays)
    if expected <= 0 or len(came) > expected:
        raise ValueError(f"{len(came)} delays for {expected} expected members")
    middle = (expected - 1) // 2  # of two, the earlier: a pair's slow member is the one judged
    return came[middle] if middle < len(came) else None


class Recent:
    """One kind of delay over the last ``WINDOW`` rounds, and the wait it calls for."""

    def __init__(self, policy: Policy, window: int = WINDOW, min_rounds: int = MIN_ROUNDS) -> None:
        if not 1 <= min_rounds <= window:
            raise ValueError(f"min_rounds={min_rounds} must be in [1, window={window}]")
        self.policy, self.min_rounds = policy, min_rounds
        self._seen: collections.deque[tuple[float, frozenset[str]]] = collections.deque(maxlen=window)

    def observe(self, seconds: float, peers: Iterable[str] = ()) -> None:
        """One round's delay (``peers``: who took part, see ``knows``). Nonsense is dropped."""
        if math.isfinite(seconds) and seconds >= 0:
            self._seen.append((float(seconds), frozenset(peers)))

    @property
    def rounds(self) -> int:
        return len(self._seen)

    def estimate(self) -> float | None:
        """The slowest recent delay, or None before ``min_rounds`` rounds were seen."""
        if len(self._seen) < self.min_rounds:
            return None
        return max(seconds for seconds, _ in self._seen)

    def wait(self) -> float:
        """Seconds to wait in the next round."""
        return self.policy.wait(self.estimate())

    def knows(self, peers: Collection[str]) -> bool:
        """Whether each of ``peers`` took part in at least ``min_rounds`` of the remembered rounds (so
        it has seen enough rounds to keep deadlines of its own, not the ceiling)."""
        return all(sum(peer in seen for _, seen in self._seen) >= self.min_rounds for peer in peers)


def reply_ceiling(allreduce_timeout: float) -> float:
    """The longest a member waits for a reducer's answer: the reducer's longest part deadline, plus
    as long again (at least 5 s) to reduce, encode and send."""
    return allreduce_timeout + max(5.0, allreduce_timeout)


def reply_timeout(answers: Recent, reducers: Collection[str]) -> float:
    """How long a member waits for a reducer's answer this round before calling it gone.

    A reducer answers once its part deadline passed at the latest, and that deadline is the same
    formula over the arrivals it saw. In each round a member's last answer came no earlier than the
    typical part reached any reducer (a slice completes after its typical part came, or after its
    deadline), so over the same rounds our estimate is at least each reducer's, and our wait at
    least its deadline; the margin (our estimate again, at least ``floor``) is the time it needs to
    reduce and send after that. A reducer that was not in enough of our rounds may still be at its
    ceiling: then so are we."""
    policy, estimate = answers.policy, answers.estimate()
    ceiling = reply_ceiling(policy.ceiling)
    if estimate is None or not answers.knows(reducers):
        return ceiling
    return min(ceiling, policy.floor + policy.wait_for_slower * estimate + max(policy.floor, estimate))


def learn_arrivals(recent: Recent, reduction: SliceReduction, me: str) -> None:
    """Once the slice we reduce is reduced, tell ``recent`` when its typical part came (a typical
    part that missed the deadline came later than it: the deadline is what we learn then). Our own
    part (``me``) never travels, so it is not counted."""

    def learn(_: asyncio.Future) -> None:
        others = [m.peer_id for m in reduction.group.members if m.peer_id != me]
        delays = [reduction.arrived[p] for p in others if p in reduction.arrived]
        typical = typical_delay(delays, len(others)) if others else None
        if typical is None and others and time.monotonic() >= reduction.deadline:
            typical = reduction.timeout
        if typical is not None:
            recent.observe(typical, reduction.group.reducers)

    reduction.trailer.add_done_callback(learn)


def learn_answers(recent: Recent, state: RoundState) -> None:
    """Once every slice's exchange of the round ended, tell ``recent`` when the last complete answer
    straight from a slice's reducer came (ours included; takeovers and failures say nothing about a
    live reducer)."""
    started, reducers = time.monotonic(), state.group.reducers
    pending, came = set(range(len(reducers))), []

    def settled(index: int, future: asyncio.Future) -> None:
        pending.discard(index)
        answer = None if future.cancelled() else future.result()
        if answer is not None and answer.complete and answer.server == reducers[index]:
            came.append(time.monotonic() - started)
        if not pending and came:
            recent.observe(max(came), reducers)

    for index in range(len(reducers)):
        state.answer(index).add_done_callback(functools.partial(settled, index))
