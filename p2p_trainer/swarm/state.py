"""The training state a peer needs to join a running swarm or catch up with it (θ, the outer
momentum, the outer step, the schedule position and, optionally, the inner AdamW state), and
serving it; its bytes on the wire are ``state_format``, downloading it is ``swarm.download``.

A donor serves an immutable snapshot taken at its last outer step, from the swarm's event loop
thread, so serving never blocks training (a newer snapshot replaces the reference; streams that
already started finish with the old one). A donor serves at most ``_MAX_SERVING`` downloads at once
and one per peer, each within a write deadline, so peers that never read cannot block it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.p2p import P2P

from p2p_trainer.contracts import outer_state_sha256
from p2p_trainer.swarm import state_format, wire
from p2p_trainer.swarm.messages import StateHeader, StateRefusal, StateRequest

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # bytes per frame: the downloader's progress bar moves at least this often
_MAX_SERVING = 4  # concurrent downloads one donor serves; more are told to try another donor


@dataclass(frozen=True)
class TrainingState:
    outer_step: int
    params_sha256: str  # hash of ``master`` (see contracts.params_sha256)
    master: torch.Tensor  # θ, flat fp32
    momentum: torch.Tensor | None  # the outer optimizer's momentum buffer (None before the first step)
    inner_step: int  # the schedule position: inner steps this peer has done
    # the inner AdamW state: {"state": {param index: {"exp_avg", "exp_avg_sq", "step"}}, ...}
    inner_optimizer: dict | None = None

    @property
    def state_sha256(self) -> str:
        """The hash of what every peer of a round shares: θ, outer momentum, outer step."""
        return outer_state_sha256(self.master, self.momentum, self.outer_step)

    def to_bytes(self, with_inner: bool) -> bytes:
        return state_format.serialize(
            master=self.master,
            momentum=self.momentum,
            outer_step=self.outer_step,
            inner_step=self.inner_step,
            params_sha256=self.params_sha256,
            inner_optimizer=self.inner_optimizer if with_inner else None,
        )

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray, numel: int) -> TrainingState:
        """Raise StateFormatError naming what is wrong (see ``state_format``)."""
        parts = state_format.deserialize(blob, numel)
        inner = {"state": parts["inner_state"]} if parts["inner_state"] else None
        return cls(
            parts["outer_step"],
            parts["params_sha256"],
            parts["master"],
            parts["momentum"],
            parts["inner_step"],
            inner,
        )


@dataclass
class Download:
    state: TrainingState
    donor: str
    nbytes: int
    seconds: float
    failures: list[str] = field(default_factory=list)  # what went wrong with the donors tried before


class DonorFailed(Exception):
    """One donor could not give us a good state; the downloader tries another."""


def handler_name(run_id: str) -> str:
    return f"p2p_trainer.{run_id}.state"


class _Snapshot:
    def __init__(self, state: TrainingState) -> None:
        self.state = state
        self.blobs: dict[
            bool, asyncio.Future[tuple[bytes, str]]
        ] = {}  # serialized lazily, on the loop thread


def _encode(state: TrainingState, with_inner: bool) -> tuple[bytes, str]:
    blob = state.to_bytes(with_inner)
    return blob, hashlib.sha256(blob).hexdigest()


class StateServer:
    """Serves our latest snapshot to peers that ask (full peers only: clients accept no streams)."""

    def __init__(
        self, p2p: P2P, run_id: str, *, timeout: float, admitted: Callable[[str], bool] = lambda peer_id: True
    ) -> None:
        self._p2p, self._handler, self.timeout, self._admitted = p2p, handler_name(run_id), timeout, admitted
        self._snapshot: _Snapshot | None = None
        self._serving: set[str] = set()

    async def start(self) -> None:
        await self._p2p.add_binary_stream_handler(self._handler, self._handle)

    def publish(self, state: TrainingState) -> None:
        """Any thread: from now on, serve ``state`` (which must not be modified afterwards)."""
        self._snapshot = _Snapshot(state)  # one reference assignment: atomic

    def _refusal(self, sender: str, request: StateRequest, snapshot: _Snapshot | None) -> StateRefusal | None:
        if snapshot is None:
            return StateRefusal(error="this peer has no state to serve yet")
        if request.step != snapshot.state.outer_step:
            return StateRefusal(error=f"this peer is at outer step {snapshot.state.outer_step}", moved=True)
        if sender in self._serving:
            return StateRefusal(error="one download per peer at a time")
        if len(self._serving) >= _MAX_SERVING:
            return StateRefusal(error="busy serving other peers")
        return None

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        traffic, sender = wire.Traffic(), info.peer_id.to_base58()
        if not self._admitted(sender):
            return await wire.close(writer)  # a private run does not talk to peers outside it
        snapshot = self._snapshot  # a newer snapshot may replace it while we send: we finish this one
        serving = False
        try:
            request = await asyncio.wait_for(
                wire.recv_message(reader, (StateRequest,), traffic), timeout=10.0
            )
            refusal = self._refusal(sender, request, snapshot)
            if refusal is not None:
                return await wire.send_message(writer, refusal, traffic)
            self._serving.add(sender)
            serving = True
            state = snapshot.state
            with_inner = request.inner and state.inner_optimizer is not None
            if with_inner not in snapshot.blobs:
                loop = asyncio.get_running_loop()
                snapshot.blobs[with_inner] = loop.run_in_executor(None, _encode, state, with_inner)
            blob, blob_sha256 = await snapshot.blobs[with_inner]
            header = StateHeader(
                outer_step=state.outer_step,
                params_sha256=state.params_sha256,
                nbytes=len(blob),
                inner=with_inner,
                blob_sha256=blob_sha256,
            )
            deadline = time.monotonic() + self.timeout  # a reader that stalls frees its slot by then
            await asyncio.wait_for(wire.send_message(writer, header, traffic), self.timeout)
            view = memoryview(blob)
            for offset in range(0, len(blob), CHUNK_BYTES):
                left = deadline - time.monotonic()
                await asyncio.wait_for(
                    wire.send_frame(writer, view[offset : offset + CHUNK_BYTES], traffic), max(left, 0)
                )
            logger.info(f"served the state of outer step {state.outer_step} to {sender} ({len(blob)} bytes)")
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            logger.info(f"state download by {sender} broke off: {e!r}")
        except asyncio.CancelledError:  # we are shutting down; the downloader tries another donor
            return
        except Exception:
            logger.exception(f"failed to serve the state to {sender}")
        finally:
            if serving:
                self._serving.discard(sender)
            await wire.close(writer)
