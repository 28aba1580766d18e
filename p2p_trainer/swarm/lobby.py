"""A leader's lobby for one (outer step, vector size): who joined and when, its deadlines, and the
words a round that formed late or not at all is explained with. No networking; ``matchmaking``
runs it."""

from __future__ import annotations

import asyncio
import math
import time

from p2p_trainer.swarm.group import Member
from p2p_trainer.swarm.messages import JoinReply
from p2p_trainer.swarm.records import Records


class Lobby:
    """``timeout``: matchmaking_timeout, the ceiling; ``wait``: how long recent lobbies call for
    waiting for stragglers (``deadlines``), never beyond the ceiling."""

    def __init__(self, step: int, numel: int, timeout: float, wait: float) -> None:
        self.step, self.numel, self.timeout = step, numel, timeout
        self.opened = time.monotonic()
        self.deadline = self.opened + min(wait, timeout)  # then we stop waiting for stragglers
        self.ceiling = self.opened + timeout  # then a lobby that cannot form a group gives up
        self.joined: dict[str, Member] = {}
        self.joined_after: dict[str, float] = {}  # seconds after the lobby opened
        self.skipped: set[str] = set()
        self.changed = asyncio.Event()
        self.outcome: asyncio.Future[JoinReply] = asyncio.get_running_loop().create_future()
        self.frozen_at = math.inf

    def waited(self) -> str:
        """Why we stopped waiting for the missing peers."""
        if self.deadline >= self.ceiling:
            return f"matchmaking_timeout={self.timeout:g}s passed; "
        ceiling = f"matchmaking_timeout={self.timeout:g}s"
        return f"waited {self.deadline - self.opened:.1f}s, as recent lobbies call for ({ceiling} at most); "


def absentees(records: Records, step: int, missing: list[str]) -> str:
    """Who we waited for in vain, and who is elsewhere: the hint a failed matchmaking needs."""
    parts = [f"did not join: {', '.join(missing)}"] if missing else []
    elsewhere = sorted(f"{pid} (step {r.outer_step})" for pid, r in records.items() if r.outer_step != step)
    if elsewhere:
        parts.append(f"live peers at other outer steps: {', '.join(elsewhere)}")
    return "; ".join(parts) or "no other live peer has published progress for this run"
