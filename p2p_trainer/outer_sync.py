"""DiLoCo's outer step as one unit the training loop calls once a round (compare zeroband's
``Diloco.step`` and torchft's ``DiLoCo._perform_sync``): the pseudo-gradient, the swarm's
all-reduce, the outer Nesterov step, and the new θ back into every local rank's model. A failed
round changes nothing. The same object owns the outer state's other ways in and out: adopting a
downloaded state, the snapshot served to others, and checkpoints.

Overlap (``outer.overlap``). ``none``: the round blocks, as in DiLoCo. ``delayed``: the round of
step s runs in the background while the inner steps of step s+1 compute, and its average is applied
one boundary later; the next inner phase starts from θ as it then is (its own last phase is in
flight). ``eager`` (after Kale et al. 2025, "eager updates"): the same, but the next phase starts
from θ moved by this peer's own fresh pseudo-gradient in place of its stale one (its token share of
the difference, at the outer learning rate): a local look-ahead; θ itself, the master copy every
peer holds, only ever takes the all-reduced averages, so replicas stay bit-identical. With overlap
the outer step advances at every boundary; a failed round applies nothing (that round is lost).

Error feedback (``outer.error_feedback``): what the codec did not send of our pseudo-gradient (our
part minus what it decodes to) is added to the next round's, so quantization or sparsification
error does not leave the model; a failed round's whole part carries over. Kept in checkpoints,
reset when a downloaded state replaces ours.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from p2p_trainer.config import OuterConfig
from p2p_trainer.contracts import RoundResult
from p2p_trainer.diloco import DiLoCo
from p2p_trainer.inner import InnerLoop
from p2p_trainer.ranks import LocalRanks
from p2p_trainer.swarm import SwarmPeer, TrainingState
from p2p_trainer.swarm.peer import PendingRound

logger = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """One round as every local rank learns it (no tensor)."""

    applied: bool
    metrics: dict[str, Any] = field(default_factory=dict)  # RoundResult.metrics() or the failure's timing
    params_sha256: str = ""  # θ after the round
    params_finite: bool = True
    error: str = ""  # why the round failed ("" with nothing to apply yet: the first overlapped one)
    advanced: bool = False  # the outer step moved on (always with overlap; with none only if applied)


@dataclass
class _InFlight:
    """A round whose all-reduce runs while the next inner steps compute (overlap)."""

    step: int
    round: PendingRound
    sent: torch.Tensor  # our part (pseudo-gradient + residual): the all-reduce reads it until it ends
    delta: torch.Tensor  # our pseudo-gradient alone (eager updates use it)
    weight: float


class OuterSync:
    """``diloco`` and ``swarm`` exist on the leader only (None on the other ranks)."""

    def __init__(
        self,
        ranks: LocalRanks,
        inner: InnerLoop,
        diloco: DiLoCo | None,
        swarm: SwarmPeer | None,
        cfg: OuterConfig | None = None,
        *,
        error_feedback: bool = False,
    ) -> None:
        self.ranks, self.inner, self.diloco, self.swarm = ranks, inner, diloco, swarm
        self.overlap = cfg.overlap if cfg is not None else "none"
        self.outer_lr = cfg.lr if cfg is not None else 1.0
        self.error_feedback = error_feedback
        self.residual: torch.Tensor | None = None  # leader: what the codec has not sent yet (EF)
        self._in_flight: _InFlight | None = None
        self._start: torch.Tensor | None = None  # leader: where the next inner phase starts
        self._good: dict[str, Any] | None = None  # the last outer state that trained to a finite loss
        # the schedule position when θ was last committed (the one we serve and publish with it)
        self.committed_inner_step = inner.step_count

    @property
    def outer_step(self) -> int:
        return self.ranks.on_leader(lambda: self.diloco.outer_step)

    def sync(self, outer_step: int, weight: float, *, last: bool = False) -> RoundReport:
        """Average this round's pseudo-gradient with the swarm (weighted by ``weight`` tokens) and take
        the outer step; on every rank. With overlap, start this round and apply the previous one
        (``last``: the run ends here, so start none whose average would never be applied)."""
        local = self.inner.export_params()  # a collective under FSDP
        if self.overlap == "none":
            report = self.ranks.on_leader(lambda: self._blocking(outer_step, local, weight))
        else:
            report = self.ranks.on_leader(lambda: self._overlapped(outer_step, local, weight, last))
        if report.advanced:
            self.copy_to_model(self._start)
            self._start = None
        return report

    def _part(self, delta: torch.Tensor) -> torch.Tensor:
        """What we contribute: the pseudo-gradient, plus what the codec has not sent yet (EF)."""
        return delta + self.residual if self.error_feedback and self.residual is not None else delta

    def _blocking(self, outer_step: int, local: torch.Tensor, weight: float) -> RoundReport:
        delta = self.diloco.pseudo_gradient(local)
        part = self._part(delta)
        started = time.perf_counter()
        result = self.swarm.all_reduce(
            outer_step=outer_step, vector=part, weight=weight, keep_sent=self.error_feedback
        )
        if result is None:  # our local progress carries into the next round: the residual stays as it was
            elapsed = time.perf_counter() - started
            return RoundReport(False, {"allreduce_s": elapsed}, error=self.swarm.last_error)
        if self.error_feedback:
            self.residual = part - result.sent
        return self._apply(result)

    def _apply(self, result: RoundResult) -> RoundReport:
        self.diloco.apply(result.average)
        self.committed_inner_step = self.inner.step_count
        finite = bool(torch.isfinite(self.diloco.master).all())
        return RoundReport(True, result.metrics(), self.diloco.committed_sha256, finite, advanced=True)

    def _overlapped(self, outer_step: int, local: torch.Tensor, weight: float, last: bool) -> RoundReport:
        delta = self.diloco.pseudo_gradient(local)
        previous, self._in_flight = self._in_flight, None
        result = previous.round.result() if previous is not None else None  # had a whole phase to finish
        if previous is not None and self.error_feedback:  # a failed round's whole part carries over
            self.residual = previous.sent - result.sent if result is not None else previous.sent
        if not last:
            part = self._part(delta)
            if self.error_feedback:
                self.residual = None  # it is in the part now; what is not sent comes back with the result
            pending = self.swarm.start_all_reduce(
                outer_step=outer_step, vector=part, weight=weight, keep_sent=self.error_feedback
            )
            self._in_flight = _InFlight(outer_step, pending, part, delta, weight)
        if result is not None and previous.step == outer_step - 1:
            report = self._apply(result)
            if self.overlap == "eager":  # our fresh pseudo-gradient in place of our stale one
                share = previous.weight / max(result.total_weight, 1e-30)
                self._start = self.diloco.master - self.outer_lr * share * (delta - previous.delta)
        else:
            self.diloco.skip()
            self.committed_inner_step = self.inner.step_count
            why = self.swarm.last_error if previous is not None else ""
            report = RoundReport(False, {}, self.diloco.committed_sha256, error=why, advanced=True)
        return report

    def copy_to_model(self, start: torch.Tensor | None = None) -> None:
        """θ (the leader's master copy, or ``start`` near it) into the possibly sharded model of
        every rank."""
        if self.ranks.leader:
            source = (start if start is not None else self.diloco.master).detach()
        self.inner.import_params(source if self.ranks.leader else None)

    @property
    def committed_sha256(self) -> str:
        """The hash the leader publishes ("" on other ranks and before the first outer step)."""
        return self.diloco.committed_sha256 if self.diloco is not None else ""

    def commitments(self) -> dict[str, Any]:
        """Leader only: what our progress records say of our state (see ``SwarmPeer.publish_progress``)."""
        return {
            "params_sha256": self.diloco.committed_sha256,
            "state_sha256": self.diloco.committed_state_sha256,
            "inner_step": self.committed_inner_step,
        }

    # ---- the state others download, and a downloaded one ----
    def snapshot(self, *, with_inner: bool) -> TrainingState:
        """Leader only: a copy of the state as of now, for serving (training goes on meanwhile)."""
        diloco = self.diloco.state_dict()  # copies
        inner = copy.deepcopy(self.inner.optimizer.state_dict()) if with_inner else None
        return TrainingState(
            diloco["outer_step"],
            self.diloco.committed_sha256,
            diloco["master"],
            diloco["momentum"],
            self.committed_inner_step,
            inner,
        )

    def adopt(self, state: TrainingState | None) -> tuple[int, int]:
        """On every rank (``state`` is the leader's; others pass None): θ, outer momentum and step,
        the schedule position and, where it fits, the inner optimizer. (outer step, inner step)."""
        if self.ranks.leader:
            self.diloco.load_state_dict(
                {"master": state.master, "momentum": state.momentum, "outer_step": state.outer_step}
            )
        self.copy_to_model()
        if self.residual is not None:
            logger.info(
                "error feedback: the residual of our own θ does not apply to the downloaded one; reset"
            )
            self.residual = None
        outer_step, inner_step = self.ranks.share((state.outer_step, state.inner_step) if state else None)
        self.inner.step_count = self.committed_inner_step = inner_step
        if state is not None and state.inner_optimizer is not None and self.ranks.world == 1:
            try:
                self.inner.load_state_dict({"optimizer": self._inner_optimizer(state), "step": inner_step})
            except (ValueError, KeyError, RuntimeError) as e:
                logger.warning("the donor's inner optimizer state does not fit (%s): keeping ours", e)
        return outer_step, inner_step

    def _inner_optimizer(self, state: TrainingState) -> dict[str, Any]:
        """The donor's per-parameter AdamW moments, shaped like our parameters, under our own
        hyperparameters (a donor does not get to set our learning rate)."""
        ours = self.inner.optimizer.state_dict()
        params = [p for group in self.inner.optimizer.param_groups for p in group["params"]]
        moments = state.inner_optimizer["state"]
        if set(moments) != set(range(len(params))):
            raise ValueError(f"moments for {len(moments)} parameters, the model has {len(params)}")
        shaped = {}
        for i, param in enumerate(params):
            exp_avg, exp_avg_sq = moments[i]["exp_avg"], moments[i]["exp_avg_sq"]
            if exp_avg.numel() != param.numel():
                raise ValueError(f"parameter {i} has {param.numel()} values, its moments {exp_avg.numel()}")
            shaped[i] = {
                "step": moments[i]["step"].reshape(()).float(),
                "exp_avg": exp_avg.view(param.shape),
                "exp_avg_sq": exp_avg_sq.view(param.shape),
            }
        return {"state": shaped, "param_groups": ours["param_groups"]}

    # ---- a θ that does not train ----
    def vouch(self) -> None:
        """Leader: the current outer state trained to a finite loss; keep a copy to fall back to
        (one more fp32 copy of θ and of the momentum)."""
        if self.diloco is not None and (
            self._good is None or self._good["outer_step"] != self.diloco.outer_step
        ):
            self._good = self.diloco.state_dict()

    def roll_back(self) -> tuple[int, str]:
        """On every rank: back to the last outer state that trained; (its outer step, the hash of the
        θ given up, "" on other ranks)."""
        given_up = ""
        if (
            self.ranks.leader
            and self._good is not None
            and self._good["outer_step"] != self.diloco.outer_step
        ):
            given_up = self.diloco.committed_sha256
            self.diloco.load_state_dict(self._good)
        self.copy_to_model()
        self.inner.reset_optimizer()
        return self.outer_step, given_up

    # ---- checkpoints ----
    def checkpoint_state(self) -> dict[str, Any]:
        """Leader only: the outer and inner state a checkpoint keeps."""
        inner = self.inner.state_dict() if self.ranks.world == 1 else None
        residual = None if self.residual is None else self.residual.clone()
        return {"diloco": self.diloco.state_dict(), "inner": inner, "residual": residual}

    def restore(self, saved: dict[str, Any]) -> None:
        """On every rank: continue from a checkpoint's state."""
        if self.diloco is not None:
            self.diloco.load_state_dict(saved["diloco"])
        self.copy_to_model()
        if saved.get("inner") is not None and self.ranks.world == 1:
            self.inner.load_state_dict(saved["inner"])
        self.committed_inner_step = self.inner.step_count
        if self.ranks.leader and self.error_feedback and saved.get("residual") is not None:
            self.residual = saved["residual"].clone()
