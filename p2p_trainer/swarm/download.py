"""Downloading the swarm's training state: pick a donor, fetch, verify, and try another on failure.

A downloader picks its donor at random among the full peers at the swarm's outer step that hold
the agreed θ hash (newcomers spread over donors), and checks what it got against the hash most live
records published for that step, not only the donor's word; a mismatch, a refusal or a failure
moves on to another donor. Before fetching it announces that it is coming to that round, so the
round's leader waits for it instead of closing the group while its state is still on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hivemind.p2p import P2P, PeerID

from p2p_trainer.swarm import state_format, wire
from p2p_trainer.swarm.messages import StateHeader, StateRefusal, StateRequest, StateTrailer
from p2p_trainer.swarm.progress import ProgressBoard
from p2p_trainer.swarm.records import Donors, donors
from p2p_trainer.swarm.state import (
    CHUNK_BYTES,
    DonorFailed,
    Download,
    handler_name,
)
from p2p_trainer.swarm.state_format import StateFile

logger = logging.getLogger(__name__)

_PASSES = 3  # rounds of asking every donor before a download gives up

Progress = Callable[[int, int], None]  # (bytes received, bytes expected)


@dataclass
class Downloader:
    p2p: P2P
    board: ProgressBoard
    run_id: str
    peer_id: str
    timeout: float  # per donor

    async def download(
        self,
        *,
        numel: int,
        want_inner: bool,
        rng: random.Random,
        progress: bool = False,
        avoid: set[str] = frozenset(),
        max_step: int | None = None,
    ) -> Download | None:
        """The state of the swarm's outer step, verified; None when nobody gave a good one."""
        failures: list[str] = []
        for attempt in range(_PASSES):
            if attempt:
                await asyncio.sleep(1.0)
            records = await self.board.read(max_age=0.0)
            wanted = donors(records, self.peer_id, rng, max_step)
            if wanted.params_sha256 in avoid:
                logger.warning(f"the swarm's θ ({wanted.params_sha256[:12]}) is one this peer found unusable")
                return None
            if not wanted.peers:
                failures.append(
                    "no full peer holds the swarm's agreed state" if wanted.step >= 0 else "no other peer"
                )
                continue
            await self._announce_joining(wanted.step)
            holders = sum(
                1
                for r in records.values()
                if r.outer_step == wanted.step and r.params_sha256 == wanted.params_sha256
            )
            for donor in wanted.peers:
                started = time.monotonic()
                try:
                    with _progress_bar(progress, wanted.step) as show:
                        state, nbytes = await asyncio.wait_for(
                            self._fetch_verified(donor, wanted, holders, numel, want_inner, show),
                            self.timeout,
                        )
                except asyncio.TimeoutError:
                    failures.append(f"{donor}: no state within state_timeout={self.timeout:g}s")
                    logger.warning(f"state download from {donor}: {failures[-1]}; trying another donor")
                    continue
                except DonorFailed as e:
                    failures.append(f"{donor}: {e}")
                    logger.warning(f"state download from {donor} failed: {e}; trying another donor")
                    continue
                seconds = time.monotonic() - started
                logger.info(
                    f"downloaded the state of outer step {wanted.step} from {donor} "
                    f"({nbytes / 2**20:.1f} MiB in {seconds:.1f}s); θ matches the hash "
                    f"{wanted.params_sha256[:12]} that {holders} live "
                    "peer(s) published"
                )
                return Download(state, donor, nbytes, seconds, failures)
        logger.warning(f"could not download the swarm's state: {'; '.join(failures[-4:])}")
        return None

    async def _fetch_verified(
        self, donor: str, wanted: Donors, holders: int, numel: int, want_inner: bool, show: Progress
    ) -> tuple[StateFile, int]:
        """The donor's state, checked as a whole against what the swarm published for that step."""
        step = wanted.step
        state, nbytes = await fetch(
            self.p2p, self.run_id, donor, step, numel=numel, want_inner=want_inner, progress=show
        )
        try:
            try:
                actual, state_sha256 = await asyncio.get_running_loop().run_in_executor(None, state.verify)
            except state_format.StateFormatError as e:
                raise DonorFailed(f"malformed state: {e}") from None
            if actual != wanted.params_sha256:
                raise DonorFailed(
                    f"its θ hashes to {actual[:12]}, but {holders} live peer(s) published "
                    f"{wanted.params_sha256[:12]} for outer step {step}"
                )
            if wanted.state_sha256 and state_sha256 != wanted.state_sha256:
                raise DonorFailed(
                    "its outer momentum or step does not match the state hash the swarm published"
                )
            lo, hi = wanted.inner_steps
            if not lo <= state.inner_step <= hi:
                raise DonorFailed(
                    f"its schedule position {state.inner_step} is outside the published [{lo}, {hi}]"
                )
        except BaseException:
            state.discard()
            raise
        return state, nbytes

    async def _announce_joining(self, step: int) -> None:
        """Tell the swarm we are coming to round ``step`` before we download it. The empty hash is
        no vote on θ, and our next real record supersedes this one if the download fails."""
        mine = self.board.mine
        if mine is None or mine.outer_step < step:
            record = self.board.record(
                outer_step=step, tokens=0, tokens_per_s=0.0, loss=None, params_sha256=""
            )
            await self.board.publish_now(record)


@contextlib.contextmanager
def _progress_bar(enabled: bool, step: int) -> Iterator[Progress]:
    """A tqdm bar of bytes received while ``enabled``; yields the callback that moves it."""
    if not enabled:
        yield lambda got, total: None
        return
    from tqdm import tqdm

    bar = tqdm(desc=f"state of outer step {step}", unit="B", unit_scale=True, leave=False)

    def show(got: int, total: int) -> None:
        bar.total = total
        bar.update(got - bar.n)

    try:
        yield show
    finally:
        bar.close()


async def fetch(
    p2p: P2P,
    run_id: str,
    donor: str,
    step: int,
    *,
    numel: int,
    want_inner: bool,
    progress: Progress | None = None,
) -> tuple[StateFile, int]:
    """Ask ``donor`` for its state of outer ``step``, into a temporary file (no process holds the
    whole state in memory); (the file, bytes received). Raises DonorFailed. The announced size is
    checked before anything is written, the bytes against the donor's own hash before they are
    parsed; the file is deleted unless it is returned."""
    traffic = wire.Traffic()
    vectors = 4 if want_inner else 2  # θ, momentum (+ the two moments)
    limit = 4 * (numel * vectors + state_format.MAX_PARAMS) + state_format.MAX_HEADER + (1 << 20)
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(
            PeerID.from_base58(donor), handler_name(run_id)
        )
    except Exception as e:
        raise DonorFailed(f"unreachable ({e!r})") from None
    fd, path = tempfile.mkstemp(prefix="p2p-trainer-state-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            header = await _receive(reader, writer, f, step, limit, want_inner, traffic, progress)
        loop = asyncio.get_running_loop()
        try:
            state = await loop.run_in_executor(None, StateFile, path, numel)
        except state_format.StateFormatError as e:
            raise DonorFailed(f"malformed state: {e}") from None
        if state.outer_step != step or state.params_sha256 != header.params_sha256:
            state.close()
            raise DonorFailed(f"its state is of outer step {state.outer_step}, not {step}")
        return state, traffic.received
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


async def _receive(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    f: BinaryIO,
    step: int,
    limit: int,
    want_inner: bool,
    traffic: wire.Traffic,
    progress: Progress | None,
) -> StateHeader:
    try:
        await wire.send_message(writer, StateRequest(step=step, inner=want_inner), traffic)
        header = await wire.recv_message(reader, (StateHeader, StateRefusal), traffic)
        if isinstance(header, StateRefusal):
            raise DonorFailed(header.error)
        if header.nbytes > limit:
            raise DonorFailed(f"announced {header.nbytes} bytes (at most {limit} expected)")
        if header.outer_step != step:
            raise DonorFailed(f"sent outer step {header.outer_step}, we asked for {step}")
        got, digest = 0, hashlib.sha256()
        while got < header.nbytes:
            frame = await wire.recv_frame(reader, min(CHUNK_BYTES, header.nbytes - got), traffic)
            if not frame:
                raise DonorFailed("sent an empty frame")
            digest.update(frame)
            f.write(frame)
            got += len(frame)
            if progress is not None:
                progress(got, header.nbytes)
        trailer = await wire.recv_message(reader, (StateTrailer,), traffic)
    except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
        raise DonorFailed(f"the stream broke off ({e!r})") from None
    finally:
        await wire.close(writer)
    if digest.hexdigest() != trailer.blob_sha256:
        raise DonorFailed("its bytes do not match the hash it sent with them")
    return header
