"""`p2p-trainer status`: a read-only look at a run through the DHT, with no model and no data.

It joins as an observer (client mode, publishes nothing), reads the run's signed progress records
and fingerprint, and prints the run (fingerprint, outer step, swarm speed, the next round's ETA,
loss trend) and its live peers. Exit codes: 0 the run was found, 1 no live peer of the run was
found (one line says so), 2 bad input or the DHT could not be reached (the CLI prints the reason).
With ``--serve HOST:PORT`` it stays, re-reads the DHT every few seconds and serves the same as a live
web page (``p2p_trainer.status_page``) until SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import statistics
import sys
import time
from typing import Any

from hivemind.utils import get_dht_time

from p2p_trainer.config import SwarmConfig
from p2p_trainer.contracts import fingerprint_sha256
from p2p_trainer.swarm.records import ProgressRecord, swarm_outer_step

NO_RUN = 1
READ_FOR_S = 3.0  # a freshly joined node may need a few lookups before it sees anyone
JOIN_TIMEOUT_S = 15.0


def summarize(run_id: str, records: dict[str, ProgressRecord], fingerprint: dict | None, now: float) -> dict:
    """The run as one JSON-ready dict: what both output formats print."""
    step = swarm_outer_step(records)
    current = [r for r in records.values() if r.outer_step == step]
    round_tokens = int((fingerprint or {}).get("round_tokens", 0) or 0)
    losses = [r.loss for r in current if _finite(r.loss)]
    previous = [r.last_round_loss for r in current if _finite(r.last_round_loss)]
    loss_now = statistics.fmean(losses) if losses else None
    loss_before = statistics.fmean(previous) if previous else None
    return {
        "run_id": run_id,
        "found": True,
        "fingerprint_sha256": fingerprint_sha256(fingerprint) if fingerprint is not None else None,
        "fingerprint": fingerprint,
        "outer_step": step,
        "tokens_per_s": sum(r.tokens_per_s for r in records.values()),
        "round": {
            "mode": "token-target" if round_tokens > 0 else "fixed-H",
            "target_tokens": round_tokens or None,
            "tokens": int(sum(_tokens_by(r, now) for r in current)),
            "eta_s": _eta(current, round_tokens, now),
        },
        "loss": {"current": loss_now, "previous_round": loss_before, "trend": _trend(loss_before, loss_now)},
        "peers": [
            {
                "peer_id": r.peer_id,
                "mode": peer_mode(r),
                "client_mode": r.client_mode,
                "relayed": r.relayed,
                "outer_step": r.outer_step,
                "tokens": r.tokens,
                "tokens_per_s": r.tokens_per_s,
                "loss": r.loss if _finite(r.loss) else None,
                "params_sha256": r.params_sha256,
                "last_seen_s": max(0.0, now - r.time),
            }
            for r in sorted(records.values(), key=lambda r: (r.client_mode, r.peer_id))
        ],
        "time": now,
    }


def peer_mode(r: ProgressRecord) -> str:
    """How others reach a peer: "client" (outgoing connections only, reduces no slice), "relayed"
    (reachable only through a relay) or "full"."""
    return "client" if r.client_mode else "relayed" if r.relayed else "full"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _tokens_by(r: ProgressRecord, now: float) -> float:
    """A peer's tokens this round by ``now``, extrapolated from its record at its speed."""
    return r.tokens + r.tokens_per_s * max(0.0, now - r.time)


def _eta(current: list[ProgressRecord], round_tokens: int, now: float) -> float | None:
    """Seconds until the round the swarm is in closes; None when nothing tells us yet.

    Token-target mode: the swarm's missing tokens at its speed. Fixed-H mode: the slowest peer,
    assuming each does as many tokens as in its last round (a newcomer: as the others did)."""
    if not current:
        return None
    if round_tokens > 0:
        speed = sum(r.tokens_per_s for r in current)
        left = round_tokens - sum(_tokens_by(r, now) for r in current)
        return 0.0 if left <= 0 else (left / speed if speed > 0 else None)
    known = [r.last_round_tokens for r in current if r.last_round_tokens > 0]
    if not known:
        return None
    slowest = 0.0
    for r in current:
        left = (r.last_round_tokens or statistics.median(known)) - _tokens_by(r, now)
        if left > 0:
            if r.tokens_per_s <= 0:
                return None  # a peer that has not reported its speed yet
            slowest = max(slowest, left / r.tokens_per_s)
    return slowest


def _trend(before: float | None, now: float | None) -> str | None:
    if before is None or now is None:
        return None
    if abs(now - before) <= 0.01 * abs(before):
        return "flat"
    return "falling" if now < before else "rising"


# ---- text output ----
def render_text(s: dict) -> str:
    fp = s["fingerprint"]
    fp_line = f"{s['fingerprint_sha256'][:16]}  {fingerprint_summary(fp)}" if fp else "none published yet"
    rnd, loss = s["round"], s["loss"]
    target = f"{rnd['target_tokens']:,} tokens a round" if rnd["target_tokens"] else "fixed H steps a round"
    lines = [
        f"run          {s['run_id']}",
        f"fingerprint  {fp_line}",
        f"outer step   {_or_dash(s['outer_step'])}",
        f"swarm speed  {s['tokens_per_s']:,.0f} tokens/s",
        f"next round   {_eta_text(rnd['eta_s'])} ({target}; {rnd['tokens']:,} tokens in so far)",
        f"loss         {_loss_text(loss)}",
        "",
        f"{len(s['peers'])} live peer(s):",
        f"{'peer id':<54} {'mode':<7} {'tokens/s':>10} {'outer step':>10} {'loss':>7} {'last seen':>10}",
    ]
    for p in s["peers"]:
        loss_text = f"{p['loss']:.3f}" if p["loss"] is not None else "-"
        lines.append(
            f"{p['peer_id']:<54} {p['mode']:<7} {p['tokens_per_s']:>10,.0f} "
            f"{p['outer_step']:>10} {loss_text:>7} {p['last_seen_s']:>8.1f}s ago"
        )
    return "\n".join(lines)


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _eta_text(eta: float | None) -> str:
    if eta is None:
        return "unknown"
    return "closing now" if eta < 1 else f"in about {eta:.0f}s"


def _loss_text(loss: dict) -> str:
    if loss["current"] is None:
        return "-"
    if loss["previous_round"] is None:
        return f"{loss['current']:.3f}"
    return f"{loss['previous_round']:.3f} last round -> {loss['current']:.3f} now ({loss['trend']})"


def fingerprint_summary(fp: dict) -> str:
    """The fields a volunteer compares with their config; robust to fingerprints that lack some."""
    parts = []
    model = fp.get("model")
    if isinstance(model, dict):
        seq = fp.get("seq_len", model.get("seq_len", "?"))
        parts.append(f"model {model.get('hidden_size', '?')}x{model.get('num_layers', '?')} "
                     f"(vocab {model.get('vocab_size', '?')}, seq {seq})")
    if "codec" in fp:
        parts.append(f"codec {fp['codec']}")
    if isinstance(fp.get("tokenizer_sha256"), str):
        parts.append(f"tokenizer {fp['tokenizer_sha256'][:12]}")
    if isinstance(fp.get("data_mix"), list):
        parts.append("data " + " + ".join(f"{name} {weight:g}" for name, weight in fp["data_mix"]))
    return ", ".join(parts)


# ---- the command ----
def _observer_config(initial_peers: list[str], run_id: str) -> SwarmConfig:
    loopback = all(m.startswith(("/ip4/127.", "/ip6/::1/")) for m in initial_peers)
    return SwarmConfig(
        run_id=run_id,
        initial_peers=list(initial_peers),
        host_maddrs=["/ip4/127.0.0.1/tcp/0" if loopback else "/ip4/0.0.0.0/tcp/0"],
        client_mode=True,  # outgoing connections only: a passing observer stays out of routing tables
        join_timeout=JOIN_TIMEOUT_S,
    )


def observe(initial_peers: list[str], run_id: str) -> tuple[dict[str, ProgressRecord], dict | None]:
    """The run's live progress records and its fingerprint, read through the DHT."""
    from p2p_trainer.swarm.identity import check_multiaddrs
    from p2p_trainer.swarm.observer import Observer  # heavy imports only once the command line is parsed

    initial_peers = check_multiaddrs(initial_peers, "--initial-peers", need_peer_id=True)
    cfg = _observer_config(initial_peers, run_id)
    cfg.validate()
    with Observer(cfg) as observer:
        deadline = time.monotonic() + READ_FOR_S
        while True:
            records = observer.swarm_records()
            if records or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        fingerprint = observer.run_fingerprint() if records else None
    return records, fingerprint


def serve_status(*, initial_peers: list[str], run_id: str, listen: str) -> int:
    """Serve the run's live page on ``listen`` (HOST:PORT) until SIGINT/SIGTERM; exit code 0."""
    from p2p_trainer.status_page import StatusPage, stop_on_signals
    from p2p_trainer.swarm.identity import check_multiaddrs
    from p2p_trainer.swarm.observer import Observer

    initial_peers = check_multiaddrs(initial_peers, "--initial-peers", need_peer_id=True)
    cfg = _observer_config(initial_peers, run_id)
    cfg.validate()
    page = StatusPage(run_id, listen, server_info={"kind": "status"})  # a bad address fails before joining
    observer = None
    # until the page is up, a signal ends the command like Ctrl+C: joining the DHT is not interruptible
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        observer = Observer(cfg)
        page.server_info["peer_id"] = observer.peer_id
        page.start(observer, first_read_s=READ_FOR_S)
        stop = stop_on_signals()
        print(f"status page: {page.url}", flush=True)
        stop.wait()
    finally:
        page.stop()
        if observer is not None:
            observer.shutdown()
    return 0


def run_status(
    *, initial_peers: list[str], run_id: str | None, as_json: bool, serve: str | None = None
) -> int:
    """Print the run, or serve it with ``serve`` (HOST:PORT); returns the exit code (see the module
    docstring)."""
    for name in ("hivemind", "p2p_trainer"):  # stdout is the answer: keep the swarm's chatter to warnings
        logging.getLogger(name).setLevel(logging.WARNING)
    default = run_id is None
    run_id = SwarmConfig().run_id if default else run_id
    if serve is not None:
        return serve_status(initial_peers=initial_peers, run_id=run_id, listen=serve)
    records, fingerprint = observe(initial_peers, run_id)
    if not records:
        hint = " (the default run id; pass --run-id to name another)" if default else ""
        message = (f"no run '{run_id}'{hint} found through {' '.join(initial_peers)}: "
                   "no live peer publishes progress for it")
        if as_json:
            print(json.dumps({"run_id": run_id, "found": False, "message": message}))
        else:
            print(message, file=sys.stderr)
        return NO_RUN
    summary = summarize(run_id, records, fingerprint, get_dht_time())  # the clock records are stamped with
    print(json.dumps(summary) if as_json else render_text(summary))
    return 0

