import pytest
import torch

from p2p_trainer.config import OuterConfig
from p2p_trainer.diloco import DiLoCo, params_sha256

pytestmark = pytest.mark.timeout(30)


def test_single_worker_outer_step_is_nesterov_sgd():
    theta = torch.randn(1000)
    dl = DiLoCo(theta, OuterConfig(lr=0.7, momentum=0.9, nesterov=True))
    buf = torch.zeros(1000)
    expected = theta.clone()
    for _ in range(3):
        local = dl.master.detach() - 0.01 * torch.randn(1000)
        delta = dl.pseudo_gradient(local)
        buf = 0.9 * buf + delta
        expected = expected - 0.7 * (delta + 0.9 * buf)
        dl.apply(delta)
    torch.testing.assert_close(dl.master.detach(), expected, rtol=1e-5, atol=1e-6)
    assert dl.outer_step == 3


def test_lr1_no_momentum_is_plain_averaging():
    theta = torch.randn(100)
    dl = DiLoCo(theta, OuterConfig(lr=1.0, momentum=0.0))
    local = torch.randn(100)
    torch.testing.assert_close(dl.apply(dl.pseudo_gradient(local)), local, rtol=0, atol=1e-6)


def test_replicas_stay_bit_identical_and_state_round_trips():
    theta = torch.randn(5000)
    a, b = DiLoCo(theta, OuterConfig()), DiLoCo(theta, OuterConfig())
    for _ in range(3):
        avg = torch.randn(5000) * 1e-3
        a.apply(avg)
        b.apply(avg.clone())
    assert a.sha256() == b.sha256()
    c = DiLoCo(torch.zeros(5000), OuterConfig())
    c.load_state_dict(a.state_dict())
    avg = torch.randn(5000)
    assert torch.equal(a.apply(avg), c.apply(avg))
    assert a.sha256() == c.sha256() and a.outer_step == c.outer_step == 4


def test_non_finite_average_is_refused_and_theta_kept():
    dl = DiLoCo(torch.ones(10), OuterConfig())
    before = dl.sha256()
    bad = torch.zeros(10)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        dl.apply(bad)
    assert dl.sha256() == before and dl.outer_step == 0


def test_hash_sees_every_bit():
    x = torch.randn(64)
    y = x.clone()
    y.view(torch.int32)[17] ^= 1
    assert params_sha256(x) != params_sha256(y)
    assert params_sha256(x) == params_sha256(x.clone())
