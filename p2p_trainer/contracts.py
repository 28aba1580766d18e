"""What several layers agree on, defined once: the θ hash, the run fingerprint and its canonical
form, and the result of one round as the swarm hands it to the training loop and its metrics.

Everything here is plain data and pure functions, so the swarm (which produces round results and
compares fingerprints), the trainer (which builds the fingerprint and logs the results) and
`p2p-trainer status` (which shows them) all import it without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from p2p_trainer.codec.sparse_format import VERSION as SPARSE_VERSION

if TYPE_CHECKING:
    from p2p_trainer.config import Config


def params_sha256(flat: torch.Tensor) -> str:
    """Hash of a flat parameter vector as little-endian fp32 bytes: equal hashes mean equal bits."""
    return hashlib.sha256(flat.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def outer_state_sha256(master: torch.Tensor, momentum: torch.Tensor | None, outer_step: int) -> str:
    """Hash of what every member of a round holds alike after it: θ, the outer momentum (none
    before the first outer step) and the outer step. A download is checked against it."""
    return outer_state_sha256_from(
        params_sha256(master), None if momentum is None else params_sha256(momentum), outer_step
    )


def outer_state_sha256_from(params_sha: str, momentum_sha: str | None, outer_step: int) -> str:
    """``outer_state_sha256`` from the hashes of θ and of the momentum (each hashed as it streams
    by, so no one needs both whole vectors at once)."""
    text = f"outer_step={int(outer_step)};params={params_sha};momentum={momentum_sha or 'none'}"
    return hashlib.sha256(text.encode()).hexdigest()


def stream_sha256(windows) -> str:
    """``params_sha256`` of a vector given as consecutive windows."""
    digest = hashlib.sha256()
    for window in windows:
        digest.update(window.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


# ---- the run fingerprint: what every peer of one run must share --------------------------------
def run_fingerprint(cfg: Config, tokenizer_sha256: str, vocab_size: int) -> dict[str, Any]:
    """A peer whose fingerprint differs from the swarm's may not join (the swarm names the field)."""
    return {
        "run_id": cfg.swarm.run_id,
        "model": asdict(cfg.model) | {"vocab_size": cfg.model.vocab_size or vocab_size},
        "tokenizer_sha256": tokenizer_sha256,
        # the reducer's codec settings (and the sparse wire format's version) decide the averages
        # everyone applies: they must match
        "codec": cfg.swarm.codec if cfg.swarm.codec != "sparse" else _sparse_codec(cfg),
        "data_mix": [[s["name"], float(s.get("weight", 1.0))] for s in cfg.data.sources],
        "seq_len": cfg.model.seq_len,
        "round_tokens": cfg.swarm.round_tokens,  # how a round closes (0: fixed H); `status` needs it for ETAs
        "overlap": cfg.outer.overlap,  # what an outer step means (see outer_sync): peers must agree
    } | ({"private": sorted(cfg.swarm.private)} if cfg.swarm.private else {})


def _sparse_codec(cfg: Config) -> str:
    s = cfg.swarm
    return f"sparse-v{SPARSE_VERSION}/{s.sparse_chunk}/{s.sparse_k}/{s.sparse_bits}"


def canonical_fingerprint(fingerprint: dict) -> str:
    """The one text form peers publish and compare: sorted keys, no spaces."""
    return json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_sha256(fingerprint: dict) -> str:
    return hashlib.sha256(canonical_fingerprint(fingerprint).encode()).hexdigest()


def first_difference(swarm: dict, ours: dict, prefix: str = "") -> str | None:
    """Name the first (in sorted key order) field where two fingerprints differ."""
    for key in sorted(set(swarm) | set(ours), key=str):
        a, b = swarm.get(key, "<missing>"), ours.get(key, "<missing>")
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, path + ".")
            if found:
                return found
        elif a != b:
            return f"{path}: the swarm has {a!r}, this peer has {b!r}"
    return None


# ---- vectors read and written window by window ------------------------------------------------------
class VectorSource(Protocol):
    """A flat fp32 vector that need not exist whole anywhere (e.g. spread over local ranks)."""

    numel: int

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Values ``[lo, hi)`` as an fp32 CPU tensor (do not modify it)."""


class VectorSink(Protocol):
    def write(self, lo: int, hi: int, values: torch.Tensor) -> None: ...


class TensorVector:
    """A whole tensor as a source and a sink."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.numel = tensor, tensor.numel()

    def read(self, lo: int, hi: int) -> torch.Tensor:
        return self.tensor[lo:hi]

    def write(self, lo: int, hi: int, values: torch.Tensor) -> None:
        self.tensor[lo:hi].copy_(values)


class Window:
    """Values ``[lo, hi)`` of a source or sink, as one of their own (offsets from ``lo``)."""

    def __init__(self, base: VectorSource | VectorSink, lo: int, hi: int) -> None:
        self.base, self.lo, self.numel = base, lo, hi - lo

    def read(self, lo: int, hi: int) -> torch.Tensor:
        return self.base.read(self.lo + lo, self.lo + hi)

    def write(self, lo: int, hi: int, values: torch.Tensor) -> None:
        self.base.write(self.lo + lo, self.lo + hi, values)


# ---- one round's result ---------------------------------------------------------------------------
@dataclass
class RoundResult:
    """A completed all-reduce, as every member of the group saw it."""

    average: torch.Tensor | None  # Σ w_j Δ_j / Σ w_j, bit-identical on every member of the group
    group_size: int
    total_weight: float
    bytes_sent: int
    bytes_received: int
    allreduce_s: float
    wait_s: float  # time spent finding the group (waiting for partners)
    excluded: list[str]  # peer ids left out of at least one slice
    reasons: dict[str, str] = field(default_factory=dict)  # why each was left out
    members: list[str] = field(default_factory=list)  # the group in its agreed (accumulation) order
    group_id: str = ""  # the same on every member of the group
    clipped: dict[str, float] = field(default_factory=dict)  # members pulled in by robust aggregation
    # the average as the reducers encoded it, (lo, hi, payload) per chunk, when it was not decoded
    # into ``average`` (None then; both None: we were alone and the average is our own vector)
    encoded: list[tuple[int, int, bytes]] | None = None

    def metrics(self) -> dict[str, Any]:
        """The fields of the `outer_step` metrics record that describe the round (no tensor)."""
        return {
            "group_size": self.group_size,
            "allreduce_s": self.allreduce_s,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "wait_s": self.wait_s,
            "excluded": self.excluded,
            "total_weight": self.total_weight,
            "members": self.members,
            "group_id": self.group_id,
            "clipped": self.clipped,
        }
