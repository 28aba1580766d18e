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
import os
import signal
import time
from dataclasses import dataclass, field

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

logger = logging.getLogger(__name__)


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
        self._refresh_asked = -math.inf
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
        return self._loop.run(self._board.read(max_age=0.0), timeout=30.0)

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
        records, read_at = self._board.snapshot()
        if time.monotonic() - max(read_at, self._refresh_asked) > 0.5:
            self._refresh_asked = time.monotonic()
            self._loop.loop.call_soon_threadsafe(self._board.refresh)
        others = {pid: r for pid, r in records.items() if pid != self.peer_id}
        ahead = swarm_outer_step(others)
        if ahead is not None and ahead > outer_step:
            return True  # most of the swarm already closed this round: we are late
        now, total = get_dht_time(), float(local_tokens)
        for r in others.values():
            if r.outer_step == outer_step:
                total += r.tokens + r.tokens_per_s * min(max(now - r.time, 0.0), self._board.ttl)
        return total >= target

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
        if self._closed:
            logger.warning(f"round {outer_step} skipped: this peer has shut down")
            return None
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
            group = self._loop.run(
                self._publish_and_match(final, outer_step, float(weight), vector.numel()),
                timeout=cfg.matchmaking_timeout + 30.0,
            )
            wait_s = time.monotonic() - started
            if len(group.members) == 1:
                logger.info(f"round {outer_step}: alone in the group; the average is our own vector")
                return RoundResult(
                    vector.clone(), 1, float(weight), 0, 0, 0.0, wait_s, [], {}, [self.peer_id]
                )
            reduce_started = time.monotonic()
            outcome = self._loop.run(
                self._allreducer.run(group, vector, float(weight)), timeout=3 * cfg.allreduce_timeout + 30.0
            )
        except (RoundFailed, TimeoutError) as e:
            logger.warning(f"round {outer_step} failed, keeping parameters unchanged: {e}")
            return None
        except concurrent.futures.CancelledError:  # shutdown() was called while the round ran
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
            helpers = procs.descendants(self._dht.pid) if self._dht.pid else []
            self._dht.shutdown()
            for pid in helpers:  # p2pd normally exits with the DHT; make sure it did
                if procs.command_name(pid) == "p2pd":
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
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
