"""The training state a peer needs to join a running swarm or catch up with it: θ, the outer
momentum, the outer step, the schedule position (inner step count) and, optionally, the inner
AdamW state.

A donor serves an immutable snapshot taken at its last outer step, from the swarm's event loop
thread, so serving never blocks training (a newer snapshot replaces the reference; streams that
already started finish with the old one). A downloader picks its donor at random among the peers
at the swarm's outer step (newcomers spread over donors) and checks what it got against the hash
most live records published for that step, not only the donor's word; a mismatch, a refusal or a
failure moves on to another donor.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID

from p2p_trainer.swarm import wire
from p2p_trainer.swarm.progress import ProgressRecord, swarm_outer_step

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes per frame: the downloader's progress bar moves at least this often
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


# ---- what the swarm agrees on ------------------------------------------------------------------
def agreed_hash(records: dict[str, ProgressRecord], step: int, extra: str = "") -> str | None:
    """The θ hash most live records at ``step`` carry (plus ``extra``, one more vote); ties go to the
    smallest hash, so every peer that sees the same records picks the same one."""
    votes = Counter(r.params_sha256 for r in records.values() if r.outer_step == step and r.params_sha256)
    if extra:
        votes[extra] += 1
    if not votes:
        return None
    return min(votes, key=lambda h: (-votes[h], h))


def out_of_sync(
    records: dict[str, ProgressRecord], peer_id: str, step: int, sha: str, *, check_hash: bool
) -> str | None:
    """Why this peer (at ``step`` with θ hash ``sha``) must download the swarm's state, or None.

    Behind: the other peers' agreed step (median, never the max one record claims) is ahead of
    ours, e.g. we joined late or missed a round the others completed. Diverged: at our own step
    most live records (ours counted) hold another θ, e.g. we were alone in a round or the swarm
    split into two groups at start-up."""
    others = {pid: r for pid, r in records.items() if pid != peer_id}
    swarm_step = swarm_outer_step(others)
    if swarm_step is None:
        return None
    if swarm_step > step:
        return f"the swarm is at outer step {swarm_step}, this peer at {step}"
    if check_hash and swarm_step == step and sha:
        agreed = agreed_hash(others, step, extra=sha)
        if agreed is not None and agreed != sha:
            holders = sum(1 for r in others.values() if r.outer_step == step and r.params_sha256 == agreed)
            return (
                f"after outer step {step} this peer's θ ({sha[:12]}) differs from the one {holders} "
                f"other peer(s) hold ({agreed[:12]})"
            )
    return None


def donors(
    records: dict[str, ProgressRecord], peer_id: str, rng: random.Random
) -> tuple[int, str, list[str]]:
    """(step, hash, donors in a random order): the swarm's step, the hash most records hold there,
    and the full peers that published it. Empty when nobody has anything worth downloading."""
    others = {pid: r for pid, r in records.items() if pid != peer_id}
    step = swarm_outer_step(others)
    sha = agreed_hash(others, step) if step is not None else None
    if step is None or sha is None:
        return -1, "", []
    found = sorted(
        pid
        for pid, r in others.items()
        if r.outer_step == step and r.params_sha256 == sha and not r.client_mode
    )
    rng.shuffle(found)
    return step, sha, found


def params_sha256(flat: torch.Tensor) -> str:
    """The θ hash peers publish: sha256 of the fp32 bytes (the same as ``diloco.params_sha256``, which
    the swarm layer may not import)."""
    return hashlib.sha256(flat.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


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
        self._p2p, self._handler = p2p, f"p2p_trainer.{run_id}.state"
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
                for offset in range(0, len(blob), _CHUNK):
                    await wire.send_frame(writer, view[offset : offset + _CHUNK], traffic)
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


# ---- downloader side ---------------------------------------------------------------------------
async def fetch(
    p2p: P2P,
    run_id: str,
    donor: str,
    step: int,
    *,
    numel: int,
    want_inner: bool,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TrainingState, int]:
    """Ask ``donor`` for its state of outer ``step``; (state, bytes received). Raises DonorFailed."""
    traffic = wire.Traffic()
    limit = 4 * numel * (4 if want_inner else 2) + (16 << 20)  # θ, momentum (+ AdamW moments), slack
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(
            PeerID.from_base58(donor), f"p2p_trainer.{run_id}.state"
        )
    except Exception as e:
        raise DonorFailed(f"unreachable ({e!r})") from None
    try:
        await wire.send_json(writer, {"step": step, "inner": want_inner}, traffic)
        header = await wire.recv_json(reader, traffic)
        if "error" in header:
            raise DonorFailed(str(header["error"]))
        nbytes = header.get("nbytes")
        if not isinstance(nbytes, int) or not 0 < nbytes <= limit:
            raise DonorFailed(f"announced {nbytes!r} bytes (at most {limit} expected)")
        if header.get("outer_step") != step:
            raise DonorFailed(f"sent outer step {header.get('outer_step')!r}, we asked for {step}")
        blob, got = bytearray(nbytes), 0
        while got < nbytes:
            frame = await wire.recv_frame(reader, min(_CHUNK, nbytes - got), traffic)
            if not frame:
                raise DonorFailed("sent an empty frame")
            blob[got : got + len(frame)] = frame
            got += len(frame)
            if progress is not None:
                progress(got, nbytes)
    except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
        raise DonorFailed(f"the stream broke off ({e!r})") from None
    finally:
        await wire.close(writer)
    state = await asyncio.get_running_loop().run_in_executor(None, deserialize, blob, numel)
    if state.outer_step != step:
        raise DonorFailed(f"its state is of outer step {state.outer_step}, not {step}")
    return state, traffic.received
