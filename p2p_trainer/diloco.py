"""DiLoCo's outer loop on one rank's share of θ: the fp32 master copy, the pseudo-gradient and the
outer Nesterov step.

Everything here is elementwise, so it runs on any cut of the canonical flat vector: on the whole
vector (one rank), on each local rank's share (see ``shards``), window by window as the averaged
pseudo-gradient streams in. The step does what ``torch.optim.SGD`` (single-tensor, no dampening
or weight decay) does, value by value, so the bits never depend on how the vector is cut and every
peer that applies the same average to the same θ gets the same θ.
"""

from __future__ import annotations

import torch

from p2p_trainer.config import OuterConfig
from p2p_trainer.contracts import outer_state_sha256_from, params_sha256

__all__ = ["DiLoCo", "params_sha256"]


class DiLoCo:
    """Master copy θ (this rank's share) and the outer SGD (Nesterov) step over it."""

    def __init__(self, initial: torch.Tensor, cfg: OuterConfig, *, pin: bool = False):
        self.master = initial.detach().float().cpu().clone()
        if pin:  # copies to and from the GPU run without a staging buffer
            self.master = self.master.pin_memory()
        self.lr, self.mu = float(cfg.lr), float(cfg.momentum)
        self.nesterov = cfg.nesterov and self.mu > 0
        self.momentum: torch.Tensor | None = None  # allocated by the first outer step
        self.started = False  # the momentum holds a step (before: the first step sets it)
        self.outer_step = 0
        # the hash of θ (and of the momentum) as of the last outer step or loaded state; "" for a
        # fresh init, which the swarm must not count as a vote for any θ. Set by ``commit``, from
        # this share when it is all of θ, or from the leader's stream over all ranks
        self.committed_sha256, self.momentum_sha256 = "", None

    def pseudo_gradient(self, local: torch.Tensor) -> torch.Tensor:
        """Δ = θ − θ_local: the direction the inner steps moved, as a gradient of the outer step."""
        if local.shape != self.master.shape:
            raise ValueError(
                f"local parameters have {local.numel()} values, the master copy {self.master.numel()}"
            )
        return self.master - local.float()

    @torch.no_grad()
    def apply_window(self, a: int, b: int, averaged: torch.Tensor) -> None:
        """The outer step on values ``[a, b)`` with the swarm's averaged pseudo-gradient there; once
        every window of a step is applied, ``end_step``."""
        g = averaged.float()
        if self.mu:
            if self.momentum is None:
                self.momentum = torch.zeros_like(self.master)
            buf = self.momentum[a:b]
            if self.started:
                buf.mul_(self.mu).add_(g)
            else:
                buf.copy_(g)
            g = g.add(buf, alpha=self.mu) if self.nesterov else buf
        self.master[a:b].add_(g, alpha=-self.lr)

    def end_step(self) -> None:
        self.outer_step += 1
        self.started = self.momentum is not None

    @torch.no_grad()
    def apply(self, averaged: torch.Tensor) -> torch.Tensor:
        """One whole outer step (one rank); returns the new θ (do not modify it)."""
        if not torch.isfinite(averaged).all():
            raise ValueError("averaged pseudo-gradient holds non-finite values; outer step refused")
        self.apply_window(0, self.master.numel(), averaged.reshape(-1))
        self.end_step()
        self.commit()
        return self.master

    def skip(self) -> None:
        """An outer step with nothing to apply (an overlapped round that failed, or the first one):
        θ and the momentum stay, the step moves on."""
        self.outer_step += 1

    def sha256(self) -> str:
        """The hash of this share (of θ, with one rank)."""
        return params_sha256(self.master)

    def state_dict(self) -> dict:
        return {
            "master": self.master.clone(),
            "momentum": self.momentum.clone() if self.started else None,
            "outer_step": self.outer_step,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.master.copy_(state["master"])
        self.outer_step = int(state["outer_step"])
        self.load_momentum(state.get("momentum"))

    def load_momentum(self, momentum: torch.Tensor | None) -> None:
        self.started = momentum is not None
        self.momentum = None if momentum is None else momentum.detach().float().clone()

    def commit(self, params_sha: str | None = None, momentum_sha: str | None = None) -> None:
        """Record the hashes of θ and of the momentum as they are now: the given ones, or (when this
        share is all of θ) computed here."""
        if params_sha is None:
            params_sha = params_sha256(self.master)
            momentum_sha = params_sha256(self.momentum) if self.started else None
        self.committed_sha256, self.momentum_sha256 = params_sha, momentum_sha

    @property
    def committed_state_sha256(self) -> str:
        """The hash of θ, the momentum and the outer step (see ``contracts.outer_state_sha256``)."""
        if not self.committed_sha256:
            return ""
        return outer_state_sha256_from(self.committed_sha256, self.momentum_sha256, self.outer_step)
