"""One typed config tree (``config_file`` loads it from TOML with `--section.key value` overrides).

Each section is a dataclass owned by the component that reads it; every field carries a help
text that `p2p-trainer train --help` shows. Validation happens once, at load, so bad input
fails with one line naming the bad value instead of a traceback deep inside training.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """Bad configuration: the message names the offending file, key or value."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    hidden_size: int = _f(128, "width of the residual stream")
    num_layers: int = _f(4, "number of transformer blocks")
    num_heads: int = _f(4, "attention heads")
    num_kv_heads: int = _f(2, "key/value heads (grouped-query attention)")
    intermediate_size: int = _f(384, "SwiGLU hidden width")
    vocab_size: int = _f(0, "vocabulary size; 0 takes it from the tokenizer")
    seq_len: int = _f(128, "tokens per training sequence")
    rope_theta: float = _f(10000.0, "RoPE base frequency")
    tie_embeddings: bool = _f(False, "share input embedding and output head weights")
    init_std: float = _f(0.02, "std of the normal weight init")

    def validate(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "seq_len",
        ):
            _positive(f"model.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size={self.vocab_size} must be >= 0")


@dataclass
class DataConfig:
    sources: list = _f(
        [{"name": "shakespeare", "weight": 0.7}, {"name": "python-stdlib", "weight": 0.3}],
        "mixture: list of tables {name, weight[, path, split, text_field, config]}; name is "
        "'shakespeare', 'python-stdlib', a local file/dir ('local', with path) or a hub dataset id",
    )
    tokenizer: str = _f("bytes", "'bytes' (byte-level, identical everywhere) or a hub/local tokenizer id")
    batch_size: int = _f(16, "sequences per optimizer step on this peer")
    micro_batch_size: int = _f(
        16, "sequences per forward/backward on one local rank (gradient accumulation fills batch_size)"
    )
    seed: int = _f(0, "seed of the per-peer data order (mixed with the peer's rank in the swarm)")
    eval_fraction: float = _f(0.02, "fraction of each offline source held out for evaluation")
    eval_batches: int = _f(8, "batches in one held-out evaluation")
    cache_dir: str = _f("", "where offline sources are cached; empty = ~/.cache/p2p_trainer/data")
    streaming: bool = _f(True, "stream hub datasets instead of downloading them whole")

    def validate(self) -> None:
        _positive("data.batch_size", self.batch_size)
        _positive("data.micro_batch_size", self.micro_batch_size)
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in (0, 0.5)")
        if not self.sources:
            raise ConfigError("data.sources is empty")
        for i, src in enumerate(self.sources):
            if not isinstance(src, dict) or "name" not in src:
                raise ConfigError(f"data.sources[{i}]={src!r} must be a table with a 'name'")
            weight = src.get("weight", 1.0)
            if not isinstance(weight, (int, float)) or weight <= 0:
                raise ConfigError(f"data.sources[{i}].weight={weight!r} must be a positive number")


@dataclass
class InnerConfig:
    lr: float = _f(3e-3, "peak AdamW learning rate")
    betas: list = _f([0.9, 0.95], "AdamW betas")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    eps: float = _f(1e-8, "AdamW epsilon")
    warmup_steps: int = _f(20, "linear warmup steps")
    total_steps: int = _f(1000, "inner steps of the whole WSD schedule on one peer")
    decay_steps: int = _f(100, "final steps of the schedule that decay the lr to min_lr")
    decay_shape: str = _f("1-sqrt", "decay shape: 'linear' or '1-sqrt'")
    min_lr_ratio: float = _f(0.0, "lr at the end of the decay, as a fraction of lr")
    grad_clip: float = _f(1.0, "max global gradient norm; 0 disables clipping")
    z_loss: float = _f(0.0, "weight of the z-loss (log^2 of the softmax normaliser); 0 disables")
    steps_per_round: int = _f(
        25, "H: inner steps between two outer steps (fixed-H mode, and the target otherwise)"
    )
    autocast: str = _f("auto", "'auto' (bf16 on CUDA, fp32 on CPU), 'bf16' or 'fp32'")
    seed: int = _f(0, "seed of the model init (equal on every peer of a run)")

    def validate(self) -> None:
        _positive("inner.lr", self.lr)
        _positive("inner.total_steps", self.total_steps)
        _positive("inner.steps_per_round", self.steps_per_round)
        if self.decay_shape not in ("linear", "1-sqrt"):
            raise ConfigError(f"inner.decay_shape={self.decay_shape!r} must be 'linear' or '1-sqrt'")
        if self.autocast not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"inner.autocast={self.autocast!r} must be 'auto', 'bf16' or 'fp32'")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"inner.betas={self.betas!r} must be two numbers in [0, 1)")
        if (
            self.warmup_steps < 0
            or self.decay_steps < 0
            or self.warmup_steps + self.decay_steps > self.total_steps
        ):
            raise ConfigError(
                f"inner.warmup_steps={self.warmup_steps} + decay_steps={self.decay_steps} "
                f"exceeds total_steps={self.total_steps}"
            )


# (outer lr, momentum) the sparse codec did best with in the paired benchmark, on the mean over three
# data orders: error feedback alone, no outer momentum, and an lr that makes up for what waits in the
# residuals; with SPARSE_EF_DECAY of each residual carried into the next part (bench/notes/paired.md)
SPARSE_OUTER = (4.0, 0.0)
SPARSE_EF_DECAY = 0.7


@dataclass
class OuterConfig:
    lr: float = _f(0.7, "outer SGD learning rate (the sparse codec: 4.0 with momentum 0 and ef_decay 0.7)")
    momentum: float = _f(0.9, "outer momentum")
    nesterov: bool = _f(True, "Nesterov momentum for the outer step")
    overlap: str = _f(
        "none",
        "'none': the round blocks training; 'delayed': it runs while the next inner steps compute and "
        "its average is applied one round late; 'eager': delayed, and the next inner steps start from θ "
        "moved on by this peer's own pseudo-gradient in flight (at 3/4 of the outer lr), measured from there",
    )
    error_feedback: str = _f(
        "auto",
        "add what the codec did not send of our pseudo-gradient to the next round's: 'on', 'off', or "
        "'auto' (on for the sparse codec only)",
    )
    ef_decay: float = _f(
        1.0,
        "error feedback: the share of what waits unsent that joins the next round's part, in (0, 1] "
        "(SparseLoCo's beta; the sparse codec did best with 0.7)",
    )

    def validate(self) -> None:
        _positive("outer.lr", self.lr)
        if self.overlap not in ("none", "delayed", "eager"):
            raise ConfigError(f"outer.overlap={self.overlap!r} must be 'none', 'delayed' or 'eager'")
        if self.error_feedback not in ("auto", "on", "off"):
            raise ConfigError(f"outer.error_feedback={self.error_feedback!r} must be 'auto', 'on' or 'off'")
        if not 0 < self.ef_decay <= 1:
            raise ConfigError(f"outer.ef_decay={self.ef_decay} must be in (0, 1]")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"outer.momentum={self.momentum} must be in [0, 1)")


def check_multiaddr_syntax(values: list, what: str) -> None:
    """ConfigError naming the first of ``values`` that does not parse as a multiaddr (the swarm
    checks more when it starts; this answers a typo before the heavy imports)."""
    from multiaddr import Multiaddr  # light, unlike the swarm layer

    for value in values:
        try:
            Multiaddr(str(value).strip())
        except Exception as e:  # multiaddr raises several unrelated types
            raise ConfigError(f"{what}: {value!r} is not a valid multiaddr: {e}") from None


@dataclass
class SwarmConfig:
    run_id: str = _f("p2p-debug", "name of the training run; peers with another run id never group with us")
    initial_peers: list = _f([], "multiaddrs of any peers of the swarm; empty starts a new swarm")
    host_maddrs: list = _f(["/ip4/0.0.0.0/tcp/0"], "multiaddrs to listen on")
    announce_maddrs: list = _f(
        [], "multiaddrs other peers should dial (public address behind NAT/port mapping)"
    )
    identity: str = _f(
        "", "path of a private key file; keeps the peer id across restarts (created if missing)"
    )
    client_mode: bool = _f(
        False, "outgoing connections only (behind NAT): contributes to rounds, reduces no slice"
    )
    auto_client_mode: bool = _f(
        True,
        "unless client_mode is set: at start, ask an initial peer to dial this peer back, and switch to "
        "client mode when it cannot (behind NAT); false keeps a full peer without asking",
    )
    codec: str = _f("int8", "pseudo-gradient codec on the wire: 'int8', 'fp32' or 'sparse'")
    sparse_chunk: int = _f(
        4096, "sparse codec: values per chunk, each chunk sends its own top-k (a power of two, 64..65536)"
    )
    sparse_k: int = _f(
        224, "sparse codec: entries sent per chunk, the largest by magnitude (1..sparse_chunk/2; 224 = 5.5%%)"
    )
    sparse_bits: int = _f(
        4, "sparse codec: bits per sent value, one of them the sign (1..8); the rest pick a magnitude level"
    )
    target_group_size: int = _f(16, "most peers in one all-reduce group")
    min_group_size: int = _f(1, "fewest peers for a round to count (1 lets a lone peer keep training)")
    round_tokens: int = _f(
        0, "swarm-wide tokens that close a round; 0 = fixed-H mode (every peer does inner.steps_per_round)"
    )
    aggregation: str = _f(
        "clip",
        "how a reducer combines the parts: 'clip' (robust: weights capped at 2x the group's median, each "
        "part's pull bounded around a robust centre; see docs/security.md) or 'mean' (plain weighted mean)",
    )
    aggregation_tau: float = _f(
        2.0, "clip radius, in median distances of the parts to the robust centre (larger: closer to the mean)"
    )
    private: list = _f(
        [],
        "a private run: the peer ids allowed in it (keep each peer's id with --identity); progress records, "
        "rounds and downloads of any other peer are refused. Empty: an open run (see docs/security.md)",
    )
    recheck: float = _f(
        0.1,
        "probability that a slice's average is recomputed by another member in a round (catches a reducer "
        "that sends one wrong average to all; costs that slice's traffic once more)",
    )
    allreduce_chunk: int = _f(
        0,
        "values per streamed chunk of the all-reduce (the leader's setting holds for its group); 0: about "
        "1 MiB on the wire, 2^18 values for fp32 and 2^20 for int8 and sparse",
    )
    daemon_threads: int = _f(
        1,
        "cores the libp2p daemon (p2pd, which carries every byte of the swarm) may run on at once (Go's "
        "GOMAXPROCS); on one core it relayed 4-5 Gbit/s over loopback and spent a quarter less CPU per byte "
        "than with Go's default, whose idle threads spin looking for work; 0: Go's default, every core",
    )
    matchmaking_timeout: float = _f(
        15.0,
        "most seconds a leader waits for group partners at a round boundary: the wait for late peers follows "
        "recent rounds (see wait_for_slower) up to this; the wait for min_group_size is this",
    )
    allreduce_timeout: float = _f(
        30.0,
        "most seconds before a silent group member is left out of the all-reduce: the deadline follows "
        "recent rounds (see wait_for_slower) up to this; a member waits for a reducer's answer up to this "
        "plus max(5, this) before calling it gone",
    )
    wait_for_slower: float = _f(
        2.0,
        "deadlines follow the swarm: a peer up to this many times slower than the typical peer of recent "
        "rounds (plus deadline_floor) is waited for, a slower or dead one is left out; >= 1 (3 waits for a "
        "peer 3x slower; 2 lets a dead peer cost a round about twice the usual time)",
    )
    deadline_floor: float = _f(
        2.0, "seconds of slack added to every deadline that follows the swarm: none is shorter than this"
    )
    join_timeout: float = _f(60.0, "seconds to keep retrying unreachable initial peers (with backoff)")
    max_weight: float = _f(
        1e9, "largest token weight a peer may claim for one round; larger parts are rejected"
    )
    record_ttl: float = _f(
        30.0,
        "seconds a peer's progress record outlives its last refresh (a crashed peer's lingers this long)",
    )
    state_timeout: float = _f(
        60.0, "seconds to download the training state from one donor before trying another"
    )
    download_inner_state: bool = _f(
        False,
        "joining or catching up also downloads the donor's inner AdamW state (else the peer keeps its own); "
        "a peer with this on keeps a CPU copy of its AdamW state from each outer step to serve it",
    )

    def validate(self) -> None:
        from p2p_trainer.codec import CODECS, SparseParams  # codec names and limits live with the codecs

        for name in ("initial_peers", "host_maddrs", "announce_maddrs"):
            check_multiaddr_syntax(getattr(self, name), f"swarm.{name}")

        if self.codec not in CODECS:
            raise ConfigError(f"swarm.codec={self.codec!r} is not one of {', '.join(CODECS)}")
        # checked whatever the codec, so a bad value never waits for a codec switch to show; one field
        # at a time, so the message names the one that is wrong
        c, k, bits = self.sparse_chunk, self.sparse_k, self.sparse_bits
        steps = (("sparse_chunk", (c, 1, 1)), ("sparse_k", (c, k, 1)), ("sparse_bits", (c, k, bits)))
        for name, params in steps:
            try:
                SparseParams(*params)
            except ValueError as e:
                raise ConfigError(f"swarm.{name}={getattr(self, name)!r}: {e}") from None
        if not self.run_id or any(c in self.run_id for c in " /\t\n"):
            raise ConfigError(f"swarm.run_id={self.run_id!r} must be non-empty without spaces or slashes")
        _positive("swarm.target_group_size", self.target_group_size)
        _positive("swarm.min_group_size", self.min_group_size)
        timeouts = ("matchmaking_timeout", "allreduce_timeout", "join_timeout", "record_ttl", "state_timeout")
        for name in timeouts:
            _positive(f"swarm.{name}", getattr(self, name))
        if not 0.0 < self.deadline_floor < float("inf"):
            raise ConfigError(f"swarm.deadline_floor={self.deadline_floor!r} must be positive and finite")
        if not 1.0 <= self.wait_for_slower <= 1e6:
            raise ConfigError(f"swarm.wait_for_slower={self.wait_for_slower!r} must be in [1, 1e6]")
        if self.round_tokens < 0:
            raise ConfigError(f"swarm.round_tokens={self.round_tokens} must be >= 0")
        if self.aggregation not in ("clip", "mean"):
            raise ConfigError(f"swarm.aggregation={self.aggregation!r} must be 'clip' or 'mean'")
        _positive("swarm.aggregation_tau", self.aggregation_tau)
        for peer_id in self.private:
            if not isinstance(peer_id, str) or not re.fullmatch(r"[1-9A-HJ-NP-Za-km-z]{32,64}", peer_id):
                raise ConfigError(
                    f"swarm.private: {peer_id!r} is not a peer id (base58, as `train` prints it)"
                )
        if not 0.0 <= self.recheck <= 1.0:
            raise ConfigError(f"swarm.recheck={self.recheck} must be in [0, 1]")
        if not 0 <= self.allreduce_chunk <= 1 << 26:
            raise ConfigError(f"swarm.allreduce_chunk={self.allreduce_chunk} must be in [0, 2^26] (0: auto)")
        if not 0 <= self.daemon_threads <= 1024:
            raise ConfigError(f"swarm.daemon_threads={self.daemon_threads} must be in [0, 1024]")
        if self.target_group_size > 256:
            raise ConfigError(f"swarm.target_group_size={self.target_group_size} must be <= 256")

    @property
    def chunk_values(self) -> int:
        """Values per streamed chunk of a round we lead: ``allreduce_chunk``, or about 1 MiB of the
        codec's bytes on the wire. Each chunk in flight costs its fp32 values several times over (in
        the sender's encode-ahead, the reducer's buffer and sum, the reply), so fp32's chunk is the
        smallest: at 2^20 values a 4-peer fp32 round peaked 2.6x the vector above its start, 1.7x at
        2^18 (docs/benchmarks.md); int8 loses speed at 2^18 (more frames for the same bytes)."""
        return self.allreduce_chunk or (1 << 18 if self.codec == "fp32" else 1 << 20)


@dataclass
class CheckpointConfig:
    dir: str = _f("", "checkpoint folder; empty disables checkpoints")
    every: int = _f(1, "save every K outer steps")
    keep: int = _f(2, "how many checkpoints to keep")
    resume: bool = _f(False, "resume from the newer of the local checkpoint and the swarm's state")

    def validate(self) -> None:
        _positive("checkpoint.every", self.every)
        _positive("checkpoint.keep", self.keep)


@dataclass
class LogConfig:
    metrics: str = _f("", "JSONL file for metrics records; empty disables")
    progress_bar: bool = _f(True, "show a progress bar with loss and tokens/s")
    eval_every: int = _f(1, "evaluate held-out loss every N outer steps (0 disables)")
    level: str = _f("INFO", "log level")

    def validate(self) -> None:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log.level={self.level!r} must be DEBUG, INFO, WARNING or ERROR")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> Config:
        for section in SECTIONS:
            getattr(self, section).validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}={value!r} must be > 0")
