"""`p2p-trainer bootstrap`: the long-lived initial peer. A DHT node with a stable identity, nothing else.

It prints `initial peer: <multiaddr>` lines for others' `--initial-peers`, serves an optional
status page, and on SIGINT/SIGTERM stops its DHT and p2pd and exits 0 within seconds.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hivemind.dht.crypto import RSASignatureValidator

from p2p_trainer.swarm.identity import check_announce_maddrs, check_multiaddrs, load_identity, start_dht
from p2p_trainer.swarm.procs import stop_dht

logger = logging.getLogger(__name__)
DEFAULT_HOST = ["/ip4/0.0.0.0/tcp/0"]


def _status_server(port: int, info: dict) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = json.dumps(info, indent=2).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="status-page").start()
    return server


def run_bootstrap(
    *,
    initial_peers: list[str],
    host_maddrs: list[str] | None,
    announce_maddrs: list[str],
    identity: str,
    status_port: int = 0,
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    peers = check_multiaddrs(initial_peers, "--initial-peers", need_peer_id=True)
    hosts = check_multiaddrs(host_maddrs or DEFAULT_HOST, "--host-maddrs")
    announce = check_announce_maddrs(announce_maddrs)
    ident = load_identity(identity)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dht = start_dht(
        identity=ident,
        initial_peers=peers,
        host_maddrs=hosts,
        announce_maddrs=announce,
        client_mode=False,
        join_timeout=60.0,
        validators=[RSASignatureValidator()],
    )
    server = None
    try:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        for maddr in maddrs:
            print(f"initial peer: {maddr}", flush=True)
        if status_port:
            server = _status_server(status_port, {"peer_id": ident.peer_id, "multiaddrs": maddrs})
            print(f"status page: http://127.0.0.1:{server.server_address[1]}/", flush=True)
        logger.info("bootstrap peer %s running; Ctrl+C or SIGTERM stops it", ident.peer_id)
        stop.wait()
        logger.info("stopping")
    finally:
        if server is not None:
            server.shutdown()
        stop_dht(dht)
        ident.cleanup()
    return 0
