"""A lone peer trains the debug model end to end through the real CLI (its DHT and p2pd included)."""

import time

import pytest
import torch

from p2p_trainer.metrics import read_metrics
from tests.e2e import cli, start, train_args

pytestmark = pytest.mark.timeout(240)
STEPS = 3


@pytest.fixture(scope="module")
def lone_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lone")
    t0 = time.monotonic()
    proc = start(
        train_args(tmp, "m", "--max-outer-steps", str(STEPS), "--checkpoint.dir", str(tmp / "ckpt")),
        tmp / "log",
        threads=2,  # the machine's 2 cores, shared with the other test worker
    )
    code = proc.wait(timeout=200)
    return tmp, code, time.monotonic() - t0


def test_held_out_loss_falls_30_percent(lone_run):
    tmp, code, elapsed = lone_run
    assert code == 0, (tmp / "log").read_text()[-3000:]
    evals = read_metrics(tmp / "m.jsonl", "eval")
    assert [e["outer_step"] for e in evals] == list(range(STEPS + 1))
    first, last = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    assert last < 0.7 * first, (first, last, f"{elapsed:.0f} s")  # its speed: bench/bench_trainer.py


def test_metrics_records_follow_the_contract(lone_run):
    tmp = lone_run[0]
    inner = read_metrics(tmp / "m.jsonl", "inner_step")
    outer = read_metrics(tmp / "m.jsonl", "outer_step")
    assert len(inner) == STEPS * 20 and len(outer) == STEPS
    assert {"step", "loss", "lr", "tokens_per_s"} <= inner[0].keys()
    for key in (
        "outer_step",
        "loss",
        "tokens",
        "group_size",
        "allreduce_s",
        "bytes_sent",
        "bytes_received",
        "params_sha256",
        "time",
        "wait_s",
    ):
        assert key in outer[0], key
    assert [r["outer_step"] for r in outer] == [1, 2, 3]
    assert all(r["group_size"] == 1 and r["tokens"] == 20 * 16 * 128 for r in outer)
    assert len({r["params_sha256"] for r in outer}) == STEPS  # θ moves every outer step


def test_export_loads_in_transformers_with_same_logits(lone_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from p2p_trainer.export import load_model_from_checkpoint

    tmp = lone_run[0]
    import subprocess

    proc = subprocess.run(
        cli("export", str(tmp / "ckpt"), str(tmp_path / "hf")), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf" / "model.safetensors").exists()
    ours, tok, _ = load_model_from_checkpoint(tmp / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([hf_tok.encode("To be, or not to be: that is the question.")])
    assert ids.tolist() == [tok.encode("To be, or not to be: that is the question.")]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)
    last = read_metrics(tmp / "m.jsonl", "outer_step")[-1]["params_sha256"]
    from p2p_trainer.diloco import params_sha256

    assert params_sha256(torch.cat([p.detach().reshape(-1) for p in loaded.parameters()])) == last


def test_resume_continues_from_checkpoint(lone_run):
    tmp = lone_run[0]
    proc = start(
        train_args(
            tmp,
            "resumed",
            "--max-outer-steps",
            str(STEPS + 1),
            "--checkpoint.dir",
            str(tmp / "ckpt"),
            "--resume",
            "--log.eval_every",
            "0",
            "--inner.steps_per_round",  # one short phase is enough to show the run goes on
            "3",
        ),
        tmp / "resume.log",
        threads=2,
    )
    assert proc.wait(timeout=120) == 0, (tmp / "resume.log").read_text()[-3000:]
    outer = read_metrics(tmp / "resumed.jsonl", "outer_step")
    assert [r["outer_step"] for r in outer] == [STEPS + 1]
