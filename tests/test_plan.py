"""`p2p-trainer plan`: its arithmetic, its memory estimate against the tensors autograd really saves,
and its utilization prediction against the rows `make bench-long` measured over limited links."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from p2p_trainer import plan
from p2p_trainer.cli import main
from p2p_trainer.codec import get_codec
from p2p_trainer.config import ConfigError
from p2p_trainer.config_file import load_config
from p2p_trainer.inner import causal_lm_loss
from p2p_trainer.model import build_model

pytestmark = pytest.mark.timeout(120)
RESULTS = Path(__file__).parent.parent / "bench" / "results.json"


# ---------------------------------------------------------------- against measurement
def _measured_rows() -> list[dict]:
    if not RESULTS.exists():
        pytest.skip(f"{RESULTS} does not exist: run `make bench-long`")
    rows = plan.netns_rows(json.loads(RESULTS.read_text()))
    if not rows:
        pytest.skip(f"{RESULTS} has no netns utilization rows (`make bench-long` measures them as root)")
    return rows


def test_predicted_utilization_within_10_points_of_every_measured_netns_row():
    params = plan.count_params(load_config("configs/debug.toml"))  # the benchmark's config
    rows = _measured_rows()
    misses = []
    for row in rows:
        checked = plan.check_row(row, params)
        if abs(checked["predicted_pct"] - checked["measured_pct"]) > 10:
            misses.append(checked)
    assert not misses, f"predictions more than 10 points off: {misses}"


def test_predicted_bytes_match_the_bytes_the_peers_counted():
    params = plan.count_params(load_config("configs/debug.toml"))
    # The plan leaves out the copy a member sends to a slice's verifier in the rounds that re-check
    # it (``swarm.recheck``). The median of 3 or more rounds is a round's bytes unless most rounds
    # were re-checked; the median of 2 is their mean, and one re-check moves it by half a part.
    rows = [row for row in _measured_rows() if row.get("rounds", 3) >= 3]
    assert rows, "no netns row spans 3 rounds or more"
    for row in rows:
        checked = plan.check_row(row, params)
        assert checked["predicted_MB_sent"] == pytest.approx(checked["measured_MB_sent"], rel=0.03), checked


def _saved_activation_bytes(cfg, micro_batch: int, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves in one forward + loss, parameters left out."""
    model = build_model(cfg.model, plan.vocab_size(cfg))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, plan.vocab_size(cfg), (micro_batch, cfg.model.seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=tokens[:, :-1]).logits
        causal_lm_loss(logits, tokens[:, 1:], cfg.inner.z_loss)
    return sum(size for ptr, size in saved.items() if ptr not in params)


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4], ids=["ce", "z-loss"])
def test_activation_estimate_matches_what_autograd_saves(autocast, z_loss):
    # the 14m shape (not one the coefficients were fitted on), cut to 2 layers (the estimate is linear in
    # them), with a hub-sized vocabulary so that the logits weigh
    shape = {"model.num_layers": 2, "model.seq_len": 128, "model.vocab_size": 4096}
    shape |= {"data.micro_batch_size": 2, "data.batch_size": 2}
    cfg = load_config("14m", shape | {"inner.z_loss": z_loss})
    torch.manual_seed(0)
    measured = _saved_activation_bytes(cfg, 2, autocast)
    gpus = 1 if autocast else 0  # 'auto' autocast: bf16 on a GPU peer, fp32 on a CPU one
    memory = plan.gpu_memory(cfg, plan.count_params(cfg), gpus)
    predicted = memory["activations (estimate)"] + memory["autocast bf16 weight copies"]
    assert predicted == pytest.approx(measured, rel=0.02)


# ---------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("codec", plan.CODECS)
def test_payload_bytes_are_what_the_real_codec_writes(codec):
    x = torch.randn(300_001, generator=torch.Generator().manual_seed(1))
    encoded = get_codec(codec, backend="reference").encode(x)
    assert plan.payload_bytes(codec, x.numel()) == len(encoded)


def test_wire_bytes_per_codec():
    n = 1_279_680
    # 2 peers: each sends half its vector and returns the average of the other half: one vector's worth
    int8_slice = 24 + 1024 * 3 + n // 2  # header, 3 codebooks of 2^18 values, one byte per value
    assert plan.wire_bytes("int8", n, 2) == 2 * int8_slice
    assert plan.wire_bytes("fp32", n, 2) == 4 * n
    assert plan.wire_bytes("fp32", n, 4) == 2 * 3 / 4 * 4 * n  # 2 (k-1)/k of the payload
    assert plan.wire_bytes("int8", n, 1) == 0  # a lone peer sends nothing
    fp32, int8, sparse = (plan.wire_bytes(c, n, 4) for c in ("fp32", "int8", "sparse"))
    assert fp32 / 4.05 < int8 < fp32 / 3.9
    assert sparse < int8 / 12.5  # top 224 of 4096 at 4 bits, Elias-Fano: 0.62 bits per value against 8.03


def test_round_time_and_utilization():
    hw = plan.Hardware(link_mbit=10, rtt_ms=50, peers=2, codec_gbps=2.0)
    r = plan.predict_round("int8", 1_000_000, 10, 0.3, hw)
    assert r.compute_s == pytest.approx(3.0)
    assert r.transfer_s == pytest.approx(plan.wire_bytes("int8", 1_000_000, 2) * 8 / 10e6)
    assert r.latency_s == pytest.approx(3 * 0.05)
    assert r.codec_s == pytest.approx(3.5 * 4e6 / 2e9)
    assert r.round_s == pytest.approx(r.compute_s + r.transfer_s + r.codec_s + r.latency_s)
    assert r.utilization_pct == pytest.approx(100 * 3.0 / r.round_s)
    assert r.overlapped_round_s == pytest.approx(r.codec_s + 3.0)  # the transfer hides behind compute
    slow = plan.predict_round("int8", 1_000_000, 10, 0.3, dataclasses.replace(hw, link_mbit=1))
    assert slow.overlapped_round_s == pytest.approx(slow.codec_s + slow.transfer_s + slow.latency_s)
    assert slow.utilization_pct < slow.overlapped_utilization_pct < 100


def test_memory_per_rank_scales_with_gpus():
    cfg = load_config("1b")
    params = plan.count_params(cfg)
    one, eight = plan.gpu_memory(cfg, params, 1), plan.gpu_memory(cfg, params, 8)
    for item in ("parameters (fp32)", "gradients (fp32)", "AdamW moments (2 x fp32)"):
        assert eight[item] == pytest.approx(one[item] / 8, abs=1)
    assert one["FSDP2 unsharded working set"] == 0 < eight["FSDP2 unsharded working set"]
    for item in ("activations (estimate)", "autocast bf16 weight copies"):  # not sharded
        assert eight[item] == one[item] > 0
    cpu1, cpu8 = plan.cpu_memory(params, 1, "int8"), plan.cpu_memory(params, 8, "int8")
    share = "master copy + outer momentum (fp32 share)"
    assert cpu1[share] == 8 * params and cpu8[share] == 8 * params // 8
    assert "error feedback (fp32 share)" in plan.cpu_memory(params, 8, "sparse")


def test_10b_on_8_gpus_is_in_the_published_range():
    cfg = load_config("10b-intellect1")
    p = plan.make_plan(cfg, plan.Hardware(gpus=8), config="10b-intellect1")
    assert 10.1e9 < p.params < 10.3e9
    assert plan.cpu_memory(p.params, 1, "int8")["master copy + outer momentum (fp32 share)"] / 1e9 == (
        pytest.approx(81.7, abs=0.1)
    )
    assert p.cpu["master copy + outer momentum (fp32 share)"] / 1e9 == pytest.approx(81.7 / 8, abs=0.02)
    assert p.step_s == pytest.approx(22.8) and p.rounds["int8"].compute_s / 60 == pytest.approx(38, abs=0.1)
    assert p.rounds["int8"].payload_mb / 1e3 == pytest.approx(p.params / 1e9, rel=0.01)  # ~1 byte/value
    assert 80 < p.rounds["int8"].utilization_pct < 99 and 30 < p.mfu_pct < 50
    rows = {what: ours for what, _, ours in plan.intellect1_comparison(p)}
    assert "398x" in rows["bytes vs data parallel"]  # 100 steps x 4 bytes / (1 byte + codebooks)
    on_4 = plan.make_plan(cfg, plan.Hardware(gpus=4), config="10b-intellect1")
    assert plan.intellect1_comparison(on_4) is None


def test_step_time_is_required_without_a_measurement_and_scaled_with_gpus():
    with pytest.raises(ConfigError, match="--step-s is required for '1b'"):
        plan.make_plan(load_config("1b"), plan.Hardware(gpus=8), config="1b")
    half = plan.make_plan(load_config("10b-intellect1"), plan.Hardware(gpus=4), config="10b-intellect1")
    assert half.step_s == pytest.approx(45.6) and "scaled to 4 GPUs" in half.step_source


# ---------------------------------------------------------------- the command line
def test_cli_text_and_json(capsys):
    assert main(["plan", "--config", "10b-intellect1", "--gpus", "8", "--link-mbit", "500"]) == 0
    text = capsys.readouterr().out
    assert "INTELLECT-1" in text and "83-96%" in text and "int8*" in text and "does NOT fit" in text
    assert main(["plan", "--config", "debug", "--peers", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hardware"]["peers"] == 2 and out["intellect1"] is None
    assert set(out["rounds"]) == set(plan.CODECS) and out["params"] == plan.count_params(load_config("debug"))


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--gpus", "x"], "--gpus='x'"),
        (["--link-mbit", "0"], "--link-mbit='0'"),
        (["--step-s", "nan"], "--step-s='nan'"),
        (["--peers", "2.5"], "--peers='2.5'"),
        (["--rtt-ms", "-1"], "--rtt-ms='-1'"),
        (["--check", "/nonexistent.json"], "/nonexistent.json"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(capsys, flags, named):
    assert main(["plan", "--config", "debug", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err
