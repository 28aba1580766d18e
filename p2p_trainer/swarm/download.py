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
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hivemind.p2p import P2P, PeerID

from p2p_trainer.contracts import params_sha256
from p2p_trainer.swarm import wire
from p2p_trainer.swarm.progress import ProgressBoard
from p2p_trainer.swarm.records import donors
from p2p_trainer.swarm.state import (
    CHUNK_BYTES,
    DonorFailed,
    Download,
    TrainingState,
    deserialize,
    handler_name,
)

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
        self, *, numel: int, want_inner: bool, rng: random.Random, progress: bool = False
    ) -> Download | None:
        """The state of the swarm's outer step, verified; None when nobody gave a good one."""
        failures: list[str] = []
        for attempt in range(_PASSES):
            if attempt:
                await asyncio.sleep(1.0)
            records = await self.board.read(max_age=0.0)
            step, sha, candidates = donors(records, self.peer_id, rng)
            if not candidates:
                failures.append(
                    "no full peer holds the swarm's agreed state" if step >= 0 else "no other peer"
                )
                continue
            await self._announce_joining(step)
            holders = sum(1 for r in records.values() if r.outer_step == step and r.params_sha256 == sha)
            for donor in candidates:
                started = time.monotonic()
                try:
                    with _progress_bar(progress, step) as show:
                        state, nbytes = await asyncio.wait_for(
                            self._fetch_verified(donor, step, sha, holders, numel, want_inner, show),
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
                    f"downloaded the state of outer step {step} from {donor} ({nbytes / 2**20:.1f} MiB in "
                    f"{seconds:.1f}s); θ matches the hash {sha[:12]} that {holders} live peer(s) published"
                )
                return Download(state, donor, nbytes, seconds, failures)
        logger.warning(f"could not download the swarm's state: {'; '.join(failures[-4:])}")
        return None

    async def _fetch_verified(
        self, donor: str, step: int, sha: str, holders: int, numel: int, want_inner: bool, show: Progress
    ) -> tuple[TrainingState, int]:
        state, nbytes = await fetch(
            self.p2p, self.run_id, donor, step, numel=numel, want_inner=want_inner, progress=show
        )
        actual = await asyncio.get_running_loop().run_in_executor(None, params_sha256, state.master)
        if actual != sha:
            raise DonorFailed(
                f"its θ hashes to {actual[:12]}, but {holders} live peer(s) published {sha[:12]} "
                f"for outer step {step}"
            )
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
) -> tuple[TrainingState, int]:
    """Ask ``donor`` for its state of outer ``step``; (state, bytes received). Raises DonorFailed."""
    traffic = wire.Traffic()
    limit = 4 * numel * (4 if want_inner else 2) + (16 << 20)  # θ, momentum (+ AdamW moments), slack
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(
            PeerID.from_base58(donor), handler_name(run_id)
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
            frame = await wire.recv_frame(reader, min(CHUNK_BYTES, nbytes - got), traffic)
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
