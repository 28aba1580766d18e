"""Length-prefixed frames on a libp2p stream (the framing of ``P2P.send_raw_data``), with a size
cap on everything we read from a peer and a byte count of everything that crosses the wire.
JSON headers are typed messages (``swarm.messages``), parsed with bounds where they are received."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from hivemind.p2p import P2P

from p2p_trainer.swarm.messages import MAX_HEADER_BYTES, Message, ProtocolError, dump, parse_any

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


async def send_tagged(writer: asyncio.StreamWriter, tag: bytes, data: Payload, traffic: Traffic) -> None:
    """One frame whose first byte says what the rest is (``TAG_CHUNK`` or ``TAG_MESSAGE``)."""
    writer.write((len(data) + 1).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    writer.write(tag)
    writer.write(data)
    await writer.drain()
    traffic.sent += P2P.HEADER_LEN + 1 + len(data)


async def recv_tagged(
    reader: asyncio.StreamReader, max_bytes: int, traffic: Traffic
) -> tuple[bytes, memoryview]:
    frame = await recv_frame(reader, max_bytes + 1, traffic)
    if not frame:
        raise FrameError("empty frame where a tagged one was expected")
    view = memoryview(frame)
    return bytes(view[:1]), view[1:]


TAG_CHUNK, TAG_MESSAGE = b"C", b"M"


async def send_message(writer: asyncio.StreamWriter, message: Message, traffic: Traffic) -> None:
    await send_frame(writer, dump(message), traffic)


async def recv_message(
    reader: asyncio.StreamReader, models: tuple[type[Message], ...], traffic: Traffic
) -> Message:
    """The next frame as one of ``models``; FrameError (naming the problem) if it is none of them."""
    raw = await recv_frame(reader, MAX_HEADER_BYTES, traffic)
    try:
        return parse_any(models, raw)
    except ProtocolError as e:
        raise FrameError(str(e)) from None


LINGER_S = 30.0  # the longest an answering side waits for the asking side to close first


async def close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), timeout=1.0)
    except (OSError, asyncio.TimeoutError, ConnectionError):
        pass


async def finish(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float = LINGER_S
) -> None:
    """Close a stream whose last word was ours once the other side has closed its end (what it still
    sends is dropped), or after ``timeout``. p2pd answers our end's close with a libp2p Close that also
    ends its reading, and its pipe in the other direction may turn that into a Reset; the other
    side's daemon then drops what it still buffers of our last frames, and a slow reader (a slow
    link, a busy process) gets a stream cut short. The asking side closes as soon as it has read
    our answer, so waiting for that costs a fast peer nothing. A task being cancelled (we are
    shutting down) closes at once."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return await close(writer)
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
        async with asyncio.timeout(timeout):
            while await reader.read(1 << 16):
                pass
    await close(writer)
