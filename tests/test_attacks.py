"""One of 4 workers hostile, 8 rounds of DiLoCo averaged by the swarm's own aggregation code: with
the robust aggregation the honest θ's held-out loss stays within 2% of the all-honest run (5% for
noise), with the plain mean it visibly does not. The whole matrix: ``python -m bench.bench_attacks``."""

import pytest

from p2p_trainer.testing.simulate import run_diloco

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def honest() -> float:
    return run_diloco()


@pytest.mark.parametrize(
    "attack, bound",
    [
        ("huge", 2.0),
        ("sign_flip_x10", 2.0),
        ("weight_x1e6", 2.0),
        ("nan", 2.0),
        ("stale_5_rounds", 2.0),
        ("noise", 5.0),
    ],
)
def test_robust_aggregation_keeps_the_honest_loss(honest, attack, bound):
    loss = run_diloco(attack=attack, mode="clip")
    assert 100 * (loss / honest - 1) <= bound, (attack, loss, honest)


@pytest.mark.parametrize("attack", ["huge", "sign_flip_x10", "weight_x1e6"])
def test_the_plain_mean_is_moved_where_the_attacker_wants(honest, attack):
    assert run_diloco(attack=attack, mode="mean") > 1.2 * honest


def test_robust_aggregation_costs_nothing_visible_when_everyone_is_honest(honest):
    assert abs(run_diloco(mode="clip") / honest - 1) < 0.005
