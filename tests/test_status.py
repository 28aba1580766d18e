"""`p2p-trainer status`: the run and its live peers, read through the DHT by an observer that needs no
model or data. Against a live swarm (a full and a client-mode trainer, real CLI processes), for a run
that does not exist, and on what it computes from progress records (ETA, loss trend)."""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from hivemind.dht.crypto import RSASignatureValidator

from p2p_trainer.contracts import canonical_fingerprint
from p2p_trainer.metrics import read_metrics
from p2p_trainer.status import render_text, summarize
from p2p_trainer.swarm.progress import ProgressBoard
from p2p_trainer.swarm.records import ProgressRecord
from tests.e2e import cli, start, train_args
from tests.volunteers import ROUND_ARGS, peer_id_of, plan_first_peer, stop_all, wait_until

QUERIES = {"text": [], "json": ["--json"], "no_run": ["--run-id", "nobody-runs-this"]}
ANSWER_WITHIN_S = 60  # about 5 s on an idle machine (importing torch is most of it); CI machines are busy


@pytest.fixture(scope="module")
def status_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status")
    first, maddr = plan_first_peer(tmp, "full")
    common = (*ROUND_ARGS, "--swarm.min_group_size", "2")
    procs = {
        "full": start(train_args(tmp, "full", *first, *common), tmp / "full.log"),
        "client": start(train_args(tmp, "client", "--initial-peers", maddr, "--client-mode",
                                   "--identity", str(tmp / "client.key"), *common), tmp / "client.log"),
    }
    try:
        def done(name: str) -> bool:  # after a round, records carry how it ended (ETA, loss trend)
            path = tmp / f"{name}.jsonl"
            return procs[name].poll() is not None or path.exists() and bool(read_metrics(path, "outer_step"))

        for name in procs:
            wait_until(lambda name=name: done(name), 120, f"a finished round on {name}")
            assert procs[name].poll() is None, (tmp / f"{name}.log").read_text()[-3000:]
        queries, started = {}, time.monotonic()
        for name, flags in QUERIES.items():  # at once: each costs little but its imports
            queries[name] = subprocess.Popen(cli("status", "--initial-peers", maddr, *flags), text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        results = {}
        for name, q in queries.items():
            try:
                out, err = q.communicate(timeout=max(1.0, started + 2 * ANSWER_WITHIN_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                q.kill()
                out, err = q.communicate()
            results[name] = (q.returncode, out, err, time.monotonic() - started)
    finally:
        codes = stop_all(procs)
    ids = {"full": maddr.rsplit("/", 1)[1], "client": peer_id_of(tmp / "client.key")}
    return results, ids, codes


@pytest.mark.timeout(200)
def test_json_shows_the_run_and_its_peers(status_run):
    results, ids, codes = status_run
    rc, out, err, took = results["json"]
    assert rc == 0, err[-3000:]
    assert took < ANSWER_WITHIN_S, "status should answer within seconds"
    s = json.loads(out)
    assert s["found"] and s["run_id"] == "p2p-debug"  # the default run id: no --run-id given
    fp = s["fingerprint"]
    assert fp["run_id"] == "p2p-debug" and fp["codec"] == "int8" and fp["model"]["hidden_size"] == 192
    assert s["fingerprint_sha256"] == hashlib.sha256(canonical_fingerprint(fp).encode()).hexdigest()
    peers = {p["peer_id"]: p for p in s["peers"]}
    assert set(peers) == set(ids.values())
    assert peers[ids["client"]]["client_mode"] and not peers[ids["full"]]["client_mode"]
    assert all(p["outer_step"] >= 1 and 0 <= p["last_seen_s"] < 30 for p in peers.values())
    # a snapshot: a peer that just finished a round or downloaded state may publish a rate of 0
    assert s["outer_step"] >= 1
    assert s["tokens_per_s"] == pytest.approx(sum(p["tokens_per_s"] for p in peers.values()))
    assert s["round"]["mode"] == "fixed-H" and 0 <= s["round"]["eta_s"] < 120
    assert s["loss"]["previous_round"] > 0 and s["loss"]["current"] > 0
    assert s["loss"]["trend"] in ("falling", "flat", "rising")
    assert codes == {"full": 0, "client": 0}


@pytest.mark.timeout(200)
def test_text_shows_the_run_and_a_table_of_peers(status_run):
    results, ids, _ = status_run
    rc, out, err, _ = results["text"]
    assert rc == 0, err[-3000:]
    s = json.loads(results["json"][1])
    assert out.splitlines()[0].split() == ["run", "p2p-debug"]
    assert f"fingerprint  {s['fingerprint_sha256'][:16]}" in out
    for line in ("outer step", "swarm speed", "next round", "loss", "2 live peer(s):"):
        assert line in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}
    assert rows[ids["full"]] == "full" and rows[ids["client"]] == "client"


@pytest.mark.timeout(200)
def test_no_run_says_so_in_one_line_and_exits_1(status_run):
    rc, out, err, took = status_run[0]["no_run"]
    assert rc == 1 and out == "" and took < ANSWER_WITHIN_S, err[-3000:]
    assert err.startswith("no run 'nobody-runs-this' found through"), err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.timeout(60)
def test_status_needs_no_model_or_data():
    code = ("import sys, p2p_trainer.status, p2p_trainer.swarm.peer; "
            "print([m for m in ('transformers', 'datasets', 'p2p_trainer.model', 'p2p_trainer.data', "
            "'p2p_trainer.run') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


# ---- what it computes, from records (no swarm) ----
NOW = 1000.0


def _record(peer, step, tokens, speed, loss, *, last_tokens=0, last_loss=None, client=False, age=0.0):
    return ProgressRecord(peer_id=peer, outer_step=step, tokens=tokens, tokens_per_s=speed, loss=loss,
                          params_sha256="", client_mode=client, time=NOW - age,
                          last_round_tokens=last_tokens, last_round_loss=last_loss)


@pytest.mark.timeout(10)
def test_fixed_h_eta_waits_for_the_slowest_peer_and_loss_trend_compares_rounds():
    records = {r.peer_id: r for r in [
        _record("a", 3, 4000, 1000.0, 2.0, last_tokens=10000, last_loss=2.5),
        _record("b", 3, 8000, 2000.0, 2.2, last_tokens=10000, last_loss=2.3, age=0.5),  # 9000 by now
        _record("c", 3, 1000, 500.0, 2.4, client=True),  # a newcomer: assumed to do what the others did
        _record("d", 2, 500, 100.0, 9.0, last_tokens=10000, last_loss=9.9),  # behind: not in this round
    ]}
    s = summarize("r", records, {"round_tokens": 0}, NOW)
    assert s["outer_step"] == 3 and s["tokens_per_s"] == pytest.approx(3600.0)
    assert s["round"] == {"mode": "fixed-H", "target_tokens": None, "tokens": 14000,
                          "eta_s": pytest.approx(18.0)}
    assert s["loss"] == {"current": pytest.approx(2.2), "previous_round": pytest.approx(2.4),
                         "trend": "falling"}
    assert [p["peer_id"] for p in s["peers"]] == ["a", "b", "d", "c"]  # full peers first
    assert s["peers"][1]["last_seen_s"] == pytest.approx(0.5)
    text = render_text(s)
    assert "in about 18s" in text and "2.400 last round -> 2.200 now (falling)" in text
    assert s["fingerprint_sha256"] == hashlib.sha256(b'{"round_tokens":0}').hexdigest()


@pytest.mark.timeout(10)
def test_token_target_eta_and_unknowns():
    records = {r.peer_id: r for r in [_record("a", 1, 5000, 1000.0, 3.0), _record("b", 1, 5000, 1000.0, 3.0)]}
    s = summarize("r", records, {"round_tokens": 20000}, NOW)
    assert s["round"] == {"mode": "token-target", "target_tokens": 20000, "tokens": 10000, "eta_s": 5.0}
    s = summarize("r", records, None, NOW)  # fixed H, no round finished yet: nothing to go by
    assert s["round"]["eta_s"] is None and s["loss"]["trend"] is None and s["fingerprint_sha256"] is None
    assert "next round   unknown" in render_text(s) and "fingerprint  none published yet" in render_text(s)


@pytest.mark.timeout(10)
def test_progress_records_carry_how_the_last_round_ended():
    stored = []

    async def scenario():
        board = ProgressBoard(None, "r", RSASignatureValidator(), "me", 30.0)

        async def store(key, value):
            stored.append(value)
            return True

        board._store = store  # no DHT: record what would be stored
        for step, tokens, loss in [(0, 100, 3.0), (0, 500, 2.5), (1, 0, 2.7), (1, 100, 2.4), (5, 0, 2.0)]:
            await board.publish_now(_record("me", step, tokens, 10.0, loss))

    asyncio.run(scenario())
    wire = [(w["outer_step"], w["last_round_tokens"], w["last_round_loss"]) for w in stored]
    assert wire == [(0, 0, None), (0, 0, None), (1, 500, 2.5), (1, 500, 2.5), (5, 0, None)]  # 5: a download
    old = {k: v for k, v in stored[0].items() if not k.startswith("last_round")}
    assert ProgressRecord.from_wire(old).last_round_tokens == 0  # a record from an older peer still parses
    assert ProgressRecord.from_wire(stored[-2]).last_round_loss == 2.5
