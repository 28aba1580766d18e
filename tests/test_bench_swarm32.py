"""The pure helpers of the 32-peer benchmark (``bench/bench_swarm32.py``): what its rows are made of."""

import math

import pytest

from bench.bench_swarm32 import (
    group_split,
    memory_mb,
    parse_smaps_rollup,
    percentile,
    round_groups,
    trial_verdict,
)


def test_smaps_rollup_parses_to_rss_pss_uss_in_mb():
    text = (
        "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss: 2048 kB\nPss: 1024 kB\nPrivate_Clean: 512 kB\n"
        "Private_Dirty: 512 kB\nShared_Clean: 1024 kB\n"
    )
    fields = parse_smaps_rollup(text)
    assert fields["Rss"] == 2048 and fields["Private_Dirty"] == 512
    assert memory_mb(fields) == {"rss": 2.0, "pss": 1.0, "uss": 1.0}


def test_percentile_interpolates_and_refuses_a_bad_quantile():
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and percentile([5.0], 0.9) == 5.0
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError, match="q=1.5"):
        percentile([1.0], 1.5)


def test_groups_of_a_round_are_counted_once_each():
    rounds = [
        {"peer": "a", "round": 0, "step": 0, "group_id": "g1", "group_size": 2},
        {"peer": "b", "round": 0, "step": 0, "group_id": "g1", "group_size": 2},
        {"peer": "c", "round": 0, "step": 0, "group_id": None, "group_size": None},  # failed: alone
        {"peer": "a", "round": 1, "step": 1, "group_id": "g2", "group_size": 3},
    ]
    groups = round_groups(rounds)
    assert groups == {0: [2, 1], 1: [3]}
    assert group_split(groups[0]) == "2+1" and group_split([]) == "-"


def _trial(counts, sizes, shas):
    seen = [{"event": "seen", "count": c, "seconds": 1.0 + i} for i, c in enumerate(counts)]
    rounds = [{"event": "round", "round": 0, "step": 0, "peer": str(i), "group_id": "g", "group_size": s,
               "sha": h} for i, (s, h) in enumerate(zip(sizes, shas, strict=True))]  # fmt: skip
    return seen + rounds


def test_a_trial_is_one_swarm_only_when_every_peer_saw_all_and_one_group_agreed():
    assert trial_verdict(_trial([3, 3, 3], [3, 3, 3], "xxx"), 3)["one_swarm"]
    split = trial_verdict(_trial([3, 2, 3], [3, 3, 3], "xxx"), 3)
    assert not split["one_swarm"] and not split["dht_one_swarm"] and split["records_seen"] == "3/3/2"
    assert not trial_verdict(_trial([3, 3, 3], [3, 3, 3], "xxy"), 3)["one_group"]
