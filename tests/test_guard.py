"""A non-finite inner loss: the round restarts from θ with fresh moments; when θ itself does not
train, the peer rolls back to the last outer state that did and never downloads the bad θ again.
Real parts (model, inner loop, DiLoCo, outer sync), no swarm."""

import math

import pytest
import torch

from p2p_trainer.catch_up import CatchUp
from p2p_trainer.config import InnerConfig, ModelConfig, OuterConfig
from p2p_trainer.guard import FiniteGuard, Outcome
from p2p_trainer.inner import InnerLoop
from p2p_trainer.metrics import MetricsWriter
from p2p_trainer.model import build_model
from p2p_trainer.outer_sync import OuterSync
from p2p_trainer.ranks import LocalRanks

pytestmark = pytest.mark.timeout(60)
MODEL = ModelConfig(
    hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seq_len=16
)


def _parts():
    inner = InnerLoop(
        build_model(MODEL, 50, seed=0), InnerConfig(total_steps=100, warmup_steps=0, decay_steps=0), 4
    )
    outer = OuterSync(LocalRanks(0, 1, torch.device("cpu")), inner, None, OuterConfig())
    catch_up = CatchUp(outer, None, MetricsWriter(None), with_inner=False, progress_bar=False)
    return inner, outer, catch_up, FiniteGuard(outer, catch_up)


def test_a_non_finite_loss_restarts_the_round_from_theta_with_fresh_moments():
    inner, outer, _, guard = _parts()
    batch = torch.randint(0, 50, (4, MODEL.seq_len + 1), generator=torch.Generator().manual_seed(1))
    assert guard.after_step(inner.step(batch).loss, 0) is Outcome.FINE
    assert inner.optimizer.state and not torch.equal(inner.export_params(), outer.diloco.master)
    assert guard.after_step(math.nan, 0) is Outcome.RESTARTED
    assert not inner.optimizer.state and torch.equal(inner.export_params(), outer.diloco.master)
    assert guard.after_step(inner.step(batch).loss, 0) is Outcome.FINE  # a finite step: all is well again
    assert guard.after_step(math.inf, 0) is Outcome.RESTARTED


def test_a_theta_that_does_not_train_is_rolled_back_and_never_downloaded_again():
    inner, outer, catch_up, guard = _parts()
    guard.after_step(1.0, 0)  # θ of step 0 trains: vouched for
    good = outer.diloco.master.clone()
    outer.diloco.apply(torch.full_like(good, 1e30))  # a poisoned outer step
    bad_sha = outer.diloco.committed_sha256
    assert outer.outer_step == 1
    assert guard.after_step(math.nan, 1) is Outcome.RESTARTED
    assert guard.after_step(math.nan, 1) is Outcome.ROLLED_BACK  # again, before any finite step
    assert outer.outer_step == 0 and torch.equal(outer.diloco.master, good)
    assert torch.equal(inner.export_params(), good) and bad_sha in catch_up.avoid
