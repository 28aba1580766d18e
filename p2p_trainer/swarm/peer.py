"""The swarm as the training loop sees it: one object, plain calls at round boundaries.

It wires the parts together (progress board, matchmaking, all-reduce, state serving and download)
on the node's event loop and offers their few entry points. ``publish_progress`` and
``recent_records`` never wait for the network; ``all_reduce`` and ``download_state`` block until
done, failed or interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time

import torch

from p2p_trainer.codec import SparseParams, get_codec
from p2p_trainer.config import SwarmConfig
from p2p_trainer.contracts import RoundResult, VectorSink, VectorSource, fingerprint_sha256
from p2p_trainer.swarm.allreduce import AllReducer, Fault
from p2p_trainer.swarm.download import Downloader
from p2p_trainer.swarm.errors import RoundFailed, SwarmError
from p2p_trainer.swarm.group import Group
from p2p_trainer.swarm.matchmaking import Matchmaker
from p2p_trainer.swarm.node import Interrupted
from p2p_trainer.swarm.observer import Observer
from p2p_trainer.swarm.records import ProgressRecord, Records, others
from p2p_trainer.swarm.reducer import ReducerFault
from p2p_trainer.swarm.state import Download, StateServer, StateSource
from p2p_trainer.swarm.verify import Signer

logger = logging.getLogger(__name__)

_LEAVE_GRACE_S = 3.0  # a peer asked to leave during an all-reduce gives the round this long to finish
_WITHDRAW_S = 3.0  # a leaving peer tries this long at most to withdraw its record
_SETTLE_S = 10.0  # ... and waits this long at most for the replies it still sends


class SwarmPeer(Observer):
    """A training peer of the swarm of ``cfg.run_id``: ``fingerprint`` (model config, tokenizer, data
    mix, codec, ...) must equal the swarm's. Raises SwarmError with a one-line reason.
    ``fault``, ``reducer_fault``: test seams, see ``OutgoingPart`` and ``ReducerFault``."""

    def __init__(
        self,
        cfg: SwarmConfig,
        fingerprint: dict,
        *,
        fault: Fault | None = None,
        reducer_fault: ReducerFault | None = None,
    ) -> None:
        try:
            sparse = SparseParams(cfg.sparse_chunk, cfg.sparse_k, cfg.sparse_bits)
            # one thread per codec call: a round already runs its chunks' calls side by side in executor
            # threads, and more per call only adds threads fighting for the same cores (and training's)
            self._codec = get_codec(cfg.codec, sparse=sparse, threads=1)
            # a codec that builds native code lazily does it now, not mid-round
            self._codec.encode(torch.zeros(16))
        except ValueError as e:
            raise SwarmError(f"swarm.codec: {e}") from None
        self.last_error = ""  # why the last all_reduce returned None
        super().__init__(cfg)
        if not self.admitted(self.peer_id):
            self.shutdown()
            raise SwarmError(
                f"this peer ({self.peer_id}) is not in swarm.private, the peers allowed in this private run; "
                "add it there (on every peer) or use its --identity"
            )
        try:
            self._node.call(self._start(fingerprint, fault), timeout=60.0)
            self.reducer_fault = reducer_fault
            self.visible_maddrs: list[str] = self._node.call(self._node.visible_maddrs(), timeout=30.0)
        except TimeoutError:
            self.shutdown()
            raise SwarmError("the swarm node started but did not become ready within 60s") from None
        except BaseException:
            self.shutdown()
            raise
        logger.info(
            f"swarm peer {self.peer_id} is up; others can join through {' '.join(self.visible_maddrs)}"
        )

    async def _start(self, fingerprint: dict, fault: Fault | None) -> None:
        cfg, p2p = self.cfg, self._node.p2p
        await self._board.join_with_fingerprint(fingerprint)
        self._matchmaker = Matchmaker(
            p2p,
            self._board,
            run_id=cfg.run_id,
            peer_id=self.peer_id,
            client_mode=cfg.client_mode,
            fingerprint_sha256=fingerprint_sha256(fingerprint),
            timeout=cfg.matchmaking_timeout,
            target_group_size=cfg.target_group_size,
            min_group_size=cfg.min_group_size,
            max_weight=cfg.max_weight,
            chunk=cfg.chunk_values,
            admitted=self.admitted,
            wait_for_slower=cfg.wait_for_slower,
            deadline_floor=cfg.deadline_floor,
        )
        self._allreducer = AllReducer(
            p2p,
            run_id=cfg.run_id,
            peer_id=self.peer_id,
            client_mode=cfg.client_mode,
            codec=self._codec,
            timeout=cfg.allreduce_timeout,
            max_weight=cfg.max_weight,
            signer=Signer(cfg.run_id, self._node.identity.private_key, self.peer_id, self._board.public_key),
            aggregation=cfg.aggregation,
            tau=cfg.aggregation_tau,
            recheck=cfg.recheck,
            ban=self._matchmaker.ban,
            admitted=self.admitted,
            fault=fault,
            wait_for_slower=cfg.wait_for_slower,
            deadline_floor=cfg.deadline_floor,
            read_keys=lambda: self._board.read(max_age=0.0),
        )
        self._downloader = Downloader(p2p, self._board, cfg.run_id, self.peer_id, cfg.state_timeout)
        await self._matchmaker.start()
        await self._allreducer.start()
        self._state_server = None
        if not cfg.client_mode:  # a client accepts no incoming streams, so it cannot serve its state
            self._state_server = StateServer(
                p2p, cfg.run_id, timeout=cfg.state_timeout, admitted=self.admitted
            )
            await self._state_server.start()
        self._heartbeat = self._node.loop.create_task(self._board.heartbeat())

    @property
    def fault(self) -> Fault | None:
        return self._allreducer.fault

    @fault.setter
    def fault(self, fault: Fault | None) -> None:
        """Tests swap the fault hook between rounds."""
        self._allreducer.fault = fault

    @property
    def reducer_fault(self) -> ReducerFault | None:
        return self._allreducer.service.fault

    @reducer_fault.setter
    def reducer_fault(self, fault: ReducerFault | None) -> None:
        """Tests make this peer a lying reducer (see ``ReducerFault``)."""
        self._allreducer.service.fault = fault

    # ---- progress ----
    def publish_progress(
        self,
        *,
        outer_step: int,
        tokens: int,
        tokens_per_s: float,
        loss: float | None,
        params_sha256: str,
        state_sha256: str = "",
        inner_step: int = 0,
    ) -> None:
        """Non-blocking: the record is stored by the loop thread; a newer one supersedes it.
        Call it every few inner steps, and right after an outer step with the new ``outer_step``:
        leaders wait for exactly the peers whose records say they are at the round's step."""
        if self._closed:
            return
        for name, sha in (("params_sha256", params_sha256), ("state_sha256", state_sha256)):
            if sha and (len(sha) != 64 or sha.strip("0123456789abcdef")):
                raise ValueError(f"{name} must be 64 lowercase hex digits or empty, got {sha!r}")
        record = self._board.record(
            outer_step=outer_step,
            tokens=tokens,
            tokens_per_s=tokens_per_s,
            loss=loss,
            params_sha256=params_sha256,
            state_sha256=state_sha256,
            inner_step=inner_step,
        )
        self._node.submit(self._board.publish_soon, record)

    def recent_records(self) -> Records:
        """The other peers' records, at most ~0.5 s old, without waiting for the network."""
        return others(self._board.recent(), self.peer_id)

    @property
    def record_ttl(self) -> float:
        return self._board.ttl

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        """An averaged chunk of a round result's ``encoded`` list, as values."""
        return self._allreducer.codec.decode(payload, numel)

    # ---- the state: serving it, downloading it ----
    def publish_state(self, state: StateSource) -> None:
        """Serve ``state`` (as of our last outer step) to peers that join or catch up. Cheap and
        non-blocking: it is read window by window when asked for, off this thread."""
        if self._state_server is not None and not self._closed:
            self._state_server.publish(state)

    def download_state(
        self,
        *,
        numel: int,
        want_inner: bool,
        progress: bool = False,
        rng: random.Random | None = None,
        avoid: set[str] = frozenset(),
        max_step: int | None = None,
    ) -> Download | None:
        """Blocking: the state of the swarm's outer step from a random donor, checked against the
        hash most live records published for it (see ``swarm.download``). None when there is nothing
        to download or no donor gave a good state (the caller keeps its own). ``avoid``: θ hashes
        never to take; ``max_step``: records claiming a later step are not believed."""
        if self._closed:
            return None
        coro = self._downloader.download(
            numel=numel,
            want_inner=want_inner,
            rng=rng or random.Random(),
            progress=progress,
            avoid=avoid,
            max_step=max_step,
        )
        try:
            return self._node.call(coro)
        except Interrupted:
            logger.warning("state download abandoned: this peer is shutting down")
            return None

    # ---- the round ----
    def all_reduce(
        self,
        *,
        outer_step: int,
        vector: torch.Tensor | VectorSource,
        weight: float,
        sent: VectorSink | None = None,
        keep_average: bool = True,
        out: torch.Tensor | None = None,
    ) -> RoundResult | None:
        """Average ``vector`` with this step's group, weighted by tokens. None when the round
        failed (no group, a reducer lost, ...): the caller keeps its parameters unchanged.
        ``sent``: where what our parts decode to goes (for error feedback); ``keep_average``: the
        result's ``average`` is one tensor, else its ``encoded`` chunks (see ``decode``).
        ``out``: the tensor that becomes ``average`` (its contents are undefined after a failed
        round); a caller that keeps one across rounds spares the fresh tensor's page faults."""
        pending = self.start_all_reduce(
            outer_step=outer_step, vector=vector, weight=weight, sent=sent, keep_average=keep_average, out=out
        )
        return pending.result()

    def start_all_reduce(
        self,
        *,
        outer_step: int,
        vector: torch.Tensor | VectorSource,
        weight: float,
        sent: VectorSink | None = None,
        keep_average: bool = True,
        out: torch.Tensor | None = None,
    ) -> PendingRound:
        """Find this step's group (blocking), then average ``vector`` with it in the background
        while the caller goes on (an overlapped outer step); ``vector`` must stay unchanged, and
        ``out`` unused, until the round's ``result()`` is in. A source that is not a tensor is read
        chunk by chunk, off the caller's thread."""
        for name, t in (("vector", vector), ("out", out)):
            if not isinstance(t, torch.Tensor):
                continue
            if not (t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous()):
                raise TypeError(f"all_reduce needs a 1-D contiguous float32 tensor as {name}")
            if t.device.type != "cpu":
                raise TypeError(f"all_reduce needs a CPU tensor as {name}")
        if out is not None and out.numel() != _numel(vector):
            raise ValueError(f"all_reduce out has {out.numel()} values, the vector {_numel(vector)}")
        if not math.isfinite(weight):
            raise ValueError(f"all_reduce weight must be finite, got {weight!r}")
        self.last_error = ""
        if self._closed or self._node.interrupted:
            return PendingRound.failed(self, outer_step, "this peer is shutting down", "skipped")
        started = time.monotonic()
        mine = self._board.mine
        # our exact tokens for this round, and no speed: we stopped training it (``finished_round``)
        final = self._board.record(
            outer_step=outer_step,
            tokens=int(weight),
            tokens_per_s=0.0,
            loss=mine.loss if mine else None,
            params_sha256=mine.params_sha256 if mine else "",
            state_sha256=mine.state_sha256 if mine else "",
            inner_step=mine.inner_step if mine else 0,
        )
        cfg = self.cfg
        try:
            logger.info(f"round {outer_step}: looking for a group")
            group = self._node.call(
                self._publish_and_match(final, outer_step, float(weight), _numel(vector)),
                timeout=cfg.matchmaking_timeout + 30.0,
            )
        except Exception as e:
            return PendingRound.failed(self, outer_step, *_failure(outer_step, e))
        if len(group.members) == 1:
            logger.info(f"round {outer_step}: alone in the group; the average is our own vector")
        else:
            logger.info(f"round {outer_step}: all-reduce in group {group.group_id} of {len(group.members)}")
        # a lost reducer costs up to two reply timeouts (its own, then its backup's)
        future = self._node.start(
            self._allreducer.run(group, vector, float(weight), sent=sent, keep_average=keep_average, out=out),
            timeout=4 * cfg.allreduce_timeout + 30.0,
            grace=_LEAVE_GRACE_S,
        )
        return PendingRound(self, outer_step, future, wait_s=time.monotonic() - started)

    async def _publish_and_match(self, final: ProgressRecord, step: int, weight: float, numel: int) -> Group:
        # a leader admits us only on a stored record at this step; when the DHT holds one already
        # (published while training), the final one (our exact tokens) follows the group instead of
        # competing with matchmaking's reads for the DHT
        stored = self._board.stored_at(step)
        if not stored:
            await self._board.publish_now(final)
        try:
            return await self._matchmaker.form_group(step, weight, numel)
        finally:
            if stored:
                self._board.publish_soon(final)

    # ---- leaving ----
    async def _leave(self) -> None:
        if self._board.mine is not None:  # nobody should wait for us in matchmaking
            with contextlib.suppress(asyncio.TimeoutError):  # the swarm may be gone already
                await asyncio.wait_for(self._board.withdraw(), _WITHDRAW_S)
        await self._allreducer.service.settle(_SETTLE_S)  # replies still on their way to slower members

    def __enter__(self) -> SwarmPeer:
        return self


def _numel(vector: torch.Tensor | VectorSource) -> int:
    return vector.numel() if isinstance(vector, torch.Tensor) else vector.numel


def _failure(outer_step: int, error: BaseException) -> tuple[str, str]:
    """(why, what happened) of a round that raised ``error``."""
    if isinstance(error, (RoundFailed, TimeoutError)):
        return str(error), "failed, keeping parameters unchanged"
    if isinstance(error, Interrupted):  # interrupt() or shutdown() during the round
        return "this peer is shutting down", "abandoned"
    # a bug, or input no check foresaw: the round fails, this peer lives on
    logger.error(f"round {outer_step}: unexpected error", exc_info=error)
    return f"unexpected error: {error!r}", "failed, keeping θ unchanged"


class PendingRound:
    """A round whose data phase runs in the background; ``result()`` waits for it (None: failed,
    and the peer's ``last_error`` says why)."""

    def __init__(self, peer: SwarmPeer, outer_step: int, future, *, wait_s: float = 0.0) -> None:
        self.peer, self.outer_step, self._future, self.wait_s = peer, outer_step, future, wait_s
        self._failure: tuple[str, str] | None = None

    @classmethod
    def failed(cls, peer: SwarmPeer, outer_step: int, why: str, what: str) -> PendingRound:
        pending = cls(peer, outer_step, None)
        pending._failure = (why, what)
        return pending

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def result(self) -> RoundResult | None:
        if self._failure is None:
            try:
                result = self.peer._node.outcome(self._future)
                result.wait_s = self.wait_s
                return result
            except Exception as e:
                self._failure = _failure(self.outer_step, e)
        why, what = self._failure
        self.peer.last_error = why
        logger.warning(f"round {self.outer_step} {what}: {why}")
        return None
