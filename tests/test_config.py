import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2p_trainer.config import ConfigError
from p2p_trainer.config_file import load_config
from p2p_trainer.model import build_model, count_parameters

pytestmark = pytest.mark.timeout(60)
CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml"))


def test_all_presets_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"debug", "14m", "150m", "1b", "10b-intellect1"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_preset_parses_and_builds_on_meta(path):
    cfg = load_config(path)
    vocab = cfg.model.vocab_size or 257
    model = build_model(cfg.model, vocab, device="meta")
    built = sum(p.numel() for p in model.parameters())
    assert built == count_parameters(cfg.model, vocab)
    assert all(p.device == torch.device("meta") for p in model.parameters())


def test_debug_model_size_in_range():
    cfg = load_config(CONFIGS[0].parent / "debug.toml")
    assert 1e6 <= count_parameters(cfg.model, 257) <= 3e6


def test_intellect1_shape_and_recipe():
    cfg = load_config(CONFIGS[0].parent / "10b-intellect1.toml")
    m, i = cfg.model, cfg.inner
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads) == (4096, 42, 32, 8)
    assert (m.intermediate_size, m.vocab_size, m.seq_len, m.rope_theta) == (14336, 128256, 8192, 500000.0)
    assert (i.lr, i.betas, i.weight_decay, i.warmup_steps, i.decay_shape) == (
        7.5e-5,
        [0.9, 0.95],
        0.1,
        1000,
        "1-sqrt",
    )
    assert i.z_loss > 0 and i.steps_per_round == 100 and cfg.swarm.codec == "int8"
    weights = {s["name"].split("/")[-1].lower(): s["weight"] for s in cfg.data.sources}
    assert sorted(weights.values()) == [5, 10, 10, 20, 55]
    assert 9.5e9 < count_parameters(m, m.vocab_size) < 10.5e9


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        None,
        {
            "inner.lr": "0.01",
            "swarm.client_mode": "true",
            "inner.betas": "[0.8, 0.9]",
            "swarm.initial_peers": ["/ip4/127.0.0.1/tcp/1"],
        },
    )
    assert cfg.inner.lr == 0.01 and cfg.swarm.client_mode is True and cfg.inner.betas == [0.8, 0.9]
    assert cfg.swarm.initial_peers == ["/ip4/127.0.0.1/tcp/1"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"model.nonsense": 1}, "model.nonsense"),
        ({"bogus.key": 1}, "bogus"),
        ({"inner.lr": "fast"}, "'fast'"),
        ({"model.hidden_size": "1.5"}, "model.hidden_size"),
        ({"swarm.codec": "int4"}, "int4"),
        ({"inner.decay_shape": "cosine"}, "cosine"),
        ({"data.batch_size": "10", "data.micro_batch_size": "4"}, "batch_size=10"),
        ({"outer.ef_decay": "0"}, "outer.ef_decay=0"),
        ({"outer.ef_decay": "1.5"}, "outer.ef_decay=1.5"),
        ({"swarm.daemon_threads": "-1"}, "swarm.daemon_threads=-1"),
    ],
)
def test_bad_values_name_themselves(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_toml_type_error_names_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nhidden_size = "wide"\n')
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_config(bad)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "/nonexistent/x.toml"], "/nonexistent/x.toml"),
        (["--model.hidden_size", "abc"], "abc"),
        (["--inner.decay_shape", "cosine"], "cosine"),
    ],
)
def test_cli_bad_input_one_line_exit_2(args, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "p2p_trainer.cli", "train", *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_train_help_lists_every_field():
    proc = subprocess.run(
        [sys.executable, "-m", "p2p_trainer.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    from p2p_trainer.config_file import section_fields

    for section, f in section_fields():
        assert f"--{section}.{f.name}" in proc.stdout
    assert "inner steps between two outer steps" in proc.stdout
