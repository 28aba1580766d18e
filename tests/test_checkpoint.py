import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from p2p_trainer.checkpoint import (
    extra,
    latest_checkpoint,
    list_checkpoints,
    open_checkpoint,
    save_checkpoint,
)
from p2p_trainer.swarm import TrainingState
from p2p_trainer.swarm.state_format import FORMAT, write

pytestmark = pytest.mark.timeout(60)


def _writer(step: int, master: torch.Tensor):
    meta = {"format": FORMAT, "outer_step": str(step), "inner_step": "0", "params_sha256": "",
            "extra.note": json.dumps({"step": step})}  # fmt: skip
    state = TrainingState(step, "", master, None, 0)
    return lambda f: write(f, state.entries(False), meta, state.read)


def test_save_keeps_last_n(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, _writer(step, torch.full((3,), float(step))), keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000003.safetensors", "ckpt-00000004.safetensors"]
    file = open_checkpoint(latest_checkpoint(tmp_path))
    assert extra(file, "note") == {"step": 4} and file.outer_step == 4
    assert torch.equal(file.read("master", 0, 3), torch.full((3,), 4.0))


_SLOW_SAVER = r"""
import sys, time
from p2p_trainer.checkpoint import save_checkpoint
def slow(f):  # holds the save open until the parent kills us
    f.write(b"x" * (1 << 20))
    print("saving", flush=True)
    time.sleep(60)
save_checkpoint(sys.argv[1], 2, slow, keep=2)
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, _writer(1, torch.arange(10.0)), keep=2)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "saving"
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000001.safetensors"]
    file = open_checkpoint(latest_checkpoint(tmp_path))
    assert file.outer_step == 1 and torch.equal(file.read("master", 0, 10), torch.arange(10.0))


def test_missing_checkpoint_error_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        open_checkpoint(tmp_path / "nope.safetensors")
