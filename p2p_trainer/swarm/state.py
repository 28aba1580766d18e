"""The training state a peer needs to join a running swarm or catch up with it (θ, the outer
momentum, the outer step, the schedule position and, optionally, the inner AdamW state), its
serialized form, and serving it.

A donor serves an immutable snapshot taken at its last outer step, from the swarm's event loop
thread, so serving never blocks training (a newer snapshot replaces the reference; streams that
already started finish with the old one). Downloading it is ``swarm.download``.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.p2p import P2P

from p2p_trainer.swarm import wire

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # bytes per frame: the downloader's progress bar moves at least this often
_MAX_SERVING = 4  # concurrent downloads one donor serves; more are told to try another donor


@dataclass(frozen=True)
class TrainingState:
    outer_step: int
    params_sha256: str  # hash of ``master`` (see diloco.params_sha256)
    master: torch.Tensor  # θ, flat fp32
    momentum: torch.Tensor | None  # the outer optimizer's momentum buffer (None before the first step)
    inner_step: int  # the schedule position: inner steps this peer has done
    inner_optimizer: dict | None = None  # the inner AdamW state_dict, when the donor keeps it


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


# ---- (de)serialization: torch's format, loaded with weights_only (no code from a donor runs) ----
def _serialize(state: TrainingState, with_inner: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "outer_step": state.outer_step,
            "params_sha256": state.params_sha256,
            "master": state.master,
            "momentum": state.momentum,
            "inner_step": state.inner_step,
            "inner_optimizer": state.inner_optimizer if with_inner else None,
        },
        buffer,
    )
    return buffer.getvalue()


def _all_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def deserialize(blob: bytes | bytearray, numel: int) -> TrainingState:
    """Parse and check a donor's state; raise DonorFailed naming what is wrong."""
    try:
        raw = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or hostile file: many exception types
        raise DonorFailed(f"unreadable state ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(raw, dict):
        raise DonorFailed("the state is not a dictionary")
    master, momentum = raw.get("master"), raw.get("momentum")
    if not (isinstance(master, torch.Tensor) and master.dtype == torch.float32 and master.shape == (numel,)):
        raise DonorFailed(f"θ is not a flat fp32 vector of {numel} values")
    if momentum is not None and not (
        isinstance(momentum, torch.Tensor) and momentum.dtype == torch.float32 and momentum.shape == (numel,)
    ):
        raise DonorFailed("the outer momentum does not match θ")
    if not _all_finite(master) or (momentum is not None and not _all_finite(momentum)):
        raise DonorFailed("θ or the outer momentum holds non-finite values")
    step, inner_step = raw.get("outer_step"), raw.get("inner_step")
    if not (isinstance(step, int) and step >= 0 and isinstance(inner_step, int) and inner_step >= 0):
        raise DonorFailed(f"bad outer step {step!r} or inner step {inner_step!r}")
    inner = raw.get("inner_optimizer")
    if inner is not None and not (isinstance(inner, dict) and _all_finite(inner)):
        logger.warning("the donor's inner optimizer state is malformed or non-finite: ignoring it")
        inner = None
    return TrainingState(step, str(raw.get("params_sha256", "")), master, momentum, inner_step, inner)


# ---- donor side --------------------------------------------------------------------------------
class _Snapshot:
    def __init__(self, state: TrainingState) -> None:
        self.state = state
        self.blobs: dict[bool, asyncio.Future[bytes]] = {}  # serialized lazily, on the loop thread only


class StateServer:
    """Serves our latest snapshot to peers that ask (full peers only: clients accept no streams)."""

    def __init__(self, p2p: P2P, run_id: str) -> None:
        self._p2p, self._handler = p2p, handler_name(run_id)
        self._snapshot: _Snapshot | None = None
        self._serving = 0

    async def start(self) -> None:
        await self._p2p.add_binary_stream_handler(self._handler, self._handle)

    def publish(self, state: TrainingState) -> None:
        """Any thread: from now on, serve ``state`` (which must not be modified afterwards)."""
        self._snapshot = _Snapshot(state)  # one reference assignment: atomic

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        traffic, sender = wire.Traffic(), info.peer_id.to_base58()
        snapshot = self._snapshot  # a newer snapshot may replace it while we send: we finish this one
        try:
            request = await asyncio.wait_for(wire.recv_json(reader, traffic), timeout=10.0)
            if snapshot is None:
                return await wire.send_json(writer, {"error": "this peer has no state to serve yet"}, traffic)
            state = snapshot.state
            if request.get("step") != state.outer_step:
                return await wire.send_json(
                    writer,
                    {"error": f"this peer is at outer step {state.outer_step}", "moved": True},
                    traffic,
                )
            if self._serving >= _MAX_SERVING:
                return await wire.send_json(writer, {"error": "busy serving other peers"}, traffic)
            self._serving += 1
            try:
                with_inner = bool(request.get("inner")) and state.inner_optimizer is not None
                if with_inner not in snapshot.blobs:
                    loop = asyncio.get_running_loop()
                    snapshot.blobs[with_inner] = loop.run_in_executor(None, _serialize, state, with_inner)
                blob = await snapshot.blobs[with_inner]
                header = {
                    "outer_step": state.outer_step,
                    "params_sha256": state.params_sha256,
                    "nbytes": len(blob),
                    "inner": with_inner,
                }
                await wire.send_json(writer, header, traffic)
                view = memoryview(blob)
                for offset in range(0, len(blob), CHUNK_BYTES):
                    await wire.send_frame(writer, view[offset : offset + CHUNK_BYTES], traffic)
                logger.info(
                    f"served the state of outer step {state.outer_step} to {sender} ({len(blob)} bytes)"
                )
            finally:
                self._serving -= 1
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            logger.info(f"state download by {sender} broke off: {e!r}")
        except asyncio.CancelledError:  # we are shutting down; the downloader tries another donor
            return
        except Exception:
            logger.exception(f"failed to serve the state to {sender}")
        finally:
            await wire.close(writer)
