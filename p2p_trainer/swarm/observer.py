"""A read-only member of the swarm: it joins the DHT and reads the run's progress records and
fingerprint, and publishes nothing (what `p2p-trainer status` uses). ``SwarmPeer`` builds on it."""

from __future__ import annotations

import dataclasses
import logging
import math

from p2p_trainer.config import SwarmConfig
from p2p_trainer.swarm.node import SwarmNode
from p2p_trainer.swarm.progress import ProgressBoard
from p2p_trainer.swarm.records import Records

logger = logging.getLogger(__name__)


class Observer:
    """Joins (or starts) the swarm of ``cfg.run_id``; raises SwarmError with a one-line reason."""

    def __init__(self, cfg: SwarmConfig) -> None:
        allowed = frozenset(cfg.private)
        # a private run (``swarm.private``) hears nobody outside its list; an open one hears everyone
        self.admitted = (lambda peer_id: peer_id in allowed) if allowed else (lambda peer_id: True)
        self._node = SwarmNode(cfg)
        # the mode in effect: the node may have found this peer unreachable and switched to client mode
        self.cfg = dataclasses.replace(cfg, client_mode=self._node.client_mode)
        self.peer_id: str = self._node.peer_id
        self._closed = False
        try:
            self._board = self._node.call(self._make_board(), timeout=30.0)
        except BaseException:
            self._node.shutdown()
            raise

    async def _make_board(self) -> ProgressBoard:
        cfg = self.cfg
        return ProgressBoard(
            self._node.dht,
            cfg.run_id,
            self._node.signer,
            self.peer_id,
            cfg.record_ttl,
            client_mode=cfg.client_mode,
            admitted=self.admitted,
        )

    @property
    def node(self) -> SwarmNode:
        """This peer's plumbing (its event loop and P2P client): what a benchmark needs to time the
        transport on the peer's own connections, beside its rounds (``bench/netns_floor.py``)."""
        return self._node

    def swarm_records(self) -> Records:
        """The live progress records of this run, freshly read (blocks for a DHT lookup)."""
        return self._node.call(self._board.read(max_age=0.0), timeout=30.0)

    def run_fingerprint(self) -> dict | None:
        """The run fingerprint most other live peers published (None if nobody did)."""
        return self._node.call(self._board.swarm_fingerprint(), timeout=30.0)[0]

    def interrupt(self) -> None:
        """Safe from a signal handler: blocking calls in progress (and later ones) give up soon."""
        self._node.interrupt()

    def shutdown(self) -> None:
        """Idempotent: leave the swarm, stop the loop thread, the DHT process and p2pd."""
        if self._closed:
            return
        self._closed = True
        try:
            self._node.call(self._leave(), timeout=15.0, grace=math.inf)
        except Exception as e:
            logger.debug(f"could not leave the swarm gracefully: {e!r}")
        self._node.shutdown()

    async def _leave(self) -> None:
        """What a peer tells the others before it goes (an observer has nothing to say)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
