"""One peer's plumbing: its identity, its DHT process (with p2pd), a replica of the DHT's P2P client,
and the event loop thread that runs every piece of network code.

The training loop calls in from its own thread with ``call``, which blocks until the coroutine is
done. ``interrupt`` (safe from a signal handler) cancels what is running on the loop: at once, or
after the grace period its caller gave it, so that an all-reduce nearly done can still finish.
Nothing polls: cancellation is scheduled on the loop and ends the waiting call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P

from p2p_trainer.config import SwarmConfig
from p2p_trainer.swarm import procs, reachability
from p2p_trainer.swarm.errors import SwarmError
from p2p_trainer.swarm.identity import check_announce_maddrs, check_multiaddrs, load_identity, start_dht
from p2p_trainer.swarm.loop import LoopThread
from p2p_trainer.swarm.progress import make_validators

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Interrupted(SwarmError):
    """``interrupt()`` was called (SIGINT/SIGTERM): the blocking call was abandoned."""


@dataclass(eq=False)
class _Call:
    grace: float
    task: asyncio.Task | None = None


class SwarmNode:
    """Starts the DHT (retrying unreachable initial peers for ``cfg.join_timeout``) and the loop;
    raises SwarmError with a one-line reason, leaving nothing running behind.

    Unless the mode was chosen (``client_mode``, or ``auto_client_mode`` off), a joining peer asks
    an initial peer whether it can be dialed back (``swarm.reachability``) and, when it cannot,
    restarts its DHT in client mode and says so in one line. ``client_mode`` is the mode in effect."""

    def __init__(self, cfg: SwarmConfig) -> None:
        initial_peers = check_multiaddrs(cfg.initial_peers, "swarm.initial_peers", need_peer_id=True)
        host_maddrs = check_multiaddrs(cfg.host_maddrs, "swarm.host_maddrs")
        announce_maddrs = check_announce_maddrs(cfg.announce_maddrs)
        self.identity = load_identity(cfg.identity)
        self.peer_id: str = self.identity.peer_id
        self.client_mode: bool = cfg.client_mode
        self.reachability: reachability.Verdict | None = None  # None: not asked
        self.probe_server: reachability.ProbeServer | None = None
        self.dht: hivemind.DHT | None = None
        self.p2p: P2P | None = None
        self._thread: LoopThread | None = None
        self._calls: set[_Call] = set()
        self._interrupted_at: float | None = None
        self._closed = False
        try:
            validators = make_validators(cfg.run_id, self.identity.private_key)
            self.signer: RSASignatureValidator = validators[0]
            self._start_dht = functools.partial(
                start_dht,
                identity=self.identity,
                initial_peers=initial_peers,
                host_maddrs=host_maddrs,
                announce_maddrs=announce_maddrs,
                join_timeout=cfg.join_timeout,
                validators=validators,
                daemon_threads=cfg.daemon_threads,
            )
            self.dht = self._start_dht(client_mode=self.client_mode)
            self._thread = LoopThread(f"swarm-{self.peer_id[-6:]}")
            self.p2p = self.call(self.dht.replicate_p2p(), timeout=60.0)
            probers = reachability.peer_ids(initial_peers, self.peer_id)
            if not self.client_mode and cfg.auto_client_mode and probers:
                self._check_reachable(probers)
            if not self.client_mode:  # a client cannot be dialed, so nobody could ask it
                self.probe_server = reachability.ProbeServer(self.p2p)
                self.call(self.probe_server.start(), timeout=30.0)
        except BaseException:
            self.shutdown()
            raise

    def _check_reachable(self, probers: list[str]) -> None:
        """Ask an initial peer to dial us back; when it cannot, restart as a client and say so."""
        verdict = self.reachability = self.call(reachability.check(self.p2p, probers), timeout=60.0)
        if verdict.reachable is None:
            logger.info(f"could not check that the swarm reaches this peer ({verdict.reason}); staying full")
        if verdict.reachable is not False:
            return
        logger.warning(
            f"this peer is not reachable from the swarm ({verdict.reason}): switching to client mode (it "
            "sends its part of every round and gets the average, reduces no slice); pass --client-mode to "
            "skip this check or --swarm.auto_client_mode false to stay a full peer"
        )
        self.call(self.p2p.shutdown(), timeout=10.0)  # our client of the old daemon
        self.p2p = None
        procs.stop_dht(self.dht)
        self.dht = None
        self.dht = self._start_dht(client_mode=True, restart=True)
        self.client_mode = True
        self.p2p = self.call(self.dht.replicate_p2p(), timeout=60.0)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._thread.loop

    @property
    def interrupted(self) -> bool:
        return self._interrupted_at is not None

    def call(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None, grace: float = 0.0) -> T:
        """Run ``coro`` on the loop and wait for it. TimeoutError after ``timeout`` seconds;
        Interrupted once ``interrupt()`` was called and ``grace`` seconds have passed since
        (``math.inf``: never)."""
        return self.outcome(self.start(coro, timeout=timeout, grace=grace))

    def start(
        self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None, grace: float = 0.0
    ) -> concurrent.futures.Future[T]:
        """Like ``call`` but without waiting: the future of ``coro`` (read it with ``outcome``)."""
        if self._interrupted_at is not None and grace == 0.0 or self._thread is None:
            coro.close()
            future: concurrent.futures.Future[T] = concurrent.futures.Future()
            future.cancel()
            return future
        return asyncio.run_coroutine_threadsafe(self._run(_Call(grace), coro, timeout), self.loop)

    @staticmethod
    def outcome(future: concurrent.futures.Future[T]) -> T:
        """Wait for a started call: its result, its exception, or Interrupted if it was cancelled."""
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise Interrupted("this peer is shutting down") from None

    async def _run(self, call: _Call, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        call.task = asyncio.current_task()
        self._calls.add(call)
        try:
            if self._interrupted_at is not None:
                self._cancel_later(call)
            try:
                return await asyncio.wait_for(coro, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"swarm operation did not finish within {timeout:.1f}s") from None
        finally:
            self._calls.discard(call)

    def submit(self, callback: Any, *args: Any) -> None:
        """Any thread, never waits: run ``callback(*args)`` on the loop soon."""
        if self._thread is not None and self._thread.alive:
            self.loop.call_soon_threadsafe(callback, *args)

    def interrupt(self) -> None:
        """Safe from a signal handler: calls in progress (and later ones) give up soon."""
        if self._interrupted_at is None:
            self._interrupted_at = time.monotonic()
            self.submit(self._cancel_all)

    def _cancel_all(self) -> None:
        for call in list(self._calls):
            self._cancel_later(call)

    def _cancel_later(self, call: _Call) -> None:
        if math.isinf(call.grace):
            return  # e.g. leaving the swarm: bounded by its timeout, never cut short
        left = self._interrupted_at + call.grace - time.monotonic()
        self.loop.call_later(max(left, 0.0), call.task.cancel)

    async def visible_maddrs(self) -> list[str]:
        try:
            return [str(m) for m in await self.p2p.get_visible_maddrs()]
        except ValueError:  # no listen address (possible for a client-mode peer)
            return []

    def shutdown(self) -> None:
        """Idempotent: stop the loop thread, our P2P client, the DHT process and its p2pd."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None and self._thread.alive and self.p2p is not None:
            try:  # our client of the daemon (the daemon itself goes with the DHT)
                asyncio.run_coroutine_threadsafe(self.p2p.shutdown(), self.loop).result(3.0)
            except Exception as e:
                logger.debug(f"could not close our P2P client: {e!r}")
        if self._thread is not None:
            self._thread.stop()
        if self.dht is not None:
            procs.stop_dht(self.dht)
        self.identity.cleanup()
