"""Real CLI peers with one hostile member (the test entry point, ``--attack``): 3 honest trainers and
one that attacks every round with another attack (huge values, a sign flip x10, NaN, a weight
claim x1e6, its part of 5 rounds ago). Every round still completes with the honest peers
bit-identical and finite; the attacker is clipped, left out, or (a claim beyond max_weight) refused
at the door; and the held-out loss falls."""

import math

import pytest

from p2p_trainer.metrics import read_metrics
from tests.e2e import start, train_args, wait_for_line
from tests.volunteers import plan_first_peer, stop_all, wait_until

pytestmark = pytest.mark.timeout(300)
# NaN before the weight claim: a claim refused at the door leaves the attacker retrying that round
# until the swarm moves on, then catching up by a download, and a round right after it can pass
# without the attacker (seen when the third honest peer took 22 s to start on a loaded machine)
ATTACKS = ["huge", "sign_flip_x10", "nan", "weight_x1e6", "stale_5_rounds"]
STEPS = 6
TINY = [
    "--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "4",
    "--model.intermediate_size", "128", "--model.seq_len", "64", "--data.batch_size", "8",
    "--data.micro_batch_size", "8", "--inner.steps_per_round", "5", "--log.eval_every", "3",
    "--swarm.min_group_size", "3", "--swarm.matchmaking_timeout", "10", "--max-outer-steps", str(STEPS),
]  # fmt: skip


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attack")
    first, maddr = plan_first_peer(tmp, "h0")
    procs = {"h0": start(train_args(tmp, "h0", *first, *TINY), tmp / "h0.log")}
    procs["h1"] = start(train_args(tmp, "h1", "--initial-peers", maddr, *TINY), tmp / "h1.log")
    hostile = train_args(tmp, "x", "--initial-peers", maddr, *TINY)
    hostile[1:3] = ["-m", "p2p_trainer.testing.peer", "--attack", ",".join(ATTACKS)]
    procs["x"] = start(hostile, tmp / "x.log")
    try:
        # the third honest peer starts once the attacker is in the swarm: the first group (3 members)
        # then forms with the attacker in it, instead of without it when it is the slowest to start
        wait_for_line(tmp / "x.log", "peer address:", procs["x"], 120)
        procs["h2"] = start(train_args(tmp, "h2", "--initial-peers", maddr, *TINY), tmp / "h2.log")
        wait_until(
            lambda: all(p.poll() is not None for n, p in procs.items() if n != "x"), 240, "the honest peers"
        )
    finally:
        stop_all(procs)
    logs = "\n".join(f"--- {n}\n{(tmp / f'{n}.log').read_text()[-2000:]}" for n in procs)
    return tmp, logs


def _outer(tmp, name):
    return {r["outer_step"]: r for r in read_metrics(tmp / f"{name}.jsonl", "outer_step")}


def test_every_round_completes_with_the_honest_peers_identical_and_finite(attacked):
    tmp, logs = attacked
    honest = [_outer(tmp, n) for n in ("h0", "h1", "h2")]
    for records in honest:  # a peer that started late joins through a download: its records start later
        assert sorted(records) == list(range(min(records), STEPS + 1)) and min(records) < STEPS, logs
    for step in range(1, STEPS + 1):  # every round has at least two honest peers, holding one θ
        present = [r[step] for r in honest if step in r]
        assert len(present) >= 2, (step, logs)
        assert len({r["params_sha256"] for r in present}) == 1, (step, logs)
        assert all(r["params_finite"] and math.isfinite(r["loss"]) for r in present)
        assert all(r["group_size"] >= 3 for r in present)


def test_the_attacker_is_clipped_left_out_or_capped_in_each_round(attacked):
    tmp, logs = attacked
    records = _outer(tmp, "h0")
    (hostile,) = {
        line.split("/p2p/")[-1].strip()
        for line in (tmp / "x.log").read_text().splitlines()
        if line.startswith("peer address:")
    }
    assert hostile in records[1]["members"], logs
    seen = set()
    for step in range(1, STEPS + 1):
        r, attack = records[step], ATTACKS[(step - 1) % len(ATTACKS)]
        if attack == "weight_x1e6":  # 2.56e9 tokens claimed: beyond max_weight, refused by the leader
            assert hostile not in r["members"] and r["total_weight"] <= 3.01 * r["tokens"], r
            seen.add(attack)
            continue
        if hostile not in r["members"]:
            continue  # it was still training when the group formed
        seen.add(attack)
        if attack in ("huge", "sign_flip_x10"):
            assert hostile in r["clipped"], (attack, r)
        if attack == "nan":
            assert hostile in r["excluded"], (attack, r)
    assert seen >= {"huge", "sign_flip_x10", "weight_x1e6", "nan"}, (seen, logs)


def test_the_held_out_loss_falls_despite_the_attacker(attacked):
    tmp, _ = attacked
    evals = read_metrics(tmp / "h0.jsonl", "eval")
    assert evals[-1]["eval_loss"] < 0.9 * evals[0]["eval_loss"], evals
