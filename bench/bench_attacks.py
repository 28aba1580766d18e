"""The attack matrix: one of 4 DiLoCo workers hostile, 8 rounds, held-out loss of the honest θ
against the all-honest run, with the robust aggregation (``clip``) and with the plain mean, side by
side in one run. Workers and reducers run in one process on the swarm's own aggregation and codec
code (``p2p_trainer.testing.simulate``); ``tests/test_attacks.py`` asserts the bounds.

    python -m bench.bench_attacks [--codec fp32|int8] [--h 5]
"""

from __future__ import annotations

import argparse
import time

from p2p_trainer.testing.simulate import ATTACKS, run_diloco


def run(codec: str = "fp32", h: int = 5, rounds: int = 8) -> list[dict]:
    t0 = time.time()
    honest = {mode: run_diloco(mode=mode, codec=codec, h=h, rounds=rounds) for mode in ("mean", "clip")}
    rows = [
        {
            "bench": "attacks",
            "attack": "none (all honest)",
            "codec": codec,
            "H": h,
            "rounds": rounds,
            "loss_mean": round(honest["mean"], 4),
            "loss_clip": round(honest["clip"], 4),
            "clip_vs_honest_pct": round(100 * (honest["clip"] / honest["mean"] - 1), 2),
        }
    ]
    for attack in ATTACKS:
        loss = {
            mode: run_diloco(attack=attack, mode=mode, codec=codec, h=h, rounds=rounds)
            for mode in ("mean", "clip")
        }
        rows.append(
            {
                "bench": "attacks",
                "attack": attack,
                "codec": codec,
                "H": h,
                "rounds": rounds,
                "loss_mean": round(loss["mean"], 4),
                "loss_clip": round(loss["clip"], 4),
                "mean_vs_honest_pct": round(100 * (loss["mean"] / honest["mean"] - 1), 2),
                "clip_vs_honest_pct": round(100 * (loss["clip"] / honest["mean"] - 1), 2),
            }
        )
    rows[0]["seconds"] = round(time.time() - t0, 1)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", default="fp32")
    parser.add_argument("--h", type=int, default=5)
    args = parser.parse_args()
    for row in run(args.codec, args.h):
        print(row)
