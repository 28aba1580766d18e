"""The live status page of a run, served by `p2p-trainer status --serve` and `p2p-trainer bootstrap --serve`.

A poller thread re-reads the run's progress records (and now and then its fingerprint) from the DHT
every ``POLL_S`` seconds and feeds them to a ``History``, which remembers what one reading cannot
show: the swarm's outer step over time, its mean loss per round and how long rounds took. A threaded
stdlib HTTP server answers ``/`` with one self-contained page (``status_page.html``, package data:
inline CSS and JS, charts drawn as SVG by its own script, nothing fetched from anywhere else) and
``/api/status`` with what ``status --json`` prints plus the history; the page redraws itself from
``/api/status`` every 2 s. Where the records come from (an ``Observer`` of its own, or the bootstrap
peer's DHT node) is the caller's choice: anything with ``RunSource``'s three methods.
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import socket
import socketserver
import statistics
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

from hivemind.utils import get_dht_time

from p2p_trainer.config import ConfigError
from p2p_trainer.status import fingerprint_summary, summarize
from p2p_trainer.swarm.records import Records, swarm_outer_step

logger = logging.getLogger(__name__)

POLL_S = 2.0
FINGERPRINT_EVERY = 15  # polls: a run's fingerprint does not change while it runs
MAX_POINTS = 2000  # per history series: weeks of rounds at a few minutes each, a few hundred KB of JSON
_ADDRESS_RE = re.compile(  # HOST:PORT or [IPV6]:PORT
    r"\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]:(?P<p6>\d{1,5})|(?P<host>[^:\[\]\s/]+):(?P<port>\d{1,5})"
)
# the page may talk to the server it came from and nothing else
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:",
}


class RunSource(Protocol):
    """Where the page's records come from (``swarm.observer.Observer`` is one)."""

    def swarm_records(self) -> Records: ...

    def run_fingerprint(self) -> dict | None: ...

    def interrupt(self) -> None:
        """Any thread: make a read in progress, and later ones, give up soon."""


def parse_listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6; port 0 picks a free one) -> (host, port)."""
    m = _ADDRESS_RE.fullmatch(value.strip())
    port = int(m["port"] or m["p6"]) if m else -1
    if not m or port > 65535:
        raise ConfigError(f"--serve {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")
    return m["host"] or m["v6"], port


# ---- what the page remembers (pure: fed records and a time) ----
class History:
    """The swarm's outer step over time, its mean loss per round and the durations of rounds.

    A round's duration is the time between the two readings at which the swarm's outer step (the
    median of the live records) was first seen to reach it and to leave it, so it is known to within
    the poll period, and only for rounds this page saw start. Rounds that passed between two readings
    share that time equally. A round's loss is the mean of the live peers' last loss in it: final once
    peers report how their round ended (``last_round_loss``), until then their current loss. A swarm
    step lower than one seen before (a newcomer still at step 0 among few peers) changes nothing."""

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        self.max_points = max_points
        self.steps: deque[tuple[float, int]] = deque(maxlen=max_points)  # (time, step) at each change
        self.rounds: deque[tuple[int, float]] = deque(maxlen=max_points)  # (outer step, seconds)
        self._loss: dict[int, tuple[float, bool, int]] = {}  # outer step -> (mean loss, final, peers)
        self._step: int | None = None  # the highest swarm step seen
        self._since: float | None = None  # when the swarm was first seen at it (None: unknown)

    def add(self, records: Records, now: float) -> None:
        step = swarm_outer_step(records)
        if step is None:
            return
        self._track_step(step, now)
        self._track_loss(records)

    def _track_step(self, step: int, now: float) -> None:
        if self._step is None:  # we came in during this round: its start is unknown
            self._step = step
            self.steps.append((now, step))
        elif step > self._step:
            if self._since is not None:
                per_round = (now - self._since) / (step - self._step)
                self.rounds.extend((s, per_round) for s in range(self._step, step))
            self._step, self._since = step, now
            self.steps.append((now, step))

    def _track_loss(self, records: Records) -> None:
        ended: dict[int, list[float]] = {}
        current: dict[int, list[float]] = {}
        for r in records.values():
            if r.outer_step >= 1 and _finite(r.last_round_loss):
                ended.setdefault(r.outer_step - 1, []).append(r.last_round_loss)
            if _finite(r.loss):
                current.setdefault(r.outer_step, []).append(r.loss)
        for step, losses in ended.items():
            _, final, peers = self._loss.get(step, (0.0, False, 0))
            # once peers move on, fewer carry how the round ended: keep the reading of the most peers
            if step <= self._step and not (final and peers > len(losses)):
                self._loss[step] = (statistics.fmean(losses), True, len(losses))
        for step, losses in current.items():
            if step <= self._step and not self._loss.get(step, (0.0, False, 0))[1]:
                self._loss[step] = (statistics.fmean(losses), False, len(losses))
        for step in sorted(self._loss)[: max(0, len(self._loss) - self.max_points)]:
            del self._loss[step]

    def loss_curve(self) -> list[tuple[int, float, bool]]:
        """(outer step, mean loss, final) by step."""
        return [(s, loss, final) for s, (loss, final, _) in sorted(self._loss.items())]

    def to_json(self) -> dict[str, Any]:
        return {
            "outer_step": [{"time": t, "outer_step": s} for t, s in self.steps],
            "loss": [{"outer_step": s, "loss": x, "final": f} for s, x, f in self.loss_curve()],
            "rounds": [{"outer_step": s, "seconds": d} for s, d in self.rounds],
        }


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _json_safe(value: Any) -> Any:
    """NaN and infinities (a peer may publish them) become null: browsers reject them in JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---- the server ----
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    page: StatusPage

    def server_bind(self) -> None:
        # HTTPServer's own looks our name up in DNS (getfqdn), which can hang for seconds offline
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.server.page.html)
        elif path == "/api/status":
            body = json.dumps(_json_safe(self.server.page.snapshot()), allow_nan=False).encode()
            self._send(200, "application/json", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass  # one line per request every 2 s from every open page is noise


def _bind(host: str, port: int, listen: str) -> _Server:
    """A server bound to the first of ``host``'s addresses that works (``localhost`` may name ::1
    on a machine without IPv6); ConfigError naming ``listen`` when none does."""
    try:
        families = dict.fromkeys(info[0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except OSError as e:
        raise ConfigError(f"--serve {listen}: cannot listen there ({e.strerror or e})") from None
    error: OSError | None = None
    for family in families:
        try:
            return type("_PageServer", (_Server,), {"address_family": family})((host, port), _Handler)
        except OSError as e:
            error = error or e
    reason = (error.strerror or str(error)) if error is not None else "no address"
    raise ConfigError(f"--serve {listen}: cannot listen there ({reason})")


class StatusPage:
    """Binds ``listen`` (HOST:PORT) at once, so a bad address fails before anything else starts
    (ConfigError with one line); ``start(source)`` begins polling and serving, ``stop()`` ends both."""

    def __init__(self, run_id: str, listen: str, *, server_info: dict, poll_s: float = POLL_S) -> None:
        host, port = parse_listen_address(listen)
        self.run_id, self.poll_s, self.server_info = run_id, poll_s, dict(server_info)
        self.html = resources.files("p2p_trainer").joinpath("status_page.html").read_bytes()
        self.history = History()
        self._lock = threading.Lock()
        self._records: Records = {}
        self._fingerprint: dict | None = None
        self._polls = 0
        self._polled_at: float | None = None
        self._error: str | None = None
        self._source: RunSource | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._httpd = _bind(host, port, listen)
        self._httpd.page = self
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self._httpd.server_address[1]}/"

    # ---- reading the run ----
    def poll(self) -> bool:
        """One reading of the DHT into the page; False (and the reason kept for the page) if it failed."""
        try:
            records = self._source.swarm_records()
            fingerprint = self._fingerprint
            if records and (fingerprint is None or self._polls % FINGERPRINT_EVERY == 0):
                fingerprint = self._source.run_fingerprint() or fingerprint
        except Exception as e:  # a slow or failing DHT read: keep the last view, say so on the page
            if not self._stop.is_set():
                self._error = f"could not read the DHT: {str(e).strip() or type(e).__name__}"
                logger.warning(self._error)
            return False
        now = get_dht_time()
        with self._lock:
            self._records, self._fingerprint = records, fingerprint
            self.history.add(records, now)
            self._polls += 1
            self._polled_at, self._error = now, None
        return True

    def snapshot(self) -> dict[str, Any]:
        """What ``/api/status`` returns: ``status --json``'s object, the history, who serves it."""
        with self._lock:
            records, fingerprint = self._records, self._fingerprint
            history = self.history.to_json()
            polled = {"at": self._polled_at, "every_s": self.poll_s, "error": self._error}
        if records:
            s = summarize(self.run_id, records, fingerprint, get_dht_time())
            s["fingerprint_summary"] = fingerprint_summary(fingerprint) if fingerprint else None
        else:
            what = "no live peer of it answers yet" if self._polled_at is not None else "reading the DHT"
            s = {"run_id": self.run_id, "found": False, "message": f"run '{self.run_id}': {what}"}
        return {**s, "history": history, "server": self.server_info, "polled": polled}

    # ---- running ----
    def start(self, source: RunSource, *, first_read_s: float = 3.0) -> None:
        """Read the run until some record shows up or ``first_read_s`` passed (a freshly joined node
        may need a few lookups), so the first page already shows it; then poll and serve."""
        self._source = source
        deadline = time.monotonic() + first_read_s
        while not (self.poll() and self._records) and time.monotonic() < deadline:
            time.sleep(0.5)
        self._threads = [
            threading.Thread(target=self._poll_forever, name="status-page-poll", daemon=True),
            threading.Thread(target=self._httpd.serve_forever, args=(0.25,), name="status-page", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def stop(self) -> None:
        """Idempotent: stop serving and polling (the source's own shutdown is the caller's)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._source is not None:
            self._source.interrupt()
        if self._threads and self._threads[1].is_alive():  # shutdown() waits forever for a server never run
            self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=5.0)


def stop_on_signals() -> threading.Event:
    """From now on SIGINT and SIGTERM set the returned event (main thread only)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
