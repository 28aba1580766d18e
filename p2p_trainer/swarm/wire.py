"""Length-prefixed frames on a libp2p stream (the framing of ``P2P.send_raw_data``), with a size
cap on everything we read from a peer and a byte count of everything that crosses the wire."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from hivemind.p2p import P2P

MAX_HEADER_BYTES = 1 << 16
_SMALL, _CHUNK = 1 << 16, 1 << 22
Payload = bytes | bytearray  # what a received frame is; codecs accept either


class FrameError(ConnectionError):
    """The other side sent a frame we refuse (too large, or not the JSON we expect)."""


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0


async def send_frame(writer: asyncio.StreamWriter, data: Payload, traffic: Traffic) -> None:
    await P2P.send_raw_data(data, writer)
    traffic.sent += P2P.HEADER_LEN + len(data)


async def recv_frame(reader: asyncio.StreamReader, max_bytes: int, traffic: Traffic) -> Payload:
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if length > max_bytes:
        raise FrameError(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    if length <= _SMALL:
        data: Payload = await reader.readexactly(length)
    else:  # readexactly() is slow on large frames (its buffer grows in small steps): fill one buffer
        data = bytearray(length)
        view, filled = memoryview(data), 0
        while filled < length:
            chunk = await reader.read(min(length - filled, _CHUNK))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(view[:filled]), length)
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    traffic.received += P2P.HEADER_LEN + length
    return data


async def send_json(writer: asyncio.StreamWriter, message: dict[str, Any], traffic: Traffic) -> None:
    await send_frame(writer, json.dumps(message, separators=(",", ":")).encode(), traffic)


async def recv_json(reader: asyncio.StreamReader, traffic: Traffic) -> dict[str, Any]:
    raw = await recv_frame(reader, MAX_HEADER_BYTES, traffic)
    try:
        message = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrameError(f"malformed header: {e}") from None
    if not isinstance(message, dict):
        raise FrameError("header is not a JSON object")
    return message


async def close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), timeout=1.0)
    except (OSError, asyncio.TimeoutError, ConnectionError):
        pass
