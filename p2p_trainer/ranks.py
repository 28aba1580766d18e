"""The local ranks of one peer (one process per GPU under torchrun) and the one rule between them:
rank 0, the leader, talks to the swarm and holds the outer state; whatever it decides from the swarm
reaches the other ranks through ``share``/``on_leader``, so that every rank takes the same branch
and meets the others in the same collectives."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRanks:
    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (the others pass anything, e.g. None)."""
        if self.world == 1:
            return value
        box = [value if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_leader(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; its result on every rank."""
        return self.share(fn() if self.leader else None)


def follow_agent(on_gone: Callable[[], None], grace: float = 10.0, period: float = 1.0) -> None:
    """Under torchrun: when the agent that started this rank is gone (killed, crashed), stop as on
    SIGTERM (``on_gone``), and exit after ``grace`` seconds in any case: the other ranks may be gone
    too, and a collective with them would wait for ever. (Rank 0's DHT process follows rank 0.)"""
    agent = os.getppid()

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(period)
        logger.warning("the torchrun agent (pid %d) is gone: stopping", agent)
        on_gone()
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="agent-watch", daemon=True).start()
