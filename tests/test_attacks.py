"""One of 4 workers hostile, 8 rounds of DiLoCo averaged by the swarm's own aggregation code: with
the robust aggregation the honest θ's held-out loss stays within 2% of the all-honest run (5% for
noise), with the plain mean it visibly does not. The whole matrix: ``python -m bench.bench_attacks``."""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from p2p_trainer.testing.simulate import run_diloco

pytestmark = pytest.mark.timeout(300)


ROBUST = [("huge", 2.0), ("sign_flip_x10", 2.0), ("weight_x1e6", 2.0), ("nan", 2.0), ("stale_5_rounds", 2.0),
          ("noise", 5.0)]  # fmt: skip
MOVED = ["huge", "sign_flip_x10", "weight_x1e6"]


def _run(args: tuple[str | None, str]) -> float:
    import torch

    torch.set_num_threads(1)  # two of these share the two cores
    attack, mode = args
    return run_diloco(attack=attack, mode=mode)


@pytest.fixture(scope="module")
def losses() -> dict[tuple[str | None, str], float]:
    """Every simulation of this module, two at a time (each is one process's single-threaded work)."""
    runs = [(None, "mean"), (None, "clip"), *((a, "clip") for a, _ in ROBUST), *((a, "mean") for a in MOVED)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(runs, pool.map(_run, runs), strict=True))


@pytest.mark.parametrize("attack, bound", ROBUST)
def test_robust_aggregation_keeps_the_honest_loss(losses, attack, bound):
    loss, honest = losses[attack, "clip"], losses[None, "mean"]
    assert 100 * (loss / honest - 1) <= bound, (attack, loss, honest)


@pytest.mark.parametrize("attack", MOVED)
def test_the_plain_mean_is_moved_where_the_attacker_wants(losses, attack):
    assert losses[attack, "mean"] > 1.2 * losses[None, "mean"]


def test_robust_aggregation_costs_nothing_visible_when_everyone_is_honest(losses):
    assert abs(losses[None, "clip"] / losses[None, "mean"] - 1) < 0.005
