"""`p2p-trainer bootstrap`: the long-lived initial peer. A DHT node with a stable identity, nothing else.

It prints `initial peer: <multiaddr>` lines for others' `--initial-peers`, serves the run's live
status page with `--serve HOST:PORT` (read through its own DHT node: no second one), and on
SIGINT/SIGTERM stops its DHT and p2pd and exits 0 within seconds.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import hivemind
from hivemind.dht.crypto import RSASignatureValidator

from p2p_trainer.config import SwarmConfig
from p2p_trainer.swarm.identity import check_announce_maddrs, check_multiaddrs, load_identity, start_dht
from p2p_trainer.swarm.loop import LoopThread
from p2p_trainer.swarm.procs import stop_dht
from p2p_trainer.swarm.progress import ProgressBoard
from p2p_trainer.swarm.reachability import ProbeService
from p2p_trainer.swarm.records import Records

logger = logging.getLogger(__name__)
DEFAULT_HOST = ["/ip4/0.0.0.0/tcp/0"]
READ_TIMEOUT_S = 30.0
T = TypeVar("T")


class _OwnDhtSource:
    """The status page's ``RunSource`` over the bootstrap peer's own DHT node: a progress board
    that only reads, on a loop thread of its own."""

    def __init__(self, dht: hivemind.DHT, run_id: str, signer: RSASignatureValidator, peer_id: str) -> None:
        self._thread = LoopThread("status-page-dht")
        self._pending: set[concurrent.futures.Future] = set()
        self._closed = False

        async def make() -> ProgressBoard:  # the board binds to the loop it is made on
            return ProgressBoard(dht, run_id, signer, peer_id, SwarmConfig().record_ttl, client_mode=True)

        self._board = self._thread.run(make(), timeout=10.0)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise concurrent.futures.CancelledError()
        future = self._thread.submit(coro)
        self._pending.add(future)
        try:
            return future.result(READ_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the DHT did not answer within {READ_TIMEOUT_S:.0f}s") from None
        finally:
            self._pending.discard(future)

    def swarm_records(self) -> Records:
        return self._run(self._board.read(max_age=0.0))

    def run_fingerprint(self) -> dict | None:
        return self._run(self._board.swarm_fingerprint())[0]

    def interrupt(self) -> None:
        self._closed = True
        for future in list(self._pending):
            future.cancel()

    def shutdown(self) -> None:
        self.interrupt()
        self._thread.stop()


def run_bootstrap(
    *,
    initial_peers: list[str],
    host_maddrs: list[str] | None,
    announce_maddrs: list[str],
    identity: str,
    serve: str | None = None,
    run_id: str | None = None,
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    peers = check_multiaddrs(initial_peers, "--initial-peers", need_peer_id=True)
    hosts = check_multiaddrs(host_maddrs or DEFAULT_HOST, "--host-maddrs")
    announce = check_announce_maddrs(announce_maddrs)
    page = None
    if serve is not None:
        from p2p_trainer.status_page import StatusPage

        page = StatusPage(run_id or SwarmConfig().run_id, serve, server_info={"kind": "bootstrap"})
    ident = load_identity(identity)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signer = RSASignatureValidator()
    source = probes = None
    try:
        dht = start_dht(
            identity=ident,
            initial_peers=peers,
            host_maddrs=hosts,
            announce_maddrs=announce,
            client_mode=False,
            join_timeout=60.0,
            validators=[signer],
        )
    except BaseException:
        if page is not None:
            page.stop()
        raise
    try:
        probes = ProbeService(dht)  # joiners ask us whether the swarm can dial them back
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        for maddr in maddrs:
            print(f"initial peer: {maddr}", flush=True)
        if page is not None:
            page.server_info.update(peer_id=ident.peer_id, multiaddrs=maddrs)
            source = _OwnDhtSource(dht, page.run_id, signer, ident.peer_id)
            page.start(source, first_read_s=0.0)  # a bootstrap peer may well start before any trainer
            print(f"status page: {page.url}", flush=True)
        logger.info("bootstrap peer %s running; Ctrl+C or SIGTERM stops it", ident.peer_id)
        stop.wait()
        logger.info("stopping")
    finally:
        if page is not None:
            page.stop()
        if source is not None:
            source.shutdown()
        if probes is not None:
            probes.close()
        stop_dht(dht)
        ident.cleanup()
    return 0
