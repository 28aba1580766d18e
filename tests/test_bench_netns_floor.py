"""The transport-floor yardstick of ``bench_netns`` on loopback: two real p2pd daemons echo each
other's part back in 1 MiB frames (an odd-sized part, so the last frame is short)."""

import pytest

from bench import netns_floor

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_each_transfer_echoes_the_whole_part_and_is_timed(tmp_path, transport):
    part = 3 * netns_floor.CHUNK + 12345
    times = netns_floor.measure([[], []], ["127.0.0.1", "127.0.0.1"], part, 2, tmp_path, timeout=90,
                                transport=transport)
    assert len(times) == 2
    assert all(0 < t < 60 for t in times)
    logs = [tmp_path / f"floor-{transport}-{r}.log" for r in (0, 1)]
    assert all(log.exists() and "Traceback" not in log.read_text() for log in logs)  # both saw it through


def test_spread_lists_every_round_in_order_and_counts_those_within_the_goal():
    got = netns_floor.spread([1.0, 1.2, 1.14, 1.5], bound=1.0)
    assert got == {"rounds_x_bound": "1.00 1.20 1.14 1.50", "rounds_within_goal": "2/4"}
