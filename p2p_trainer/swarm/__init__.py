"""The swarm layer: DHT join and identity, progress records, matchmaking, the all-reduce, serving
and downloading the training state, and the ``SwarmPeer`` facade that is all ``run.py`` uses."""

from p2p_trainer.contracts import RoundResult
from p2p_trainer.swarm.errors import MultiaddrError, RoundFailed, SwarmError
from p2p_trainer.swarm.node import Interrupted
from p2p_trainer.swarm.observer import Observer
from p2p_trainer.swarm.parts import Fault, OutgoingPart
from p2p_trainer.swarm.peer import SwarmPeer
from p2p_trainer.swarm.records import ProgressRecord, swarm_outer_step
from p2p_trainer.swarm.state import Download, StateMoved, StateSource, TrainingState
from p2p_trainer.swarm.state_format import StateFile

__all__ = [
    "Download",
    "Fault",
    "Interrupted",
    "MultiaddrError",
    "Observer",
    "OutgoingPart",
    "ProgressRecord",
    "RoundFailed",
    "RoundResult",
    "StateFile",
    "StateMoved",
    "StateSource",
    "SwarmError",
    "SwarmPeer",
    "TrainingState",
    "swarm_outer_step",
]
