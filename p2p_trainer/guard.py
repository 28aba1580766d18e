"""What a peer does when its inner loss turns non-finite, instead of failing every later round on
the same θ (whose pseudo-gradient could not even be encoded).

The first non-finite loss of a round restarts the round from θ with fresh AdamW moments (the
moments, or one bad batch, may be what diverged). If the loss is non-finite again before any finite
step, θ itself does not train: the peer rolls back to the last outer state that did (kept by
``OuterSync.vouch``), refuses to download the θ it gave up, and says so. Every rank sees the same
(averaged) loss, so every rank takes the same branch.
"""

from __future__ import annotations

import enum
import logging
import math

from p2p_trainer.catch_up import CatchUp
from p2p_trainer.outer_sync import OuterSync

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    FINE = "fine"
    RESTARTED = "restarted"  # the round starts over from θ
    ROLLED_BACK = "rolled back"  # θ is given up: the round ends, the outer step went back


class FiniteGuard:
    def __init__(self, outer: OuterSync, catch_up: CatchUp) -> None:
        self.outer, self.catch_up = outer, catch_up
        self._restarted = False  # since the last finite step

    def after_step(self, loss: float, outer_step: int) -> Outcome:
        if math.isfinite(loss):
            self._restarted = False
            self.outer.vouch()
            return Outcome.FINE
        if not self._restarted:
            self._restarted = True
            logger.warning(
                f"inner loss is {loss} in round {outer_step}: restarting the round from θ with fresh "
                "AdamW moments"
            )
            self.outer.copy_to_model()
            self.outer.inner.reset_optimizer()
            return Outcome.RESTARTED
        self._restarted = False
        step, given_up = self.outer.roll_back()
        if given_up:
            self.catch_up.avoid.add(given_up)
        logger.warning(
            f"θ of outer step {outer_step} does not train (non-finite loss twice): back to the outer "
            f"state of step {step}; this peer will not download that θ again"
        )
        return Outcome.ROLLED_BACK
