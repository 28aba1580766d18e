"""The swarm layer: DHT join and identity, progress records, matchmaking, the all-reduce, and the
``SwarmPeer`` facade that is all ``run.py`` uses."""

from p2p_trainer.swarm.allreduce import Fault, OutgoingPart
from p2p_trainer.swarm.errors import MultiaddrError, RoundFailed, SwarmError
from p2p_trainer.swarm.peer import RoundResult, SwarmPeer
from p2p_trainer.swarm.progress import ProgressRecord, swarm_outer_step

__all__ = [
    "Fault",
    "MultiaddrError",
    "OutgoingPart",
    "ProgressRecord",
    "RoundFailed",
    "RoundResult",
    "SwarmError",
    "SwarmPeer",
    "swarm_outer_step",
]
