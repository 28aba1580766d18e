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
    assert {p.name for p in tmp_path.glob("floor-*/done*")} == {"done0", "done1"}  # both saw it through
