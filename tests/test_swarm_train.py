"""Three real trainers (CLI processes) and a bootstrap peer on loopback train a tiny model together."""

import time

import pytest

from p2p_trainer.metrics import read_metrics
from tests.e2e import LOOPBACK, cli, start, stop, train_args, wait_for_line
from tests.volunteers import TINY_MODEL

pytestmark = pytest.mark.timeout(300)
PEERS, STEPS = 3, 3


@pytest.fixture(scope="module")
def swarm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swarm")
    boot = start(
        cli("bootstrap", "--identity", str(tmp / "boot.key"), "--host-maddrs", LOOPBACK), tmp / "boot.log"
    )
    procs = []
    try:
        maddr = wait_for_line(tmp / "boot.log", "initial peer:", boot)
        t0 = time.monotonic()
        for i in range(PEERS):
            procs.append(
                start(
                    train_args(
                        tmp,
                        f"p{i}",
                        "--initial-peers",
                        maddr,
                        *TINY_MODEL,
                        "--swarm.matchmaking_timeout",  # the first waits for the last to start
                        "90",
                        "--max-outer-steps",
                        str(STEPS),
                        "--inner.steps_per_round",
                        "8",
                        "--log.eval_every",
                        "0",
                        "--swarm.min_group_size",
                        str(PEERS),
                        "--swarm.recheck",  # the traffic test counts the plain protocol's bytes
                        "0",
                    ),
                    tmp / f"p{i}.log",
                )
            )
        codes = [p.wait(timeout=240) for p in procs]
        elapsed = time.monotonic() - t0
        boot_code = stop(boot)
    finally:
        for p in [*procs, boot]:
            if p.poll() is None:
                p.kill()
    return tmp, codes, boot_code, elapsed


def test_all_peers_finish_cleanly(swarm_run):
    tmp, codes, boot_code, _ = swarm_run
    logs = "\n".join((tmp / f"p{i}.log").read_text()[-1500:] for i in range(PEERS))
    assert codes == [0] * PEERS and boot_code == 0, logs


def test_hashes_agree_every_outer_step(swarm_run):
    tmp = swarm_run[0]
    by_peer = [read_metrics(tmp / f"p{i}.jsonl", "outer_step") for i in range(PEERS)]
    for records in by_peer:
        assert [r["outer_step"] for r in records] == list(range(1, STEPS + 1))
        assert all(r["group_size"] == PEERS for r in records)
    for step in range(STEPS):
        hashes = {records[step]["params_sha256"] for records in by_peer}
        assert len(hashes) == 1, f"outer step {step + 1}: {hashes}"
    assert len({r["params_sha256"] for r in by_peer[0]}) == STEPS


def test_int8_traffic_is_a_quarter_of_fp32(swarm_run):
    from p2p_trainer.config_file import load_config
    from p2p_trainer.model import count_parameters

    tiny = {flag.lstrip("-"): value for flag, value in zip(TINY_MODEL[::2], TINY_MODEL[1::2], strict=True)}
    n_params = count_parameters(load_config("configs/debug.toml", tiny).model, 257)
    fp32_bound = 2 * (PEERS - 1) / PEERS * 4 * n_params
    for i in range(PEERS):
        for r in read_metrics(swarm_run[0] / f"p{i}.jsonl", "outer_step"):
            assert 0 < r["bytes_sent"] <= 0.27 * fp32_bound
            assert r["bytes_received"] > 0
