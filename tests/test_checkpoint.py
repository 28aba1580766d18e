import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from p2p_trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.timeout(60)


def test_save_keeps_last_n(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"step": step, "x": torch.full((3,), step)}, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000003.pt", "ckpt-00000004.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 4


_SLOW_SAVER = r"""
import sys, torch
from p2p_trainer.checkpoint import save_checkpoint
class Slow:
    # pickled while torch.save writes: holds the save open until the parent kills us
    def __reduce__(self):
        print("saving", flush=True)
        import time; time.sleep(60)
        return (int, (0,))
save_checkpoint(sys.argv[1], 2, {"big": torch.zeros(1 << 20), "slow": Slow()}, keep=2)
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1, "x": torch.arange(10)}, keep=2)
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
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000001.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 1 and torch.equal(state["x"], torch.arange(10))


def test_missing_checkpoint_error_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
