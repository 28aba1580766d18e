"""Real CLI peers with the overlapped outer step (``--outer.overlap eager``): every applied outer step
leaves the peers bit-identical, and a late joiner ends up with the state including the update that
was in flight when it downloaded (a second download after its first boundary), then agrees."""

import pytest

from p2p_trainer.metrics import read_metrics
from tests.e2e import start, train_args
from tests.volunteers import ROUND_ARGS, TINY_MODEL, plan_first_peer, stop_all, wait_until

pytestmark = pytest.mark.timeout(300)
STEPS = 8
ARGS = (*ROUND_ARGS, *TINY_MODEL, "--outer.overlap", "eager", "--swarm.matchmaking_timeout", "10")


def _slow(args: list[str]) -> list[str]:
    """Through the test entry point: inner steps 3x as long, rounds of about a second."""
    return [args[0], "-m", "p2p_trainer.testing.peer", "--slowdown", "3", *args[3:]]


def _outer(tmp, name):
    path = tmp / f"{name}.jsonl"
    return {r["outer_step"]: r for r in read_metrics(path, "outer_step")} if path.exists() else {}


def _both(tmp) -> set[int]:
    """Outer steps that p0 and p1 both applied (a round that failed under load, or a start-up split
    healed by a download, leaves a step out of one of them: what is waited for is a count)."""
    return set(_outer(tmp, "p0")) & set(_outer(tmp, "p1"))


@pytest.fixture(scope="module")
def overlapped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap")
    first, maddr = plan_first_peer(tmp, "p0")
    procs = {"p0": start(_slow(train_args(tmp, "p0", *first, *ARGS)), tmp / "p0.log")}
    procs["p1"] = start(_slow(train_args(tmp, "p1", "--initial-peers", maddr, *ARGS)), tmp / "p1.log")
    try:
        wait_until(lambda: max(_outer(tmp, "p0"), default=0) >= 2, 150, "the first average")
        # all three train until the test stops them: the late one after 3 outer steps of its own
        late = train_args(tmp, "late", "--initial-peers", maddr, *ARGS)
        procs["late"] = start(_slow(late), tmp / "late.log")
        wait_until(lambda: len(_outer(tmp, "late")) >= 3 and len(_both(tmp)) >= STEPS, 200,
                   f"3 outer steps of the late joiner and {STEPS} applied by both first peers")  # fmt: skip
    finally:
        codes = stop_all(procs)
    logs = "\n".join(f"--- {n}\n{(tmp / f'{n}.log').read_text()[-2500:]}" for n in procs)
    return tmp, codes, logs


def test_every_applied_outer_step_leaves_the_peers_identical(overlapped):
    tmp, codes, logs = overlapped
    assert codes == {"p0": 0, "p1": 0, "late": 0}, logs
    p0, p1 = _outer(tmp, "p0"), _outer(tmp, "p1")
    # with overlap the first boundary applies nothing: outer steps 2.. are averages, one round late
    assert min(p0) >= 2 and min(p1) >= 2, logs
    both = set(p0) & set(p1)
    assert len(both) >= STEPS, logs
    for step in both:
        assert p0[step]["params_sha256"] == p1[step]["params_sha256"], step
    assert len({r["params_sha256"] for r in p0.values()}) == len(p0)  # θ moves every applied step


def test_a_late_joiner_gets_the_update_in_flight_and_then_agrees(overlapped):
    tmp, _, logs = overlapped
    downloads = read_metrics(tmp / "late.jsonl", "state_download")
    assert downloads, logs
    late, p0 = _outer(tmp, "late"), _outer(tmp, "p0")
    agreed = sorted(s for s in late if s in p0 and late[s]["params_sha256"] == p0[s]["params_sha256"])
    assert agreed, logs
    after = [s for s in late if s >= agreed[0] and s in p0]
    assert all(late[s]["params_sha256"] == p0[s]["params_sha256"] for s in after), logs
