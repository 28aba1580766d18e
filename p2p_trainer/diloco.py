"""DiLoCo's outer loop: an fp32 master copy, pseudo-gradients and the outer Nesterov step.

Works on one flat fp32 CPU vector in a canonical order, so the result is bit-identical on every
peer that applies the same averaged pseudo-gradient to the same master copy.
"""

from __future__ import annotations

import torch

from p2p_trainer.config import OuterConfig
from p2p_trainer.contracts import outer_state_sha256, params_sha256

__all__ = ["DiLoCo", "params_sha256"]


class DiLoCo:
    """Master copy θ and the outer SGD (Nesterov) optimizer over it."""

    def __init__(self, initial: torch.Tensor, cfg: OuterConfig):
        self.master = torch.nn.Parameter(initial.detach().float().cpu().clone(), requires_grad=False)
        self.optimizer = torch.optim.SGD(
            [self.master],
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            foreach=False,
        )
        self.outer_step = 0
        # hashes of θ (and of θ, momentum and step) as of the last outer step or loaded state; "" for a
        # fresh init, which the swarm must not count as a vote for any θ
        self.committed_sha256 = self.committed_state_sha256 = ""

    def pseudo_gradient(self, local: torch.Tensor) -> torch.Tensor:
        """Δ = θ − θ_local: the direction the inner steps moved, as a gradient of the outer step."""
        if local.shape != self.master.shape:
            raise ValueError(
                f"local parameters have {local.numel()} values, the master copy {self.master.numel()}"
            )
        return self.master.detach() - local.float()

    @torch.no_grad()
    def apply(self, averaged: torch.Tensor) -> torch.Tensor:
        """Outer step with the swarm's averaged pseudo-gradient; returns the new θ (a view, do not modify)."""
        if not torch.isfinite(averaged).all():
            raise ValueError("averaged pseudo-gradient holds non-finite values; outer step refused")
        self.master.grad = averaged.float().reshape(self.master.shape).clone()
        self.optimizer.step()
        self.master.grad = None
        self.outer_step += 1
        self._commit()
        return self.master.detach()

    def skip(self) -> None:
        """An outer step with nothing to apply (an overlapped round that failed, or the first one):
        θ and the momentum stay, the step moves on."""
        self.outer_step += 1
        self._commit()

    def sha256(self) -> str:
        return params_sha256(self.master)

    def momentum(self) -> torch.Tensor | None:
        state = self.optimizer.state.get(self.master, {})
        return state.get("momentum_buffer")

    def state_dict(self) -> dict:
        momentum = self.momentum()
        return {
            "master": self.master.detach().clone(),
            "momentum": None if momentum is None else momentum.clone(),
            "outer_step": self.outer_step,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.master.copy_(state["master"])
        self.outer_step = int(state["outer_step"])
        self.optimizer.state.clear()
        if state.get("momentum") is not None:
            self.optimizer.state[self.master]["momentum_buffer"] = state["momentum"].clone()
        self._commit()

    def _commit(self) -> None:
        self.committed_sha256 = self.sha256()
        self.committed_state_sha256 = outer_state_sha256(self.master, self.momentum(), self.outer_step)
