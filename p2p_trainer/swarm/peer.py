"""The swarm as the training loop sees it: one object, plain blocking calls at round boundaries.

Under it: our DHT node (its own process, with p2pd), and a private event loop thread that talks
to p2pd through a replica of the DHT's P2P. Everything network-facing runs on that loop;
``publish_progress`` and ``round_should_close`` never wait for the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from p2p_trainer.codec import Codec, get_codec
from p2p_trainer.config import SwarmConfig
from p2p_trainer.swarm import procs
from p2p_trainer.swarm.allreduce import AllReducer, Fault
from p2p_trainer.swarm.errors import RoundFailed, SwarmError
from p2p_trainer.swarm.identity import check_announce_maddrs, check_multiaddrs, load_identity, start_dht
from p2p_trainer.swarm.loop import LoopThread
from p2p_trainer.swarm.matchmaking import Matchmaker
from p2p_trainer.swarm.progress import ProgressBoard, ProgressRecord, make_validators, swarm_outer_step
from p2p_trainer.swarm.state import (
    DonorFailed,
    Download,
    StateServer,
    TrainingState,
    donors,
    fetch,
    params_sha256,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

_LEAVE_GRACE_S = 3.0  # a peer asked to leave during an all-reduce gives the round this long to finish
_DOWNLOAD_PASSES = 3  # rounds of asking every donor before a download gives up


class Interrupted(SwarmError):
    """``interrupt()`` was called (SIGINT/SIGTERM): the blocking call was abandoned."""


def _finished_round(record: ProgressRecord) -> bool:
    """Its owner stopped training its round and waits in matchmaking (see ``all_reduce``'s record)."""
    return record.tokens > 0 and record.tokens_per_s == 0.0


@dataclass
class RoundResult:
    average: torch.Tensor  # Σ w_j Δ_j / Σ w_j, bit-identical on every member of the group
    group_size: int
    total_weight: float
    bytes_sent: int
    bytes_received: int
    allreduce_s: float
    wait_s: float  # time spent finding the group (waiting for partners)
    excluded: list[str]  # peer ids left out of at least one slice
    reasons: dict[str, str] = field(default_factory=dict)  # why each was left out
    members: list[str] = field(default_factory=list)  # the group in its agreed (accumulation) order
    group_id: str = ""  # the same on every member of the group


class SwarmPeer:
    """Joins (or starts) the swarm of ``cfg.run_id``; raises SwarmError with a one-line reason.

    ``fingerprint`` (model config, tokenizer, data mix, codec, ...) must equal the swarm's; None joins
    as an observer (for ``p2p-trainer status``) that checks and publishes nothing.
    ``fault``: test seam, see ``OutgoingPart``."""

    def __init__(
        self,
        cfg: SwarmConfig,
        fingerprint: dict | None,
        *,
        fault: Fault | None = None,
    ) -> None:
        self.cfg = cfg
        self._closed = False
        self._dht: hivemind.DHT | None = None
        self._loop: LoopThread | None = None
        self._board: ProgressBoard | None = None
        self._p2p: P2P | None = None
        self._state_server: StateServer | None = None
        self._refresh_asked = -math.inf
        self._interrupted_at: float | None = None
        self.last_error = ""  # why the last all_reduce returned None
        initial_peers = check_multiaddrs(cfg.initial_peers, "swarm.initial_peers", need_peer_id=True)
        host_maddrs = check_multiaddrs(cfg.host_maddrs, "swarm.host_maddrs")
        announce_maddrs = check_announce_maddrs(cfg.announce_maddrs)
        try:
            codec = get_codec(cfg.codec)
            codec.encode(torch.zeros(16))  # a codec that builds native code lazily does it now, not mid-round
        except ValueError as e:
            raise SwarmError(f"swarm.codec: {e}") from None
        self._identity = load_identity(cfg.identity)
        self.peer_id: str = self._identity.peer_id
        try:
            validators = make_validators(cfg.run_id, self._identity.private_key)
            self._dht = start_dht(
                identity=self._identity,
                initial_peers=initial_peers,
                host_maddrs=host_maddrs,
                announce_maddrs=announce_maddrs,
                client_mode=cfg.client_mode,
                join_timeout=cfg.join_timeout,
                validators=validators,
            )
            self._loop = LoopThread(f"swarm-{self.peer_id[-6:]}")
            self.visible_maddrs: list[str] = self._loop.run(
                self._start(validators[0], fingerprint, cfg.record_ttl, codec, fault), timeout=60.0
            )
        except TimeoutError:
            self.shutdown()
            raise SwarmError("the swarm node started but did not become ready within 60s") from None
        except BaseException:
            self.shutdown()
            raise
        logger.info(
            f"swarm peer {self.peer_id} is up; others can join through {' '.join(self.visible_maddrs)}"
        )

    async def _start(
        self,
        signer: RSASignatureValidator,
        fingerprint: dict | None,
        ttl: float,
        codec: Codec,
        fault: Fault | None,
    ) -> list[str]:
        cfg = self.cfg
        p2p = self._p2p = await self._dht.replicate_p2p()
        self._board = ProgressBoard(self._dht, cfg.run_id, signer, self.peer_id, ttl)
        if fingerprint is not None:
            await self._board.join_with_fingerprint(fingerprint)
        self._matchmaker = Matchmaker(
            p2p,
            self._board,
            run_id=cfg.run_id,
            peer_id=self.peer_id,
            client_mode=cfg.client_mode,
            timeout=cfg.matchmaking_timeout,
            target_group_size=cfg.target_group_size,
            min_group_size=cfg.min_group_size,
            max_weight=cfg.max_weight,
        )
        self._allreducer = AllReducer(
            p2p,
            run_id=cfg.run_id,
            peer_id=self.peer_id,
            client_mode=cfg.client_mode,
            codec=codec,
            timeout=cfg.allreduce_timeout,
            max_weight=cfg.max_weight,
            fault=fault,
        )
        await self._matchmaker.start()
        await self._allreducer.start()
        if not cfg.client_mode:  # a client accepts no incoming streams, so it cannot serve its state
            self._state_server = StateServer(p2p, cfg.run_id)
            await self._state_server.start()
        self._heartbeat = self._loop.loop.create_task(self._board.heartbeat())
        try:
            return [str(m) for m in await p2p.get_visible_maddrs()]
        except ValueError:  # no listen address (possible for a client-mode peer)
            return []

    @property
    def fault(self) -> Fault | None:
        return self._allreducer.fault

    @fault.setter
    def fault(self, fault: Fault | None) -> None:
        """Tests swap the fault hook between rounds."""
        self._allreducer.fault = fault

    # ---- progress ----
    def publish_progress(
        self, *, outer_step: int, tokens: int, tokens_per_s: float, loss: float, params_sha256: str
    ) -> None:
        """Non-blocking: the record is stored by the loop thread; a newer one supersedes it.
        Call it every few inner steps, and right after an outer step with the new ``outer_step``:
        leaders wait for exactly the peers whose records say they are at the round's step."""
        if self._closed:
            return
        if params_sha256 and (len(params_sha256) != 64 or params_sha256.strip("0123456789abcdef")):
            raise ValueError(f"params_sha256 must be 64 lowercase hex digits or empty, got {params_sha256!r}")
        record = ProgressRecord(
            peer_id=self.peer_id,
            outer_step=int(outer_step),
            tokens=max(0, int(tokens)),
            tokens_per_s=float(tokens_per_s),
            loss=None if loss is None else float(loss),
            params_sha256=params_sha256,
            client_mode=self.cfg.client_mode,
            time=get_dht_time(),
        )
        self._loop.loop.call_soon_threadsafe(self._board.publish_soon, record)

    def swarm_records(self) -> dict[str, ProgressRecord]:
        """The live progress records of this run, freshly read (blocks for a DHT lookup)."""
        return self._wait(self._board.read(max_age=0.0), timeout=30.0)

    def swarm_outer_step(self) -> int | None:
        return swarm_outer_step(self.swarm_records())

    def run_fingerprint(self) -> dict | None:
        """The run fingerprint most other live peers published (None if nobody did)."""
        return self._loop.run(self._board.swarm_fingerprint(), timeout=30.0)[0]

    def round_should_close(self, *, outer_step: int, local_tokens: int, local_tokens_per_s: float) -> bool:
        """Token-target mode: True once the swarm's tokens for this round (ours now, the others'
        extrapolated from their records) reach ``cfg.round_tokens``. Never blocks: it works from
        records at most ~0.5 s old and asks the loop thread for fresher ones."""
        target = self.cfg.round_tokens
        if target <= 0:
            return False  # fixed-H mode: the caller counts its own steps
        if local_tokens >= target:
            return True
        others = self._recent_others()
        ahead = swarm_outer_step(others)
        if ahead is not None and ahead > outer_step:
            return True  # most of the swarm already closed this round: we are late
        now, total = get_dht_time(), float(local_tokens)
        for r in others.values():
            if r.outer_step == outer_step:
                total += r.tokens + r.tokens_per_s * min(max(now - r.time, 0.0), self._board.ttl)
        return total >= target

    def round_is_late(self, *, outer_step: int, catching_up: bool) -> bool:
        """Never blocks. True when this peer should end its round before its H steps: the swarm
        already moved past ``outer_step`` (it will catch up by downloading), or, while it is catching
        up after a download, every other live peer at this step finished training it and waits."""
        others = self._recent_others()
        ahead = swarm_outer_step(others)
        if ahead is not None and ahead > outer_step:
            return True
        if catching_up:
            at_step = [r for r in others.values() if r.outer_step == outer_step]
            return bool(at_step) and all(_finished_round(r) for r in at_step)
        return False

    def _recent_others(self) -> dict[str, ProgressRecord]:
        """Other peers' records at most ~0.5 s old, without waiting: asks the loop for a fresher read."""
        records, read_at = self._board.snapshot()
        if time.monotonic() - max(read_at, self._refresh_asked) > 0.5:
            self._refresh_asked = time.monotonic()
            self._loop.loop.call_soon_threadsafe(self._board.refresh)
        return {pid: r for pid, r in records.items() if pid != self.peer_id}

    # ---- the state: serving it, downloading it ----
    def publish_state(self, state: TrainingState) -> None:
        """Serve ``state`` (taken at our last outer step, never modified later) to peers that join or
        catch up. Cheap and non-blocking: serialization happens on first request, off this thread."""
        if self._state_server is not None and not self._closed:
            self._state_server.publish(state)

    def download_state(
        self, *, numel: int, want_inner: bool, progress: bool = False, rng: random.Random | None = None
    ) -> Download | None:
        """Blocking: fetch the state of the swarm's outer step (the median of the other peers') from
        a random donor at that step, and check θ against the hash most live records published for
        it. A mismatch, refusal or failure moves on to another donor. None when there is nothing to
        download or no donor gave a good state (the caller keeps its own)."""
        if self._closed:
            return None
        try:
            return self._wait(self._download(numel, want_inner, progress, rng or random.Random()), None)
        except (Interrupted, concurrent.futures.CancelledError):
            logger.warning("state download abandoned: this peer is shutting down")
            return None

    async def _download(
        self, numel: int, want_inner: bool, progress: bool, rng: random.Random
    ) -> Download | None:
        failures: list[str] = []
        loop = asyncio.get_running_loop()
        for attempt in range(_DOWNLOAD_PASSES):
            if attempt:
                await asyncio.sleep(1.0)
            records = await self._board.read(max_age=0.0)
            step, sha, candidates = donors(records, self.peer_id, rng)
            if not candidates:
                failures.append(
                    "no full peer holds the swarm's agreed state" if step >= 0 else "no other peer"
                )
                continue
            await self._announce_joining(step)
            holders = sum(
                1
                for pid, r in records.items()
                if pid != self.peer_id and r.outer_step == step and r.params_sha256 == sha
            )
            for donor in candidates:
                started = time.monotonic()
                bar = None
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(desc=f"state of outer step {step}", unit="B", unit_scale=True, leave=False)

                def show(got: int, total: int, bar: Any = bar) -> None:
                    if bar is not None:
                        bar.total = total
                        bar.update(got - bar.n)

                try:
                    got, nbytes = await asyncio.wait_for(
                        fetch(
                            self._p2p,
                            self.cfg.run_id,
                            donor,
                            step,
                            numel=numel,
                            want_inner=want_inner,
                            progress=show,
                        ),
                        self.cfg.state_timeout,
                    )
                    actual = await loop.run_in_executor(None, params_sha256, got.master)
                    if actual != sha:
                        raise DonorFailed(
                            f"its θ hashes to {actual[:12]}, but {holders} live peer(s) published {sha[:12]} "
                            f"for outer step {step}"
                        )
                except asyncio.TimeoutError:
                    failures.append(f"{donor}: no state within state_timeout={self.cfg.state_timeout:g}s")
                    logger.warning(f"state download from {donor}: {failures[-1]}; trying another donor")
                    continue
                except DonorFailed as e:
                    failures.append(f"{donor}: {e}")
                    logger.warning(f"state download from {donor} failed: {e}; trying another donor")
                    continue
                finally:
                    if bar is not None:
                        bar.close()
                seconds = time.monotonic() - started
                logger.info(
                    f"downloaded the state of outer step {step} from {donor} ({nbytes / 2**20:.1f} MiB in "
                    f"{seconds:.1f}s); θ matches the hash {sha[:12]} that {holders} live peer(s) published"
                )
                return Download(got, donor, nbytes, seconds, failures)
        logger.warning(f"could not download the swarm's state: {'; '.join(failures[-4:])}")
        return None

    async def _announce_joining(self, step: int) -> None:
        """Tell the swarm we are coming to round ``step`` before we download it, so its leader waits
        for us instead of closing the group while our state is still on the wire. The empty hash
        is no vote on θ, and our next real record supersedes this one if the download fails."""
        mine = self._board.mine
        if mine is None or mine.outer_step < step:
            record = ProgressRecord(
                peer_id=self.peer_id,
                outer_step=step,
                tokens=0,
                tokens_per_s=0.0,
                loss=None,
                params_sha256="",
                client_mode=self.cfg.client_mode,
                time=get_dht_time(),
            )
            await self._board.publish_now(record)

    # ---- leaving in the middle of a blocking call ----
    def interrupt(self) -> None:
        """Safe from a signal handler: blocking calls in progress (and later ones) give up soon.
        Matchmaking and downloads stop at once; an all-reduce gets a few seconds to finish, so the
        others keep their round if it was nearly done."""
        if self._interrupted_at is None:
            self._interrupted_at = time.monotonic()

    def _wait(self, coro: Coroutine[Any, Any, T], timeout: float | None, grace: float = 0.0) -> T:
        """Run ``coro`` on the loop and wait for it; cancel it on timeout (TimeoutError) or
        ``grace`` seconds after ``interrupt()`` (Interrupted)."""
        if self._interrupted_at is not None and grace == 0.0:
            coro.close()
            raise Interrupted("this peer is shutting down")
        future = self._loop.submit(coro)
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return future.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                if future.done():
                    raise  # the coroutine itself raised TimeoutError
            now = time.monotonic()
            if self._interrupted_at is not None and now >= self._interrupted_at + grace:
                future.cancel()
                raise Interrupted("this peer is shutting down")
            if now >= deadline:
                future.cancel()
                raise TimeoutError(f"swarm operation did not finish within {timeout:.1f}s")

    # ---- the round ----
    def all_reduce(self, *, outer_step: int, vector: torch.Tensor, weight: float) -> RoundResult | None:
        """Average ``vector`` with this step's group, weighted by tokens. None when the round
        failed (no group, a reducer lost, ...): the caller keeps its parameters unchanged."""
        if not (vector.dtype == torch.float32 and vector.dim() == 1 and vector.is_contiguous()):
            raise TypeError("all_reduce needs a 1-D contiguous float32 tensor")
        if vector.device.type != "cpu":
            raise TypeError("all_reduce needs a CPU tensor")
        if not math.isfinite(weight):
            raise ValueError(f"all_reduce weight must be finite, got {weight!r}")
        if self._closed or self._interrupted_at is not None:
            self.last_error = "this peer is shutting down"
            logger.warning(f"round {outer_step} skipped: this peer is shutting down")
            return None
        self.last_error = ""
        started = time.monotonic()
        mine = self._board.mine
        final = ProgressRecord(  # our exact tokens for this round; we stopped training it
            peer_id=self.peer_id,
            outer_step=int(outer_step),
            tokens=max(0, int(weight)),
            tokens_per_s=0.0,
            loss=mine.loss if mine else None,
            params_sha256=mine.params_sha256 if mine else "",
            client_mode=self.cfg.client_mode,
            time=get_dht_time(),
        )
        cfg = self.cfg
        try:
            logger.info(f"round {outer_step}: looking for a group")
            group = self._wait(
                self._publish_and_match(final, outer_step, float(weight), vector.numel()),
                timeout=cfg.matchmaking_timeout + 30.0,
            )
            wait_s = time.monotonic() - started
            if len(group.members) == 1:
                logger.info(f"round {outer_step}: alone in the group; the average is our own vector")
                return RoundResult(
                    vector.clone(),
                    1,
                    float(weight),
                    0,
                    0,
                    0.0,
                    wait_s,
                    [],
                    {},
                    [self.peer_id],
                    group.group_id,
                )
            logger.info(f"round {outer_step}: all-reduce in group {group.group_id} of {len(group.members)}")
            reduce_started = time.monotonic()
            # a lost reducer costs up to two reply timeouts (its own, then its backup's)
            outcome = self._wait(
                self._allreducer.run(group, vector, float(weight)),
                timeout=4 * cfg.allreduce_timeout + 30.0,
                grace=_LEAVE_GRACE_S,
            )
        except (RoundFailed, TimeoutError) as e:
            self.last_error = str(e)
            logger.warning(f"round {outer_step} failed, keeping parameters unchanged: {e}")
            return None
        except (Interrupted, concurrent.futures.CancelledError):  # interrupt() or shutdown() during the round
            self.last_error = "this peer is shutting down"
            logger.warning(f"round {outer_step} abandoned: this peer is shutting down")
            return None
        return RoundResult(
            average=outcome.average,
            group_size=len(group.members),
            total_weight=outcome.total_weight,
            bytes_sent=outcome.traffic.sent,
            bytes_received=outcome.traffic.received,
            allreduce_s=time.monotonic() - reduce_started,
            wait_s=wait_s,
            excluded=sorted(outcome.excluded),
            reasons=outcome.excluded,
            members=[m.peer_id for m in group.members],
            group_id=group.group_id,
        )

    async def _publish_and_match(self, final: ProgressRecord, step: int, weight: float, numel: int):
        await self._board.publish_now(final)
        return await self._matchmaker.form_group(step, weight, numel)

    # ---- leaving ----
    def shutdown(self) -> None:
        """Idempotent: withdraw our record, stop the loop thread, the DHT process and p2pd."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._loop.alive:
            try:
                self._loop.run(self._leave(), timeout=3.0)
            except Exception as e:
                logger.debug(f"could not leave the swarm gracefully: {e!r}")
        if self._loop is not None:
            self._loop.stop()
        if self._dht is not None:
            procs.stop_dht(self._dht)
        self._identity.cleanup()

    async def _leave(self) -> None:
        if self._board is not None and self._board.mine is not None:
            await asyncio.wait_for(self._board.withdraw(), 2.0)  # nobody should wait for us in matchmaking
        if self._p2p is not None:
            await self._p2p.shutdown()  # our client of the daemon (the daemon itself goes with the DHT)

    def __enter__(self) -> SwarmPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
