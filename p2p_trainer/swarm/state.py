"""The training state a peer needs to join a running swarm or catch up with it (θ, the outer
momentum, the outer step, the schedule position and, optionally, the inner AdamW state), and
serving it; its bytes on the wire are ``state_format``, downloading it is ``swarm.download``.

A donor serves its state as of its last outer step from the swarm's event loop thread, streaming
it window by window (read off that thread, from wherever the state lives: a peer with several local
ranks reads it from all of them, see ``pump``), so serving never blocks training and never copies
the state; a stream stops when its donor takes the next outer step (the downloader then asks
again). A donor serves at most ``_MAX_SERVING`` downloads at once and one per peer, each within a
write deadline, so peers that never read cannot block it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from hivemind.p2p import P2P

from p2p_trainer.contracts import outer_state_sha256
from p2p_trainer.swarm import state_format, wire
from p2p_trainer.swarm.messages import StateHeader, StateRefusal, StateRequest, StateTrailer

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # bytes per frame: the downloader's progress bar moves at least this often
_MAX_SERVING = 4  # concurrent downloads one donor serves; more are told to try another donor


class StateSource(Protocol):
    """What a donor serves: the state as of one outer step, read window by window (a live source
    raises ``StateMoved`` once its peer has moved past that step)."""

    outer_step: int
    params_sha256: str  # hash of θ (see contracts.params_sha256)
    inner_step: int  # the schedule position: inner steps this peer has done

    def entries(self, with_inner: bool) -> list[tuple[str, int]]:
        """(name, length) of the vectors to send (see ``state_format``), in order."""

    def read(self, name: str, lo: int, hi: int) -> torch.Tensor: ...


class StateMoved(Exception):
    """The state being served changed (its peer took an outer step): the download starts over."""


@dataclass(frozen=True)
class TrainingState:
    """A state held whole in memory (a single-process peer's, or a test's)."""

    outer_step: int
    params_sha256: str
    master: torch.Tensor  # θ, flat fp32
    momentum: torch.Tensor | None  # the outer optimizer's momentum buffer (None before the first step)
    inner_step: int
    # the inner AdamW state laid out like θ: {"inner.exp_avg": [numel], "inner.exp_avg_sq": [numel],
    # "inner.step": [parameter tensors]} (see ``state_format``)
    inner: dict[str, torch.Tensor] | None = None

    @property
    def state_sha256(self) -> str:
        """The hash of what every peer of a round shares: θ, outer momentum, outer step."""
        return outer_state_sha256(self.master, self.momentum, self.outer_step)

    def entries(self, with_inner: bool) -> list[tuple[str, int]]:
        names = ["master"] + (["momentum"] if self.momentum is not None else [])
        found = [(name, self.master.numel()) for name in names]
        if with_inner and self.inner is not None:
            found += [(name, self.inner[name].numel()) for name in state_format.INNER]
        return found

    def read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        vectors = {"master": self.master, "momentum": self.momentum, **(self.inner or {})}
        return vectors[name][lo:hi]


@dataclass
class Download:
    state: state_format.StateFile  # verified; the caller discards it once loaded
    donor: str
    nbytes: int
    seconds: float
    failures: list[str] = field(default_factory=list)  # what went wrong with the donors tried before


class DonorFailed(Exception):
    """One donor could not give us a good state; the downloader tries another."""


def handler_name(run_id: str) -> str:
    return f"p2p_trainer.{run_id}.state"


class StateServer:
    """Serves our latest state to peers that ask (full peers only: clients accept no streams)."""

    def __init__(
        self, p2p: P2P, run_id: str, *, timeout: float, admitted: Callable[[str], bool] = lambda peer_id: True
    ) -> None:
        self._p2p, self._handler, self.timeout, self._admitted = p2p, handler_name(run_id), timeout, admitted
        self._source: StateSource | None = None
        self._serving: set[str] = set()

    async def start(self) -> None:
        await self._p2p.add_binary_stream_handler(self._handler, self._handle)

    def publish(self, source: StateSource) -> None:
        """Any thread: from now on, serve ``source``."""
        self._source = source  # one reference assignment: atomic

    def _refusal(self, sender: str, request: StateRequest, source: StateSource | None) -> StateRefusal | None:
        if source is None:
            return StateRefusal(error="this peer has no state to serve yet")
        if request.step != source.outer_step:
            return StateRefusal(error=f"this peer is at outer step {source.outer_step}", moved=True)
        if sender in self._serving:
            return StateRefusal(error="one download per peer at a time")
        if len(self._serving) >= _MAX_SERVING:
            return StateRefusal(error="busy serving other peers")
        return None

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        traffic, sender = wire.Traffic(), info.peer_id.to_base58()
        if not self._admitted(sender):
            return await wire.close(writer)  # a private run does not talk to peers outside it
        source = self._source  # a newer one may replace it while we send: we finish with this one
        serving = False
        try:
            request = await asyncio.wait_for(
                wire.recv_message(reader, (StateRequest,), traffic), timeout=10.0
            )
            refusal = self._refusal(sender, request, source)
            if refusal is not None:
                return await wire.send_message(writer, refusal, traffic)
            self._serving.add(sender)
            serving = True
            nbytes = await self._send(writer, source, request.inner, traffic)
            logger.info(f"served the state of outer step {source.outer_step} to {sender} ({nbytes} bytes)")
        except StateMoved:
            logger.info(
                f"stopped serving the state of outer step {source.outer_step} to {sender}: we moved on"
            )
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            logger.info(f"state download by {sender} broke off: {e!r}")
        except asyncio.CancelledError:  # we are shutting down; the downloader tries another donor
            return
        except Exception:
            logger.exception(f"failed to serve the state to {sender}")
        finally:
            if serving:
                self._serving.discard(sender)
            await wire.finish(reader, writer)  # our answer reaches a slow asker whole

    async def _send(
        self, writer: asyncio.StreamWriter, source: StateSource, want_inner: bool, traffic: wire.Traffic
    ) -> int:
        """The header, the file window by window (each read off this thread), then its hash."""
        entries = source.entries(want_inner)
        metadata = {
            "format": state_format.FORMAT,
            "outer_step": str(source.outer_step),
            "inner_step": str(source.inner_step),
            "params_sha256": source.params_sha256,
        }
        nbytes = state_format.size(entries, metadata)
        header = StateHeader(
            outer_step=source.outer_step,
            params_sha256=source.params_sha256,
            nbytes=nbytes,
            inner=any(name in state_format.INNER for name, _ in entries),
        )
        deadline = time.monotonic() + self.timeout  # a reader that stalls frees its slot by then
        await asyncio.wait_for(wire.send_message(writer, header, traffic), self.timeout)
        blocks, digest, loop = (
            state_format.stream(entries, metadata, source.read),
            hashlib.sha256(),
            asyncio.get_running_loop(),
        )
        while (block := await loop.run_in_executor(None, next, blocks, None)) is not None:
            digest.update(block)
            view = memoryview(block)
            for offset in range(0, len(block), CHUNK_BYTES):
                left = max(deadline - time.monotonic(), 0)
                await asyncio.wait_for(
                    wire.send_frame(writer, view[offset : offset + CHUNK_BYTES], traffic), left
                )
        await wire.send_message(writer, StateTrailer(blob_sha256=digest.hexdigest()), traffic)
        return nbytes
