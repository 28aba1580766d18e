"""The volunteer notebook, run headlessly (nbclient) against a local swarm of two CLI trainers: its
peer (client mode, as a volunteer would run it) finishes a round with the same parameters as the
trainers, and its stop cell leaves no process behind."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from p2p_trainer.metrics import read_metrics
from p2p_trainer.swarm.procs import alive, command_line, command_name, descendants
from tests.e2e import LOOPBACK, start, train_args
from tests.volunteers import ROUND_ARGS, TINY_MODEL, plan_first_peer, stop_all, wait_until

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "join_swarm.ipynb"
ROUND_WITHIN_S = 150  # from the start cell to the notebook peer's first finished round


def _tagged(nb, tag: str) -> int:
    found = [i for i, cell in enumerate(nb.cells) if tag in cell.metadata.get("tags", [])]
    assert len(found) == 1, f"one cell tagged {tag!r}, found {len(found)}"
    return found[0]


def _is_peer(pid: int) -> bool:
    return b"p2p_trainer.cli\0train" in command_line(pid)


def _outputs_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notebook")
    first, maddr = plan_first_peer(tmp, "t0")
    common = (*ROUND_ARGS, *TINY_MODEL, "--swarm.min_group_size", "3")  # rounds wait for the notebook
    trainers = {"t0": start(train_args(tmp, "t0", *first, *common), tmp / "t0.log"),
                "t1": start(train_args(tmp, "t1", "--initial-peers", maddr, *common), tmp / "t1.log")}
    work = tmp / "nb"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.insert(_tagged(nb, "parameters") + 1, nbformat.v4.new_code_cell("\n".join([
        f"INITIAL_PEERS = {[maddr]!r}",
        f"CONFIG = {str(REPO / 'configs' / 'debug.toml')!r}",
        f"WORKDIR = {str(work)!r}",
        f"EXTRA_ARGS = {['--host-maddrs', LOOPBACK, *common]!r}",
        "WATCH_SECONDS = 3",
    ])))
    client = NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp)}})
    started: dict[int, str] = {}  # the notebook's peer and every process under it, seen while it ran

    def first_round():
        for peer in (pid for pid in descendants(kernel_pid) if _is_peer(pid)):
            for pid in (peer, *descendants(peer)):
                name = command_name(pid) or "?"
                if not name.startswith("torch_shm_manag"):  # torch's helper: leaves once its clients are gone
                    started.setdefault(pid, name)
        path = work / "metrics.jsonl"
        return path.exists() and read_metrics(path, "outer_step")

    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("OMP_NUM_THREADS", "1")
            env.setenv("PYTHONPATH", str(REPO), prepend=os.pathsep)  # importable without an install
            with client.setup_kernel():
                kernel_pid = client.km.provisioner.process.pid
                for index, cell in enumerate(nb.cells):
                    if index == _tagged(nb, "watch"):  # the volunteer waits a while before watching
                        wait_until(first_round, ROUND_WITHIN_S, "the notebook peer's first round")
                    client.execute_cell(cell, index)
                left_after_stop = {pid: name for pid, name in started.items() if alive(pid)}
        left_after_kernel = {pid: name for pid, name in started.items() if alive(pid)}
    finally:
        codes = stop_all(trainers)
    records = {name: read_metrics(tmp / f"{name}.jsonl", "outer_step") for name in trainers}
    records["notebook"] = read_metrics(work / "metrics.jsonl", "outer_step")
    return nb, records, started, left_after_stop, left_after_kernel, codes


@pytest.mark.timeout(300)
def test_notebook_peer_finishes_a_round_in_step_with_the_swarm(notebook_run):
    nb, records, *_, codes = notebook_run
    assert records["notebook"], "the notebook's peer finished no round"
    for mine in records["notebook"]:
        theirs = [r for name in ("t0", "t1") for r in records[name] if r["outer_step"] == mine["outer_step"]]
        assert len(theirs) == 2 and {r["params_sha256"] for r in theirs} == {mine["params_sha256"]}, mine
        assert mine["group_size"] == 3
    watch = nb.cells[_tagged(nb, "watch")]
    assert re.search(r"round \d+: group of 3", _outputs_text(watch)), _outputs_text(watch)
    assert any("image/png" in o.get("data", {}) for o in watch.outputs), "the watch cell drew no plot"
    assert codes == {"t0": 0, "t1": 0}


@pytest.mark.timeout(300)
def test_stop_cell_stops_the_peer_and_leaves_no_process(notebook_run):
    nb, _, started, left_after_stop, left_after_kernel, _ = notebook_run
    assert "peer stopped with exit code 0" in _outputs_text(nb.cells[_tagged(nb, "stop-peer")])
    assert "p2pd" in started.values(), f"the peer's daemons were never seen: {started}"
    assert left_after_stop == {} and left_after_kernel == {}


@pytest.mark.timeout(10)
def test_stored_notebook_is_clean_and_defaults_to_client_mode():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    for tag in ("parameters", "start-peer", "watch", "stop-peer"):
        _tagged(nb, tag)
    params = nb.cells[_tagged(nb, "parameters")].source
    assert "CLIENT_MODE = True" in params and "WATCH_SECONDS" in params
    assert nb.cells[0].cell_type == "markdown" and sum(c.cell_type == "markdown" for c in nb.cells) >= 5
