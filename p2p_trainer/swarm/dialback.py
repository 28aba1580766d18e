"""Dialing a peer back: does a libp2p peer answer at this address? (``reachability``'s prober)

Over TCP, a plain connection that must bring libp2p's multistream greeting, which a listener writes
first, unasked. Over QUIC v1, one UDP datagram from a fresh socket in a version QUIC does not know:
a QUIC endpoint must answer it with a Version Negotiation packet that echoes the datagram's
connection ids and lists the versions it speaks (RFC 9000, sections 6 and 17.2.1), v1 among them.
No handshake: we learn that the address reaches a QUIC endpoint, which is what a dial needs.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

# what a libp2p TCP listener writes first, unasked: the multistream-select header
MULTISTREAM_HEADER = b"\x13/multistream/1.0.0\n"
QUIC_V1 = 1
QUIC_PROBE_VERSION = 0x1A2A3A4A  # a version reserved never to be spoken (RFC 9000, section 15)
QUIC_PROBE_BYTES = 1200  # a QUIC endpoint answers no smaller datagram of an unknown version
QUIC_RESEND_S = 0.5  # UDP may lose the probe or the answer: sent again this often until one comes
DIAL_TIMEOUT_S = 2.0


async def dial_libp2p(host: str, port: int, timeout: float = DIAL_TIMEOUT_S) -> str:
    """'' when a libp2p listener answers at host:port within ``timeout``, else why not."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        first = await asyncio.wait_for(reader.readexactly(len(MULTISTREAM_HEADER)), timeout)
        return "" if first == MULTISTREAM_HEADER else "something other than a libp2p peer answers there"
    except asyncio.TimeoutError:
        return f"no answer within {timeout:.0f}s"
    except asyncio.IncompleteReadError:
        return "the connection was closed without a libp2p greeting"
    except OSError as e:  # asyncio's strerror is "Connect call failed (...)": say what failed instead
        return os.strerror(e.errno) if e.errno else str(e) or type(e).__name__
    finally:
        if writer is not None:
            writer.close()


def quic_probe(dcid: bytes, scid: bytes) -> bytes:
    """A QUIC long-header datagram in ``QUIC_PROBE_VERSION``, padded to ``QUIC_PROBE_BYTES``."""
    head = bytes([0xC0]) + QUIC_PROBE_VERSION.to_bytes(4, "big")
    head += bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    return head + bytes(QUIC_PROBE_BYTES - len(head))


def quic_versions(answer: bytes, dcid: bytes, scid: bytes) -> list[int] | None:
    """The versions of a Version Negotiation packet that answers ``quic_probe(dcid, scid)`` (its
    connection ids swapped back), or None for anything else."""
    head = 1 + 4 + 1 + len(scid) + 1 + len(dcid)
    if len(answer) < head or not answer[0] & 0x80 or answer[1:5] != bytes(4):
        return None
    expected = bytes([len(scid)]) + scid + bytes([len(dcid)]) + dcid
    if answer[5:head] != expected or (len(answer) - head) % 4:
        return None
    return [int.from_bytes(answer[i : i + 4], "big") for i in range(head, len(answer), 4)]


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        self.error: OSError | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answers.full():
            self.answers.put_nowait(data)

    def error_received(self, exc: OSError) -> None:  # an ICMP error: nothing listens there
        self.error = exc
        if not self.answers.full():
            self.answers.put_nowait(b"")


async def dial_quic(host: str, port: int, timeout: float = DIAL_TIMEOUT_S) -> str:
    """'' when a QUIC v1 endpoint answers at host:port within ``timeout``, else why not. The probe
    leaves a fresh socket: a NAT that only lets back what answers its peer's own datagrams drops it."""
    loop = asyncio.get_running_loop()
    dcid, scid = os.urandom(8), os.urandom(8)
    transport = None
    try:
        transport, proto = await loop.create_datagram_endpoint(_Datagrams, remote_addr=(host, port))
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            transport.sendto(quic_probe(dcid, scid))
            try:
                answer = await asyncio.wait_for(proto.answers.get(), min(QUIC_RESEND_S, left))
            except asyncio.TimeoutError:
                continue
            if proto.error is not None:
                raise proto.error
            versions = quic_versions(answer, dcid, scid)
            if versions is None:
                return "something other than a QUIC peer answers there"
            return "" if QUIC_V1 in versions else "a QUIC peer without QUIC v1 answers there"
        return f"no answer within {timeout:.0f}s"
    except OSError as e:
        return os.strerror(e.errno) if e.errno else str(e) or type(e).__name__
    finally:
        if transport is not None:
            transport.close()
