"""Test entry point: the real `p2p-trainer` command with a fault injected through its seams.

    python -m p2p_trainer.testing.peer [--fault SPEC] [--attack A,B,...] [--slowdown X] train ARGS...

``--fault`` builds the swarm peer with ``SwarmPeer(fault=...)`` (see ``testing.faults``);
``--attack huge,nan,...`` makes it a hostile member (``faults.HostilePeer``) that attacks round r
with the (r mod n)-th attack; ``--slowdown X`` makes every inner step take X times as long (a
slower machine, or a tiny model whose rounds last a second without using the CPU). They reach
``Trainer`` through ``swarm_factory`` / ``inner_factory``; nothing is patched and nothing goes
into the user's config.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch

from p2p_trainer import cli
from p2p_trainer.inner import InnerLoop, StepStats
from p2p_trainer.testing import faults


class SlowInnerLoop(InnerLoop):
    """An inner loop whose every step takes ``slowdown`` times as long, sleeping the difference."""

    def __init__(self, *args, slowdown: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slowdown = slowdown

    def step(self, batch: torch.Tensor) -> StepStats:
        started = time.perf_counter()
        stats = super().step(batch)
        time.sleep((time.perf_counter() - started) * (self.slowdown - 1))
        return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2p_trainer.testing.peer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--fault", type=faults.parse, metavar="SPEC", help="e.g. stall:3, nan, wrong_size")
    parser.add_argument(
        "--slowdown", type=float, default=1.0, metavar="X", help="each inner step takes X times as long"
    )
    parser.add_argument(
        "--attack",
        type=faults.Attacker.from_spec,
        metavar="A,B,...",
        help=f"attack round r with the (r mod n)-th of these: {', '.join(faults.ATTACKS)}",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the p2p-trainer command line")
    args = parser.parse_args(argv)
    if args.slowdown < 1:
        parser.error(f"--slowdown {args.slowdown} must be >= 1")
    swarm_factory = inner_factory = None
    if args.fault is not None:
        from p2p_trainer.swarm.peer import SwarmPeer

        swarm_factory = functools.partial(SwarmPeer, fault=args.fault)
    if args.attack is not None:
        swarm_factory = functools.partial(faults.HostilePeer, attacker=args.attack)
    if args.slowdown > 1:
        inner_factory = functools.partial(SlowInnerLoop, slowdown=args.slowdown)
    return cli.main(args.command, swarm_factory=swarm_factory, inner_factory=inner_factory)


if __name__ == "__main__":
    sys.exit(main())
