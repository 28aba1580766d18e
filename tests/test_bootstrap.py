"""`p2p-trainer bootstrap`: stable identity, the `initial peer:` line, a clean exit on SIGINT/SIGTERM."""

import signal
import time

import pytest

from p2p_trainer.swarm.procs import alive, command_line, descendants
from tests.e2e import LOOPBACK, cli, start, wait_for_line

pytestmark = pytest.mark.timeout(90)


def _cmdline(pid: int) -> str:
    return command_line(pid).decode(errors="replace").replace("\0", " ")[:120]


def test_bootstrap_keeps_identity_and_exits_cleanly_on_sigterm_and_sigint(tmp_path):
    key = tmp_path / "boot.key"
    peer_ids = []
    for run, sig in enumerate((signal.SIGTERM, signal.SIGINT)):  # the second run: same key, same id
        log = tmp_path / f"boot{run}.log"
        proc = start(cli("bootstrap", "--identity", str(key), "--host-maddrs", LOOPBACK), log)
        maddr = wait_for_line(log, "initial peer:", proc)
        assert maddr.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/" in maddr
        peer_ids.append(maddr.rsplit("/p2p/", 1)[1])
        family = set(descendants(proc.pid))
        assert family, "the DHT process and p2pd should run under the bootstrap peer"
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 5
        time.sleep(0.5)
        # torch_shm_manager is torch's own shared helper (hivemind's MPFutures use shared memory)
        left = {
            p: _cmdline(p) for p in family if alive(p) and not _cmdline(p).startswith("torch_shm_manager")
        }
        assert not left, f"child processes outlived the bootstrap peer: {left}"
    assert peer_ids[0] == peer_ids[1]


def test_malformed_multiaddr_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    for args in (
        ["bootstrap", "--host-maddrs", "/ip4/not-an-ip/tcp/0"],
        ["train", "--initial-peers", "/ip4/127.0.0.1/tcp/abc", "--max-outer-steps", "0"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "p2p_trainer.cli", *args], capture_output=True, text=True, timeout=60
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and args[2] in lines[0], proc.stderr
