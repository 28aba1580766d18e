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


def test_a_paired_row_times_each_round_and_the_floor_right_after_it_on_the_same_peers(tmp_path):
    row = netns_floor.paired_row([[], []], ["127.0.0.1", "127.0.0.1"], 1_000_000, 100, 2, tmp_path)
    rounds = [float(x) for x in row["rounds_x_bound"].split()]
    floors = [float(x) for x in row["floors_x_bound"].split()]
    pairs = [float(x) for x in row["pairs_x_floor"].split()]
    assert len(rounds) == len(floors) == len(pairs) == 2
    assert all(f > 0 for f in floors)
    for r, f, x in zip(rounds, floors, pairs, strict=True):
        assert x == pytest.approx(r / f, rel=0.05, abs=0.02)  # each round over its own floor
    assert row["pairs_within_goal"].endswith("/2") and row["floor_s"] > 0
    assert "Traceback" not in "".join(p.read_text() for p in tmp_path.glob("ours-*.log"))
