"""`p2p-trainer status`: the run and its live peers, read through the DHT by an observer that needs no
model or data. Against a live swarm (a full and a client-mode trainer, real CLI processes), for a run
that does not exist, and on what it computes from progress records (ETA, loss trend). The live status
page (`status --serve`, `bootstrap --serve`) against the same swarm, in headless Chromium when it is
installed (Debian's `chromium`), and its history on plain records."""

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hivemind.dht.crypto import RSASignatureValidator

from p2p_trainer.contracts import canonical_fingerprint
from p2p_trainer.metrics import read_metrics
from p2p_trainer.status import render_text, summarize
from p2p_trainer.status_page import History, parse_listen_address
from p2p_trainer.swarm.procs import alive, command_line, descendants
from p2p_trainer.swarm.progress import ProgressBoard
from p2p_trainer.swarm.records import ProgressRecord
from tests.e2e import LOOPBACK, cli, start, train_args, wait_for_line
from tests.volunteers import (
    ROUND_ARGS,
    TINY_MODEL,
    free_port,
    peer_id_of,
    plan_first_peer,
    stop_all,
    wait_until,
)

QUERIES = {"text": [], "json": ["--json"], "no_run": ["--run-id", "nobody-runs-this"]}
ANSWER_WITHIN_S = 60  # about 5 s on an idle machine (importing torch is most of it); CI machines are busy
SWARM_TEST_S = 480  # the first test that uses the swarm also pays for starting it and for the page
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")
ARTIFACTS = Path(__file__).parent / "artifacts"


@dataclass
class StatusRun:
    results: dict  # query name -> (exit code, stdout, stderr, seconds)
    ids: dict  # "full" / "client" -> peer id
    codes: dict  # trainer -> exit code
    pages: dict  # what the status pages showed (see _first_look, _second_look, _stop_and_watch)


@pytest.fixture(scope="module")
def status_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status")
    first, maddr = plan_first_peer(tmp, "full")
    common = (*ROUND_ARGS, *TINY_MODEL, "--swarm.min_group_size", "2")
    procs = {
        "full": start(train_args(tmp, "full", *first, *common), tmp / "full.log"),
        "client": start(train_args(tmp, "client", "--initial-peers", maddr, "--client-mode",
                                   "--identity", str(tmp / "client.key"), *common), tmp / "client.log"),
    }
    servers: dict[str, subprocess.Popen] = {}
    pages: dict = {}
    try:
        def done(name: str) -> bool:  # after a round, records carry how it ended (ETA, loss trend)
            path = tmp / f"{name}.jsonl"
            return procs[name].poll() is not None or path.exists() and bool(read_metrics(path, "outer_step"))

        # the pages watch from the start, so they have timed a round by the time they are looked at
        wait_for_line(tmp / "full.log", "peer address:", procs["full"], timeout=120)
        servers = _start_pages(tmp, maddr)
        for name in procs:
            wait_until(lambda name=name: done(name), 120, f"a finished round on {name}")
            assert procs[name].poll() is None, (tmp / f"{name}.log").read_text()[-3000:]
        _look(pages, tmp, _first_look, tmp, servers)  # just before the queries: their "json" reads after it
        queries, started = {}, time.monotonic()
        for name, flags in QUERIES.items():  # at once: each costs little but its imports
            queries[name] = _query(maddr, *flags)
        results = {}
        for name, q in queries.items():
            results[name] = (*_answer(q, started + 2 * ANSWER_WITHIN_S), time.monotonic() - started)
        _look(pages, tmp, _second_look, tmp, pages)
    finally:
        pages["exits"] = _stop_and_watch(servers)
        codes = stop_all(procs)
    ids = {"full": maddr.rsplit("/", 1)[1], "client": peer_id_of(tmp / "client.key")}
    return StatusRun(results, ids, codes, pages)


def _query(maddr: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(cli("status", "--initial-peers", maddr, *flags), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _answer(q: subprocess.Popen, deadline: float) -> tuple[int, str, str]:
    try:
        out, err = q.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        q.kill()
        out, err = q.communicate()
    return q.returncode, out, err


# ---- the live page, against the same swarm ----
def _start_pages(tmp: Path, maddr: str) -> dict[str, subprocess.Popen]:
    """`status --serve` and a bootstrap peer with `--serve` that joins the swarm."""
    return {
        "status": start(cli("status", "--initial-peers", maddr, "--serve", f"127.0.0.1:{free_port()}"),
                        tmp / "page.log"),
        "bootstrap": start(cli("bootstrap", "--initial-peers", maddr, "--host-maddrs", LOOPBACK,
                               "--serve", f"127.0.0.1:{free_port()}"), tmp / "bootstrap.log"),
    }


def _get(url: str) -> tuple[bytes, dict]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read(), dict(reply.headers)


def _api(url: str) -> dict:
    return json.loads(_get(url + "api/status")[0])


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"chromium-{time.monotonic_ns()}"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=90)


def _look(pages: dict, tmp: Path, look, *args) -> None:
    """Add what ``look`` saw to ``pages``; a failure is kept for the page's tests alone to report."""
    if "error" in pages:
        return
    try:
        pages.update(look(*args))
    except Exception as e:
        logs = "".join(f"\n--- {n}.log ---\n" + (tmp / f"{n}.log").read_text()[-2000:]
                       for n in ("page", "bootstrap") if (tmp / f"{n}.log").exists())
        pages["error"] = f"{e!r}{logs}"


def _first_look(tmp: Path, servers: dict[str, subprocess.Popen]) -> dict:
    """The status page in the browser (its DOM after its script ran), between its own JSON (before)
    and the fixture's `status --json` query (after)."""
    url = wait_for_line(tmp / "page.log", "status page:", servers["status"], timeout=120)
    boot_url = wait_for_line(tmp / "bootstrap.log", "status page:", servers["bootstrap"], timeout=120)
    seen = {"url": url, "boot_url": boot_url, "api_before": _api(url)}
    if CHROMIUM:
        seen["dom"] = _chromium(tmp, "--virtual-time-budget=5000", "--dump-dom", url)
    return seen


def _second_look(tmp: Path, pages: dict) -> dict:
    """Once the page has timed a round: its charts, a screenshot, its JSON and HTML, the bootstrap
    peer's page."""
    url = pages["url"]
    wait_until(lambda: _api(url)["history"]["rounds"], 120, "a whole round seen by the status page", 1.0)
    seen = {"html": _get(url), "api": _api(url), "boot_api": _api(pages["boot_url"])}
    if CHROMIUM:
        seen["charts"] = _chromium(tmp, "--virtual-time-budget=5000", "--dump-dom", url)
        shot = tmp / "status_page.png"
        seen["screenshot"] = (_chromium(tmp, "--virtual-time-budget=5000", "--window-size=1280,900",
                                        f"--screenshot={shot}", url), shot)
    return seen


def _stop_and_watch(procs: dict[str, subprocess.Popen]) -> dict[str, tuple[int, float, dict]]:
    """SIGTERM (the bootstrap peer: SIGINT) to each at once; for each: exit code, seconds to exit,
    child processes left behind."""
    families = {name: set(descendants(proc.pid)) for name, proc in procs.items()}
    t0 = time.monotonic()
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT if name == "bootstrap" else signal.SIGTERM)
    exits = {}
    for name, proc in procs.items():
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        exits[name] = (code, time.monotonic() - t0)
    time.sleep(0.5)
    return {name: (code, took, {p: _cmdline(p) for p in families[name]
                                if alive(p) and not _cmdline(p).startswith("torch_shm_manager")})
            for name, (code, took) in exits.items()}


def _cmdline(pid: int) -> str:
    return command_line(pid).decode(errors="replace").replace("\0", " ")[:120]


@pytest.mark.timeout(SWARM_TEST_S)
def test_json_shows_the_run_and_its_peers(status_run):
    results, ids, codes = status_run.results, status_run.ids, status_run.codes
    rc, out, err, took = results["json"]
    assert rc == 0, err[-3000:]
    assert took < ANSWER_WITHIN_S, "status should answer within seconds"
    s = json.loads(out)
    assert s["found"] and s["run_id"] == "p2p-debug"  # the default run id: no --run-id given
    fp = s["fingerprint"]
    assert fp["run_id"] == "p2p-debug" and fp["codec"] == "int8" and fp["model"]["hidden_size"] == 64
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


@pytest.mark.timeout(SWARM_TEST_S)
def test_text_shows_the_run_and_a_table_of_peers(status_run):
    results, ids = status_run.results, status_run.ids
    rc, out, err, _ = results["text"]
    assert rc == 0, err[-3000:]
    s = json.loads(results["json"][1])
    assert out.splitlines()[0].split() == ["run", "p2p-debug"]
    assert f"fingerprint  {s['fingerprint_sha256'][:16]}" in out
    for line in ("outer step", "swarm speed", "next round", "loss", "2 live peer(s):"):
        assert line in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}
    assert rows[ids["full"]] == "full" and rows[ids["client"]] == "client"


@pytest.mark.timeout(SWARM_TEST_S)
def test_no_run_says_so_in_one_line_and_exits_1(status_run):
    rc, out, err, took = status_run.results["no_run"]
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


class _Dom(HTMLParser):
    """What a person sees on the page: the text of elements with an id, the body's state, and the
    cells of each peer's row."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.attrs: dict[str, dict] = {}
        self.rows: dict[str, list[str]] = {}
        self._in: list[str] = []  # ids of the open elements whose text we collect
        self._row: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.attrs["body"] = a
        if tag == "tr" and "data-peer-id" in a:
            self._row = self.rows.setdefault(a["data-peer-id"], [])
        if tag == "td" and self._row is not None:
            self._row.append("")
        if "id" in a:
            self.attrs[a["id"]], self.text[a["id"]] = a, ""
            self._in.append(a["id"])
        else:
            self._in.append("")

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if self._in and tag not in ("br", "img", "input", "meta", "link"):
            self._in.pop()

    def handle_data(self, data):
        for open_id in filter(None, self._in):
            self.text[open_id] += data
        if self._row:
            self._row[-1] += data


def _page(status_run) -> dict:
    pages = status_run.pages
    assert "error" not in pages, pages.get("error")
    return pages


def _status_json(status_run) -> dict:
    rc, out, err, _ = status_run.results["json"]
    assert rc == 0, err[-3000:]
    return json.loads(out)


@pytest.mark.timeout(SWARM_TEST_S)
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install -y chromium)")
def test_status_page_in_a_browser_shows_what_status_json_shows(status_run):
    pages = _page(status_run)
    after = _status_json(status_run)  # `status --json`, started once the page's DOM was taken
    before = pages["api_before"]  # what the page's server had read just before
    assert pages["dom"].returncode == 0, pages["dom"].stderr[-3000:]
    page = _Dom(pages["dom"].stdout)
    assert page.attrs["body"]["data-state"] == "live", page.text.get("banner")
    assert int(page.attrs["body"]["data-updates"]) >= 1  # its script fetched /api/status and drew it
    assert page.text["run-id"] == after["run_id"] == "p2p-debug"
    assert before["outer_step"] <= int(page.text["outer-step"]) <= after["outer_step"]
    assert int(page.text["peer-count"]) == len(after["peers"]) == 2
    assert page.text["fingerprint-hash"] == after["fingerprint_sha256"][:16]
    assert "codec int8" in page.text["fingerprint-sub"]
    assert set(page.rows) == {p["peer_id"] for p in after["peers"]} == set(status_run.ids.values())
    earlier = {p["peer_id"]: p for p in before["peers"]}
    for p in after["peers"]:
        cells = page.rows[p["peer_id"]]  # peer id, mode, tokens/s, outer step, loss, last seen
        assert cells[0] == p["peer_id"] and cells[1] == p["mode"], cells
        assert earlier[p["peer_id"]]["outer_step"] <= int(cells[3]) <= p["outer_step"], cells
        assert cells[5].endswith("ago"), cells
    assert [page.rows[status_run.ids[name]][1] for name in ("full", "client")] == ["full", "client"]

    assert pages["charts"].returncode == 0, pages["charts"].stderr[-3000:]
    charts = _Dom(pages["charts"].stdout)  # taken once the page had timed a round
    assert int(charts.attrs["loss-chart"]["data-points"]) >= 2  # a finished round and the one in progress
    assert int(charts.attrs["round-chart"]["data-bars"]) >= 1 and "median" in charts.text["round-sub"]
    run, shot = pages["screenshot"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "status_page.png")


@pytest.mark.timeout(SWARM_TEST_S)
def test_status_page_api_is_status_json_plus_history(status_run):
    pages = _page(status_run)
    s = _status_json(status_run)
    api = pages["api"]  # read after `status --json` answered
    assert set(s) <= set(api) and api["found"] and api["run_id"] == "p2p-debug"
    assert api["fingerprint_sha256"] == s["fingerprint_sha256"] and api["fingerprint"] == s["fingerprint"]
    assert s["outer_step"] <= api["outer_step"]
    assert {p["peer_id"]: p["mode"] for p in api["peers"]} == {p["peer_id"]: p["mode"] for p in s["peers"]}
    assert api["server"]["kind"] == "status" and api["polled"]["error"] is None
    history = api["history"]
    steps = [point["outer_step"] for point in history["outer_step"]]
    assert steps == sorted(steps) and len(steps) >= 3  # came in during a round, saw it end and another
    assert history["rounds"] and all(0 < r["seconds"] < 120 for r in history["rounds"])
    losses = history["loss"]
    assert [x["outer_step"] for x in losses] == sorted({x["outer_step"] for x in losses})
    assert all(0 < x["loss"] < 10 for x in losses) and any(x["final"] for x in losses)

    body, headers = pages["html"]
    text = body.decode()
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    # nothing from outside the package: no external scripts, styles, fonts or images
    assert "<script src" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    assert "https://" not in text and "http://" not in text.replace('"http://www.w3.org/2000/svg"', "")


@pytest.mark.timeout(SWARM_TEST_S)
def test_bootstrap_peer_serves_the_same_page(status_run):
    pages = _page(status_run)
    s = _status_json(status_run)
    boot = pages["boot_api"]
    assert boot["found"] and boot["run_id"] == "p2p-debug", boot
    assert {p["peer_id"] for p in boot["peers"]} == {p["peer_id"] for p in s["peers"]}
    assert boot["fingerprint_sha256"] == s["fingerprint_sha256"]
    assert boot["server"]["kind"] == "bootstrap"
    assert boot["server"]["multiaddrs"][0].startswith("/ip4/127.0.0.1/")


@pytest.mark.timeout(SWARM_TEST_S)
def test_page_servers_exit_0_within_seconds_leaving_nothing(status_run):
    exits = status_run.pages["exits"]
    assert set(exits) == {"status", "bootstrap"}
    for name, (code, took, left) in exits.items():
        assert code == 0, name
        assert took < 15, f"{name} took {took:.1f}s to exit"  # about 4 s under load: torch's own teardown
        assert not left, f"child processes outlived {name}: {left}"


@pytest.mark.timeout(120)
def test_bad_serve_address_is_one_line_exit_2():
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = f"127.0.0.1:{held.getsockname()[1]}"
    peer = "/ip4/127.0.0.1/tcp/9/p2p/QmYACpyYfeQW6jxGxWrdfZyBedWS9LGhXo5GumUNhx2BNS"  # never dialed
    cases = {  # every malformed form is in test_listen_address_parsing: one per command here
        "127.0.0.1:99999": ["status", "--initial-peers", peer, "--serve", "127.0.0.1:99999"],
        taken: ["status", "--initial-peers", peer, "--serve", taken],
        "localhost": ["bootstrap", "--host-maddrs", LOOPBACK, "--serve", "localhost"],
    }
    try:
        runs = {bad: subprocess.Popen(cli(*args), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for bad, args in cases.items()}
        for bad, proc in runs.items():
            _, err = proc.communicate(timeout=100)
            lines = err.strip().splitlines()
            assert proc.returncode == 2, err[-3000:]
            assert len(lines) == 1 and bad in lines[0] and "--serve" in lines[0], err
    finally:
        held.close()


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


@pytest.mark.timeout(10)
def test_the_board_knows_at_which_step_the_dht_holds_our_record():
    """A round skips waiting for its final record only where a leader would already admit us."""
    answers = []

    async def scenario():
        board = ProgressBoard(None, "r", RSASignatureValidator(), "me", 30.0)

        async def store(key, value):
            return answers.pop(0)

        board._store = store  # no DHT: each store is taken or refused as the test says
        seen = [board.stored_at(0)]
        answers.append(True)
        await board.publish_now(_record("me", 3, 100, 10.0, 2.0))
        seen += [board.stored_at(3), board.stored_at(4)]
        answers.append(False)  # refused: the DHT still holds step 3
        await board.publish_now(_record("me", 4, 100, 10.0, 2.0))
        seen += [board.stored_at(3), board.stored_at(4)]
        answers.append(True)
        await board.withdraw()  # gone from the swarm: no step is held any more
        seen += [board.stored_at(3)]
        return seen

    assert asyncio.run(scenario()) == [False, True, False, True, False, False]


# ---- the page's history, from records (no swarm) ----
def _at(peer, step, loss, *, last_loss=None):
    return _record(peer, step, 100, 10.0, loss, last_tokens=100 if last_loss is not None else 0,
                   last_loss=last_loss)


def _swarm(*records):
    return {r.peer_id: r for r in records}


@pytest.mark.timeout(10)
def test_history_times_rounds_it_saw_start_and_end():
    h = History()
    h.add(_swarm(_at("a", 4, 3.0), _at("b", 4, 3.2)), 100.0)  # came in during round 4: its start is unknown
    h.add(_swarm(_at("a", 5, 2.9), _at("b", 4, 3.1)), 105.0)  # the median is still 4
    h.add(_swarm(_at("a", 5, 2.9), _at("b", 5, 2.8)), 110.0)  # round 5 starts here
    h.add(_swarm(_at("a", 6, 2.7), _at("b", 6, 2.7)), 132.0)  # ... and ends: 22 s
    h.add(_swarm(_at("a", 9, 2.5), _at("b", 9, 2.5)), 162.0)  # 3 rounds between two readings: 10 s each
    h.add(_swarm(_at("a", 9, 2.5), _at("c", 0, 9.0)), 164.0)  # a newcomer pulls the median down: no round
    h.add(_swarm(_at("a", 10, 2.4), _at("b", 10, 2.4)), 170.0)
    assert list(h.rounds) == [(5, 22.0), (6, 10.0), (7, 10.0), (8, 10.0), (9, 8.0)]
    assert [s for _, s in h.steps] == [4, 5, 6, 9, 10] and [t for t, _ in h.steps][:2] == [100.0, 110.0]
    assert h.to_json()["rounds"][0] == {"outer_step": 5, "seconds": 22.0}
    assert History().to_json() == {"outer_step": [], "loss": [], "rounds": []}
    empty = History()
    empty.add({}, 1.0)  # nobody there: nothing to remember
    assert not empty.steps and not empty.loss_curve()


@pytest.mark.timeout(10)
def test_history_loss_is_the_swarm_mean_per_round_final_once_peers_report_how_it_ended():
    h = History()
    h.add(_swarm(_at("a", 2, 3.0), _at("b", 2, 3.4)), 0.0)
    assert h.loss_curve() == [(2, pytest.approx(3.2), False)]  # round 2 in progress
    h.add(_swarm(_at("a", 2, 2.8), _at("b", 2, float("nan"))), 1.0)  # a NaN loss is left out
    assert h.loss_curve() == [(2, pytest.approx(2.8), False)]
    # a ends round 2 first; b is still in it: a's reading is final, b's step 2 loss no longer counts
    h.add(_swarm(_at("a", 3, 2.9, last_loss=2.6), _at("b", 2, 2.7)), 2.0)
    assert h.loss_curve() == [(2, pytest.approx(2.6), True)]
    h.add(_swarm(_at("a", 3, 2.5, last_loss=2.6), _at("b", 3, 2.4, last_loss=2.8)), 3.0)
    assert h.loss_curve() == [(2, pytest.approx(2.7), True), (3, pytest.approx(2.45), False)]
    # round 3 ended for a only, b moved on by a download (nothing carried): the wider reading of
    # round 2 stays, round 3 gets a's
    h.add(_swarm(_at("a", 4, 2.3, last_loss=2.2), _at("b", 4, 2.5)), 4.0)
    assert h.loss_curve() == [(2, pytest.approx(2.7), True), (3, pytest.approx(2.2), True),
                              (4, pytest.approx(2.4), False)]
    h.add(_swarm(_at("a", 4, 2.3, last_loss=2.2), _at("z", 7, 1.0, last_loss=1.1)), 5.0)  # one claims 7
    assert [s for s, _, _ in h.loss_curve()] == [2, 3, 4]  # rounds past the swarm's step are not its own
    small = History(max_points=2)
    for step in range(5):
        small.add(_swarm(_at("a", step, float(step))), float(step))
    assert [s for s, _, _ in small.loss_curve()] == [3, 4] and len(small.steps) == 2


@pytest.mark.timeout(10)
def test_listen_address_parsing():
    assert parse_listen_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen_address("[::1]:8080") == ("::1", 8080)
    assert parse_listen_address("localhost:80") == ("localhost", 80)
    for bad in ("127.0.0.1", "127.0.0.1:65536", ":80", "host:x", "http://host:80", "[::1]8080", ""):
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            parse_listen_address(bad)
