"""DiLoCo's outer step as one unit the training loop calls once a round (compare zeroband's
``Diloco.step`` and torchft's ``DiLoCo._perform_sync``): the pseudo-gradient, the swarm's
all-reduce, the outer Nesterov step, and the new θ back into every local rank's model. A failed
round changes nothing. The same object owns the outer state's other ways in and out: adopting a
downloaded state, the state served to others, checkpoints, and going back to a θ that trained.

The outer state is spread over the local ranks (see ``outer_state``): the leader (rank 0) talks to
the swarm and drives every change, the other ranks' values move through the pump.

Overlap (``outer.overlap``). ``none``: the round blocks, as in DiLoCo. ``delayed``: the round of
step s runs in the background while the inner steps of step s+1 compute, and its average is applied
one boundary later; the next inner phase starts from θ as it then is (its own last phase is in
flight). ``eager`` (after Kale et al. 2025, "eager updates"): the same, but the next phase starts
from θ moved on by this peer's own pseudo-gradient in flight, at ``EAGER_LOOKAHEAD`` (3/4) of the
outer learning rate, and the next pseudo-gradient is measured from that start, so the phase does
not learn again what the round in flight carries, and nothing is sent twice. That look-ahead is
local: θ itself, the master copy every peer holds, only ever takes the all-reduced averages, so
replicas stay bit-identical.
(Measuring from θ instead, as the paper does, cost 5-6% held-out loss here; the whole outer step
as look-ahead +1.16% at H=50 against 3/4's +0.68%, over three data orders: bench/notes/paired.md.)
With overlap the outer step advances at every boundary; a failed round applies nothing (that round
is lost).

Error feedback (``outer.error_feedback``): what the codec did not send of our pseudo-gradient (our
part minus what it decodes to) is added to the next round's, so quantization or sparsification
error does not leave the model; a failed round's whole part carries over. What we did send but the
applied average is zero at (a sparse reducer keeps only the top-k of the average) comes back too,
so the members' residuals also hold what the return leg dropped. Kept in checkpoints, reset when a
downloaded state replaces ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from p2p_trainer.config import OuterConfig
from p2p_trainer.contracts import RoundResult
from p2p_trainer.inner import InnerLoop
from p2p_trainer.outer_state import LiveState, OuterState
from p2p_trainer.ranks import LocalRanks
from p2p_trainer.swarm import StateFile, SwarmPeer
from p2p_trainer.swarm.peer import PendingRound
from p2p_trainer.swarm.state_format import FORMAT, MAX_LOCAL_HEADER, WINDOW, StateFormatError

logger = logging.getLogger(__name__)

# eager: the share of the outer step the next phase's start takes with our own pseudo-gradient in
# flight, chosen by paired runs (bench/notes/paired.md)
EAGER_LOOKAHEAD = 0.75


@dataclass
class RoundReport:
    """One round as every local rank learns it (no tensor)."""

    applied: bool
    metrics: dict[str, Any] = field(default_factory=dict)  # RoundResult.metrics() or the failure's timing
    params_sha256: str = ""  # θ after the round
    params_finite: bool = True
    error: str = ""  # why the round failed ("" with nothing to apply yet: the first overlapped one)
    advanced: bool = False  # the outer step moved on (always with overlap; with none only if applied)
    eager: float = 0.0  # eager updates: the share of our pseudo-gradient in flight the model starts with


@dataclass
class _InFlight:
    """A round whose all-reduce runs while the next inner steps compute (overlap)."""

    step: int
    round: PendingRound


class _Part:
    """Our part of a round, as the all-reduce reads it: window by window, from every rank."""

    def __init__(self, state: OuterState) -> None:
        self.state, self.numel = state, state.numel

    def read(self, lo: int, hi: int) -> torch.Tensor:
        return self.state.pump.read("part", lo, hi)


class _Sent:
    """Where the all-reduce puts what our part decodes to (error feedback), on every rank."""

    def __init__(self, state: OuterState) -> None:
        self.state = state

    def write(self, lo: int, hi: int, values: torch.Tensor) -> None:
        self.state.pump.write("sent", lo, hi, values)


class OuterSync:
    """``swarm`` exists on the leader only (None on the other ranks)."""

    def __init__(
        self,
        ranks: LocalRanks,
        inner: InnerLoop,
        swarm: SwarmPeer | None,
        cfg: OuterConfig | None = None,
        *,
        error_feedback: bool = False,
    ) -> None:
        cfg = cfg or OuterConfig()
        self.ranks, self.inner, self.swarm = ranks, inner, swarm
        self.overlap, self.outer_lr, self.error_feedback = cfg.overlap, cfg.lr, error_feedback
        self.state = OuterState(ranks, inner, cfg, error_feedback=error_feedback)
        self.diloco = self.state.diloco  # this rank's share of θ and of the momentum
        self._in_flight: _InFlight | None = None
        self._good_step: int | None = None  # the outer step of the kept state that trained
        # one rank: the tensor the last applied round's average was decoded into; the next round
        # decodes into it again (a fresh one costs its first touch, every round: bench/notes/allreduce.md).
        # With overlap a round starts before the last one is applied, so two take turns.
        self._spare: torch.Tensor | None = None
        # the schedule position when θ was last committed (the one we serve and publish with it)
        self.committed_inner_step = inner.step_count

    @property
    def outer_step(self) -> int:
        return self.diloco.outer_step  # moves on every rank in step

    @property
    def residual(self) -> torch.Tensor | None:
        return self.state.residual

    def sync(self, outer_step: int, weight: float, *, last: bool = False) -> RoundReport:
        """Average this round's pseudo-gradient with the swarm (weighted by ``weight`` tokens) and take
        the outer step; on every rank. With overlap, start this round and apply the previous one
        (``last``: the run ends here, so start none whose average would never be applied)."""
        if self.overlap == "none":
            report = self.ranks.on_leader(lambda: self._blocking(outer_step, weight))
        else:
            report = self.ranks.on_leader(lambda: self._overlapped(outer_step, weight, last))
        if report.advanced:
            self.state.to_model(report.eager)
        return report

    def close(self) -> None:
        """On every rank, at the end: a round still in flight is waited for (a stop cancels it; it
        reads through the pump), then the pump's threads end."""
        if self.ranks.leader and self._in_flight is not None:
            self._in_flight.round.result()
            self._in_flight = None
        self.state.close()

    def _all_reduce(self, outer_step: int, weight: float, *, background: bool):
        call = self.swarm.start_all_reduce if background else self.swarm.all_reduce
        out, self._spare = self._spare, None  # (always None with several ranks: see ``_apply``)
        return call(
            outer_step=outer_step,
            vector=_Part(self.state),
            weight=weight,
            sent=_Sent(self.state) if self.error_feedback else None,
            keep_average=self.ranks.world == 1,  # with several ranks the average streams to them
            out=out,
        )

    def _blocking(self, outer_step: int, weight: float) -> RoundReport:
        started = time.perf_counter()
        result = self._all_reduce(outer_step, weight, background=False)
        if result is None:  # our local progress carries into the next round: the residual stays as it was
            elapsed = time.perf_counter() - started
            return RoundReport(False, {"allreduce_s": elapsed}, error=self.swarm.last_error)
        return self._apply(result, ef="ef_blocking" if self.error_feedback else None)

    def _overlapped(self, outer_step: int, weight: float, last: bool) -> RoundReport:
        state, pump = self.state, self.state.pump
        previous, self._in_flight = self._in_flight, None
        result = previous.round.result() if previous is not None else None  # had a whole phase to finish
        if previous is not None and self.error_feedback:  # a failed round's whole part carries over
            pump.call("ef_overlap", float(result is not None))
        pump.call("snapshot")  # this round's part: the model's progress since this phase began
        if not last:
            pending = self._all_reduce(outer_step, weight, background=True)
            self._in_flight = _InFlight(outer_step, pending)
        # eager: the next phase starts from θ moved on by our own pseudo-gradient in flight, at 3/4 of
        # the outer learning rate (the whole of it is what the outer step would do if we were alone)
        eager = EAGER_LOOKAHEAD * self.outer_lr if self.overlap == "eager" and not last else 0.0
        if result is not None and previous.step == outer_step - 1:
            report = self._apply(result)
            report.eager = eager
            return report
        with state.lock:
            pump.call("skip")
            state.version += 1
            if not self.diloco.committed_sha256:  # a fresh θ is that step's θ now
                state.commit()
        self.committed_inner_step = self.inner.step_count
        why = self.swarm.last_error if previous is not None else ""
        return RoundReport(False, {}, self.diloco.committed_sha256, error=why, advanced=True, eager=eager)

    def _apply(self, result: RoundResult, ef: str | None = None) -> RoundReport:
        """Leader: the outer step with the round's average, window by window on every rank."""
        state, pump = self.state, self.state.pump
        with state.lock:
            if ef is not None:
                pump.call(ef)  # before θ moves: the residual is our part minus what it sent
            for lo, hi, average in self._average_windows(result):
                pump.write("apply", lo, hi, average)
            pump.call("end_step")
            state.version += 1
            finite = state.commit()
        self.committed_inner_step = self.inner.step_count
        if result.average is not None:  # applied: free for the next round's average
            self._spare = result.average
        return RoundReport(True, result.metrics(), self.diloco.committed_sha256, finite, advanced=True)

    def _average_windows(self, result: RoundResult) -> Iterator[tuple[int, int, torch.Tensor]]:
        if result.average is not None:
            for lo in range(0, result.average.numel(), WINDOW):
                yield lo, min(lo + WINDOW, result.average.numel()), result.average[lo : lo + WINDOW]
        elif result.encoded is not None:
            for lo, hi, payload in result.encoded:
                yield lo, hi, self.swarm.decode(payload, hi - lo)
        else:  # alone in the group: the average is our own part
            part = _Part(self.state)
            for lo in range(0, part.numel, WINDOW):
                yield lo, min(lo + WINDOW, part.numel), part.read(lo, min(lo + WINDOW, part.numel))

    def copy_to_model(self) -> None:
        """θ into the possibly sharded model of every rank (each rank its own rows)."""
        self.state.to_model()

    @property
    def committed_sha256(self) -> str:
        """The hash the leader publishes ("" on other ranks and before the first outer step)."""
        return self.diloco.committed_sha256 if self.ranks.leader else ""

    def commitments(self) -> dict[str, Any]:
        """Leader only: what our progress records say of our state (see ``SwarmPeer.publish_progress``)."""
        return {
            "params_sha256": self.diloco.committed_sha256,
            "state_sha256": self.diloco.committed_state_sha256,
            "inner_step": self.committed_inner_step,
        }

    # ---- the state others download, and a downloaded one ----
    def source(self, *, with_inner: bool) -> LiveState:
        """Leader only: the state as of our last outer step, for serving (read live, window by window)."""
        return self.state.source(self.committed_inner_step, with_inner=with_inner)

    def adopt(self, file: StateFile | None, *, with_inner: bool) -> tuple[int, int]:
        """On every rank (``file`` is the leader's, verified; others pass None): θ, outer momentum
        and step, the schedule position and, if sent, the inner moments. (outer step, inner step)."""
        if self.state.residual is not None:
            logger.info(
                "error feedback: the residual of our own θ does not apply to the downloaded one; reset"
            )
        self._load(file, inner=with_inner, residual=False)
        return self.outer_step, self.inner.step_count

    def _load(self, file: StateFile | None, *, inner: bool, residual: bool) -> None:
        """Every rank: the leader's ``file`` (verified: its hashes are known) becomes our state."""
        path = self.ranks.share(str(file.path) if file is not None else None)
        mine = file if self.ranks.leader else StateFile(path, self.state.numel, max_header=MAX_LOCAL_HEADER)
        if self.ranks.leader:
            self.state.lock.acquire()
        try:
            self.state.load(mine, inner=inner, residual=residual)
            self.ranks.share(None)  # every rank has loaded before the leader lets readers in
            if self.ranks.leader:
                self.diloco.commit(file.hashes["master"], file.hashes.get("momentum"))
        finally:
            if self.ranks.leader:
                self.state.lock.release()
            else:
                mine.close()
        self.inner.step_count = self.committed_inner_step = self.ranks.share(mine.inner_step)
        self.state.to_model()

    # ---- a θ that does not train ----
    def vouch(self) -> None:
        """Every rank: the current outer state trained to a finite loss; keep a copy to fall back to
        (on disk: memory holds one copy of the outer state, not two)."""
        if self._good_step != self.outer_step:
            self.state.keep_good()
            self._good_step = self.outer_step

    def roll_back(self) -> tuple[int, str]:
        """On every rank: back to the last outer state that trained; (its outer step, the hash of the
        θ given up, "" on other ranks)."""
        given_up = ""
        if self._good_step is not None and self._good_step != self.outer_step:
            if self.ranks.leader:
                given_up = self.diloco.committed_sha256
                self.state.lock.acquire()
            try:
                self.state.back_to_good()
                self.ranks.share(None)
                if self.ranks.leader:
                    self.state.commit()
            finally:
                if self.ranks.leader:
                    self.state.lock.release()
        self.state.to_model()
        self.inner.reset_optimizer()
        return self.outer_step, given_up

    # ---- checkpoints ----
    def write_checkpoint(self, f: BinaryIO, extra: dict[str, str]) -> None:
        """Leader only: the outer state, residual and inner moments, and ``extra`` metadata, as one
        state file (the other ranks' values stream through the pump)."""
        metadata = {
            "format": FORMAT,
            "outer_step": str(self.outer_step),
            "inner_step": str(self.committed_inner_step),
            "params_sha256": self.diloco.committed_sha256,
            **{f"extra.{key}": value for key, value in extra.items()},
        }
        self.state.write_file(f, metadata, with_inner=True)

    def restore(self, file: StateFile | None) -> str:
        """On every rank (``file``: the leader's checkpoint, verified): continue from it. The leader
        hashes θ again from every rank's share, so a checkpoint that any number of ranks wrote is
        known to be loaded whole; that hash on the leader ("" elsewhere)."""
        self._load(file, inner=True, residual=True)
        if not self.ranks.leader:
            return ""
        written = self.diloco.committed_sha256
        with self.state.lock:
            self.state.commit()
        loaded = self.diloco.committed_sha256
        if loaded != written:
            raise StateFormatError(f"θ loaded from {file.path} hashes to {loaded[:12]}, not {written[:12]}")
        return loaded
