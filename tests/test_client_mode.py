"""Two full peers and one client-mode peer (outgoing connections only), as real CLI processes on
loopback, train 3 rounds: the client's tokens are in every round's average, it reduces no slice,
and all three hold the same parameters after each round."""

import pytest

from p2p_trainer.metrics import read_metrics
from tests.e2e import start, train_args
from tests.volunteers import ROUND_ARGS, TINY_MODEL, peer_id_of, plan_first_peer, stop_all

STEPS = 3
NAMES = ("full0", "full1", "client")


@pytest.fixture(scope="module")
def client_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client_mode")
    first, maddr = plan_first_peer(tmp, "full0")
    common = (*ROUND_ARGS, *TINY_MODEL, "--max-outer-steps", str(STEPS), "--swarm.min_group_size", "3")
    extra = {
        "full0": first,
        "full1": ["--initial-peers", maddr],
        "client": ["--initial-peers", maddr, "--client-mode", "--identity", str(tmp / "client.key")],
    }
    procs = {}
    try:
        for name in NAMES:  # all at once: the joiners retry until the first peer listens
            procs[name] = start(train_args(tmp, name, *extra[name], *common), tmp / f"{name}.log")
        codes = {name: p.wait(timeout=150) for name, p in procs.items()}
    finally:
        stop_all(procs)  # only those still running: a test that timed out
    ids = {"full0": maddr.rsplit("/", 1)[1], "client": peer_id_of(tmp / "client.key")}
    records = {name: read_metrics(tmp / f"{name}.jsonl", "outer_step") for name in NAMES}
    return tmp, codes, ids, records


@pytest.mark.timeout(200)
def test_all_three_finish_cleanly(client_run):
    tmp, codes, _, _ = client_run
    logs = "\n".join(f"--- {n}\n" + (tmp / f"{n}.log").read_text()[-1500:] for n in NAMES)
    assert codes == {name: 0 for name in NAMES}, logs


@pytest.mark.timeout(200)
def test_client_tokens_are_in_every_average(client_run):
    _, _, ids, records = client_run
    for name in NAMES:
        assert [r["outer_step"] for r in records[name]] == list(range(1, STEPS + 1)), name
    for step in range(STEPS):
        rnd = {name: records[name][step] for name in NAMES}
        tokens = sum(r["tokens"] for r in rnd.values())
        assert rnd["client"]["tokens"] > 0
        for name, r in rnd.items():
            assert r["group_size"] == 3 and len(set(r["members"])) == 3, (name, r)
            assert ids["full0"] in r["members"] and ids["client"] in r["members"], (name, r)
            assert r["members"][-1] == ids["client"], "the client reduces no slice: it comes last"
            assert r["excluded"] == []
            assert r["total_weight"] == pytest.approx(tokens, rel=1e-6), f"round {step + 1} on {name}"


@pytest.mark.timeout(200)
def test_all_three_agree_on_the_parameters_every_round(client_run):
    records = client_run[3]
    for step in range(STEPS):
        hashes = {records[name][step]["params_sha256"] for name in NAMES}
        assert len(hashes) == 1, f"outer step {step + 1}: {hashes}"
    assert len({r["params_sha256"] for r in records["client"]}) == STEPS
