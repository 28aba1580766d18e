"""Can the swarm reach this peer? Asked once at start, answered by a full peer that dials us back.

A peer behind NAT (a home router, Colab) can dial out but cannot be dialed, so as a full peer it
would be named reducer or leader and nobody could reach it: rounds would fail for everyone. So a
joining peer asks one of its initial peers (a full peer or the bootstrap peer, which serve
``ProbeServer``) to dial back the TCP and QUIC v1 addresses it announces and to check that a
libp2p peer answers there (``dialback``); the node (``swarm.node``) switches to client mode on a "no".

The prober only dials the host the asker's own connection comes from (the address it sees, not
one the asker claims), so nobody can make it connect to a third party; it dials at most
``MAX_DIALS`` ports, each for at most ``DIAL_TIMEOUT_S``, and answers at most ``RATE`` probes a
second (a small token bucket). An asker whose connection comes from a host it does not announce is
behind address translation: nobody knows an address that reaches it, so that is a "no" without any
dial. Relays and hole punching are not used here: see docs/nat.md for why.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hivemind
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from multiaddr import Multiaddr

from p2p_trainer.swarm import wire
from p2p_trainer.swarm.dialback import DIAL_TIMEOUT_S, dial_libp2p, dial_quic
from p2p_trainer.swarm.loop import LoopThread
from p2p_trainer.swarm.messages import ProbeRefusal, ProbeReply, ProbeRequest

logger = logging.getLogger(__name__)

HANDLER = "p2p_trainer.reachability.v1"  # one per peer, not per run: a bootstrap peer serves every run
MAX_DIALS = 4
MAX_ADDRS = 32  # announced addresses we read from one request
RATE, BURST = 5.0, 10
ASK_TIMEOUT_S = 2 * DIAL_TIMEOUT_S + 3.0  # the asker's bound on one prober's answer


@dataclass(frozen=True)
class Verdict:
    reachable: bool | None  # None: no prober answered (we cannot tell)
    reason: str  # one line: what the prober saw or why nobody answered
    prober: str = ""  # peer id of the peer that answered


# ---- pure rules (tested without a network) ----
def observed_host(remote: str) -> str | None:
    """The IP a connection comes from, from the multiaddr libp2p reports for it; None for a
    relayed connection (its IP is the relay's) or one without an IP."""
    if "/p2p-circuit" in remote:
        return None
    parts = remote.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        return _canonical(parts[2])
    return None


def _canonical(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    quic: bool = False  # a QUIC v1 address (UDP), else TCP

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (" (QUIC)" if self.quic else "")


def transport_of(maddr: str) -> str | None:
    """'tcp' or 'quic' for an address the prober can dial (``/tcp/PORT``, ``/udp/PORT/quic-v1``,
    nothing after them but a peer id: not a relay's ``/p2p/ID/p2p-circuit``), else None."""
    head, _, peer_id = maddr.partition("/p2p/")
    if "/" in peer_id:
        return None
    parts = head.split("/")
    if len(parts) == 5 and parts[3] == "tcp":
        return "tcp"
    if len(parts) == 6 and parts[3] == "udp" and parts[5] == "quic-v1":
        return "quic"
    return None


def dial_targets(announced: Sequence[str], host: str) -> list[Target]:
    """The announced TCP and QUIC v1 addresses on ``host`` (IP addresses only, in order, no
    duplicates, at most ``MAX_DIALS``): all the prober may dial."""
    targets: list[Target] = []
    for maddr in announced[:MAX_ADDRS]:
        maddr = str(maddr)
        parts = maddr.split("/")
        kind = transport_of(maddr)
        if kind is None or parts[1] not in ("ip4", "ip6") or _canonical(parts[2]) != host:
            continue
        if not parts[4].isdigit() or not 0 < int(parts[4]) < 65536:
            continue
        target = Target(host, int(parts[4]), quic=kind == "quic")
        if target not in targets:
            targets.append(target)
    return targets[:MAX_DIALS]


def without_peer_id(maddr: str) -> str:
    return maddr.split("/p2p/", 1)[0] if "/p2p-circuit" not in maddr else maddr


async def _resolved(announced: list[str], timeout: float = DIAL_TIMEOUT_S) -> list[str]:
    """``announced`` with its /dns, /dns4, /dns6 TCP and QUIC addresses (the first few) turned into
    IP ones, so that a peer announcing a name can be checked; a name that does not resolve in time
    is dropped."""
    loop = asyncio.get_running_loop()
    out, names = [], 0
    for maddr in announced[:MAX_ADDRS]:
        parts = maddr.split("/")
        if len(parts) < 5 or parts[1] not in ("dns", "dns4", "dns6") or transport_of(maddr) is None:
            out.append(maddr)
            continue
        names += 1
        if names > MAX_DIALS or not parts[4].isdigit():
            continue
        family = {"dns4": socket.AF_INET, "dns6": socket.AF_INET6}.get(parts[1], socket.AF_UNSPEC)
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(parts[2], None, family=family), timeout)
        except (asyncio.TimeoutError, OSError):
            continue
        for info in infos:
            ip = info[4][0]
            out.append("/".join(["", "ip6" if ":" in ip else "ip4", ip, *parts[3:]]))
    return out


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


# ---- the prober ----
class ProbeServer:
    """Answers reachability probes (full peers and the bootstrap peer run one)."""

    def __init__(self, p2p: P2P) -> None:
        self._p2p = p2p
        self._bucket = _TokenBucket(RATE, BURST)
        self.answered = 0  # probes answered with a verdict (tests read it)

    async def start(self) -> None:
        await self._p2p.add_binary_stream_handler(HANDLER, self._handle)

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        traffic, asker = wire.Traffic(), info.peer_id.to_base58()
        try:
            try:
                request = await asyncio.wait_for(
                    wire.recv_message(reader, (ProbeRequest,), traffic), timeout=5.0
                )
            except wire.FrameError as e:
                return await wire.send_message(
                    writer, ProbeRefusal(error=f"malformed probe request: {e}"), traffic
                )
            if not self._bucket.take():
                busy = ProbeRefusal(error="busy: too many probes, ask another peer")
                return await wire.send_message(writer, busy, traffic)
            reply = await self._verdict(str(info.addr), request.maddrs)
            self.answered += 1
            verdict = "reachable" if reply.reachable else "unreachable"
            logger.info(f"reachability probe from {asker}: {verdict} ({reply.reason})")
            await wire.send_message(writer, reply, traffic)
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            logger.debug(f"reachability probe from {asker} broke off: {e!r}")
        except asyncio.CancelledError:
            return
        finally:
            await wire.finish(reader, writer)  # our answer reaches a slow asker whole

    async def _verdict(self, remote: str, announced: list[str]) -> ProbeReply:
        host = observed_host(remote)
        if host is None:
            return ProbeReply(reachable=False, reason=_clip(f"it reached us through a relay ({remote})", 500))
        targets = dial_targets(await _resolved(announced), host)
        if not targets:
            shown = ", ".join(_clip(m, 100) for m in announced[:3]) or "nothing"
            why = f"it connects from {host} but announces no TCP or QUIC address there, only {shown}"
            return ProbeReply(reachable=False, observed=host[:100], reason=why[:500])
        failures = await asyncio.gather(
            *((dial_quic if t.quic else dial_libp2p)(t.host, t.port) for t in targets)
        )
        ok = [str(t) for t, why in zip(targets, failures, strict=True) if not why]
        if ok:
            return ProbeReply(
                reachable=True, observed=host[:100], reason=f"dialed it back at {', '.join(ok)}"[:500]
            )
        tried = "; ".join(f"{t}: {why}" for t, why in zip(targets, failures, strict=True))
        return ProbeReply(
            reachable=False, observed=host[:100], reason=f"dialing it back failed ({tried})"[:500]
        )


# ---- the asker ----
async def check(p2p: P2P, probers: Sequence[str], timeout: float = ASK_TIMEOUT_S) -> Verdict:
    """Ask the probers in turn (the first that answers decides) whether our announced addresses
    reach us. Never raises: a prober that is gone, busy or too old to know the probe is skipped."""
    try:
        announced = [without_peer_id(str(m)) for m in await p2p.get_visible_maddrs()]
    except ValueError:  # p2pd listens nowhere
        announced = []
    if not announced:
        return Verdict(False, "it listens on no address")
    problems = []
    for prober in dict.fromkeys(probers):
        try:
            reply = await asyncio.wait_for(_ask(p2p, prober, announced), timeout)
        except Exception as e:  # whatever went wrong with one prober, the next may answer
            problems.append(f"{prober[-8:]}: {_short(e)}")
            continue
        if isinstance(reply, ProbeRefusal):
            problems.append(f"{prober[-8:]}: {_clip(reply.error, 100)}")
            continue
        return Verdict(reply.reachable, _clip(reply.reason, 300), prober)
    return Verdict(None, "; ".join(problems) or "no peer to ask")


async def _ask(p2p: P2P, prober: str, announced: list[str]) -> ProbeReply | ProbeRefusal:
    traffic = wire.Traffic()
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(prober), HANDLER)
    try:
        request = ProbeRequest(maddrs=[m[:300] for m in announced[:MAX_ADDRS]])
        await wire.send_message(writer, request, traffic)
        return await wire.recv_message(reader, (ProbeReply, ProbeRefusal), traffic)
    finally:
        await wire.close(writer)


def _clip(text: object, limit: int) -> str:
    """Another peer's text, fit for one line of our log: printable characters only, bounded."""
    return "".join(c if c.isprintable() else " " for c in str(text)[:limit])


def _short(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "no answer in time"
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:100]


def peer_ids(initial_peers: Sequence[str], own_peer_id: str) -> list[str]:
    """The peer ids at the end of the initial peers' multiaddrs, ours left out."""
    ids = [str(Multiaddr(m).value_for_protocol("p2p")) for m in initial_peers]
    return [p for p in dict.fromkeys(ids) if p != own_peer_id]


# ---- a prober for a process with no event loop of its own (the bootstrap peer) ----
class ProbeService:
    """``ProbeServer`` on its own loop thread beside a running DHT; ``close()`` stops it."""

    def __init__(self, dht: hivemind.DHT) -> None:
        self._thread = LoopThread("reachability-probes")
        self._p2p: P2P | None = None
        try:
            self._p2p = self._thread.run(dht.replicate_p2p(), timeout=30.0)
            self._thread.run(ProbeServer(self._p2p).start(), timeout=30.0)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._p2p is not None and self._thread.alive:
            try:
                self._thread.run(self._p2p.shutdown(), timeout=3.0)
            except Exception as e:
                logger.debug(f"could not close the probe service's P2P client: {e!r}")
            self._p2p = None
        self._thread.stop()
