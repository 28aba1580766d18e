"""`p2p-trainer plan`: a config's memory, bytes per round and compute utilization, on paper
(its flags and printed tables: ``plan_cli``).

The model, in one place (docs/plan.md explains each term and checks it against measurement):

- GPU memory per GPU: fp32 parameters, fp32 gradients and the two fp32 AdamW moments, sharded over
  the node's GPUs by FSDP2 (``inner.py``: no mixed-precision policy, bf16 comes from autocast), plus
  FSDP2's unsharded working set, the bf16 weight copies autocast saves for backward, and the saved
  activations of one micro-batch (coefficients measured from the saved tensors of real models).
- CPU memory per local rank: the rank's share of the fp32 master copy and outer momentum.
- One round: H inner steps, then a blocking butterfly all-reduce in a group of k peers. Each peer
  sends (k-1)/k of its encoded vector to the other reducers and (k-1)/k of the encoded average back
  out, so each direction of its link carries 2(k-1)/k of the payload; the upload and the reply run
  one after the other, so the transfer takes that many bytes / link rate. Add the codec's CPU passes
  and a few round trips. Utilization = compute / round time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from p2p_trainer.config import Config, ConfigError
from p2p_trainer.config_file import resolve_preset

CODECS = ("fp32", "int8", "sparse")
BYTE_VOCAB = 257  # p2p_trainer.data.tokenizer.BYTE_VOCAB_SIZE, without importing the data stack
GB = 1e9

# Saved activations per token, bytes, fitted (residuals < 15 B) to the tensors autograd saves in one
# forward of real Llama models of several shapes (torch 2.13, SDPA, CPU; tests/test_plan.py re-measures
# one): per decoder layer a*hidden + b*kv_dim + c*ffn, plus the head: d*hidden + e*vocab (+ e*vocab
# more with z-loss, whose logsumexp keeps the fp32 logits).
ACT_LAYER = {"bf16": (30, 4, 8), "fp32": (32, 8, 16)}
ACT_HEAD = {"bf16": (11, 4), "fp32": (13, 4)}
# The fp32 codec is a copy; int8 encode/decode ran 3x slower than a memory copy here (bench_codec:
# 1.34 GB/s encode, 4.04 GB/s copy). The sparse codec is not measured yet: assumed as costly as int8.
CODEC_CPU_FACTOR = {"fp32": 1 / 3, "int8": 1.0, "sparse": 1.0}
# A round's sequential exchanges: join the leader and get the group, send the parts, get the average.
ROUND_TRIPS = 3
# Issue 13's bounded buffer for streaming the outer state in and out of a rank; its size is not
# fixed yet, this is an assumption of the plan.
STREAM_BUFFER_BYTES = 64 << 20
# Step time when none is given: measured (debug, two trainers on 2 shared cores, bench netns rows and
# docs/benchmarks.md: 0.29-0.36 s), or INTELLECT-1's pace for its shape (~38 min / 100 steps, 8 H100s).
DEFAULT_STEP = {
    "debug": (0.31, 1, "measured: debug config, 2 trainers on 2 shared cores (bench netns)"),
    "10b-intellect1": (22.8, 8, "assumption: INTELLECT-1's pace, ~38 min per 100 steps on 8 H100"),
}
INTELLECT1 = {  # INTELLECT-1 technical report, arXiv 2412.01152
    "params": "10B (Llama-3 shape)",
    "nodes": "up to 14 concurrent nodes of 8x H100 (112 GPUs), 30 contributors",
    "inner_steps": "100 per round (~38 min)",
    "codec": "int8 pseudo-gradients",
    "bandwidth": "400x less than data parallel",
    "allreduce_s": "median 103 s (USA) to 469 s (global)",
    "utilization": "83-96%",
    "mfu": "36.2-41.4%",
}


@dataclass(frozen=True)
class Hardware:
    gpus: int = 1  # local ranks of one peer (FSDP2 shards over them)
    link_mbit: float = 1000.0  # each direction of every peer's link
    rtt_ms: float = 100.0
    peers: int = 4  # k, the all-reduce group size
    codec_gbps: float = 1.2  # GB/s of fp32 one int8 encode or decode pass handles (bench_codec, 2 cores)
    gpu_mem_gb: float = 80.0
    gpu_tflops: float = 989.0  # H100 SXM bf16 dense peak, for the MFU line


# ---------------------------------------------------------------- memory
def vocab_size(cfg: Config) -> int:
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if cfg.data.tokenizer == "bytes":
        return BYTE_VOCAB
    raise ConfigError(
        f"model.vocab_size is 0 and tokenizer {cfg.data.tokenizer!r} is not 'bytes': "
        "the plan cannot know its vocabulary; set model.vocab_size in the config"
    )


def count_params(cfg: Config) -> int:
    from p2p_trainer.model import count_parameters  # imports transformers: only when a plan is made

    return count_parameters(cfg.model, vocab_size(cfg))


def _layer_params(cfg: Config) -> int:
    m = cfg.model
    kv = m.num_kv_heads * (m.hidden_size // m.num_heads)
    return 2 * m.hidden_size * (m.hidden_size + kv) + 3 * m.hidden_size * m.intermediate_size


def precision(cfg: Config, gpus: int) -> str:
    """bf16 autocast on GPUs ('auto'), fp32 on a CPU-only peer (gpus = 0) or when asked."""
    if cfg.inner.autocast == "bf16" or (cfg.inner.autocast == "auto" and gpus > 0):
        return "bf16"
    return "fp32"


def activation_bytes(cfg: Config, micro_batch: int, dtype: str) -> int:
    """What autograd keeps from one micro-batch's forward until its backward (no checkpointing)."""
    m, vocab = cfg.model, vocab_size(cfg)
    kv = m.num_kv_heads * (m.hidden_size // m.num_heads)
    a, b, c = ACT_LAYER[dtype]
    d, e = ACT_HEAD[dtype]
    per_token = m.num_layers * (a * m.hidden_size + b * kv + c * m.intermediate_size)
    per_token += d * m.hidden_size + e * vocab * (2 if cfg.inner.z_loss else 1)
    return micro_batch * m.seq_len * per_token


def gpu_memory(cfg: Config, params: int, gpus: int) -> dict[str, int]:
    """Bytes per GPU (per device: gpus = 0 means one CPU rank) by item."""
    ranks = max(1, gpus)
    dtype = precision(cfg, gpus)
    vocab, h = vocab_size(cfg), cfg.model.hidden_size
    head = 0 if cfg.model.tie_embeddings else vocab * h
    layer = _layer_params(cfg)
    matmul_params = cfg.model.num_layers * layer + vocab * h
    mem = {
        "parameters (fp32)": 4 * params // ranks,
        "gradients (fp32)": 4 * params // ranks,
        "AdamW moments (2 x fp32)": 8 * params // ranks,
        # FSDP2 keeps the root (embedding, head, final norm) unsharded from forward to the end of
        # backward, with its gradients; blocks: the current and the prefetched one, params and grads
        "FSDP2 unsharded working set": 0 if ranks == 1 else 8 * (vocab * h + head + h) + 16 * layer,
        # autocast's bf16 copy of every weight is saved for backward, whole, on every rank
        "autocast bf16 weight copies": 2 * matmul_params if dtype == "bf16" else 0,
        "activations (estimate)": activation_bytes(cfg, cfg.data.micro_batch_size, dtype),
    }
    mem["total"] = sum(mem.values())
    return mem


def cpu_memory(params: int, gpus: int, codec: str) -> dict[str, int]:
    """Bytes per local rank under issue 13's sharded outer state."""
    ranks = max(1, gpus)
    mem = {
        "master copy + outer momentum (fp32 share)": 8 * params // ranks,
        "streaming buffer (assumed)": STREAM_BUFFER_BYTES,
    }
    if codec == "sparse":  # what a round did not send (residual) and what it sent, during a round
        mem["error feedback (fp32 share)"] = 8 * params // ranks
    mem["total"] = sum(mem.values())
    return mem


def cpu_rank0_extra(params: int, codec: str) -> int:
    """What rank 0 holds beyond its share: the round's encoded average (kept until the members agree
    on it, then streamed to every rank window by window)."""
    return payload_bytes(codec, params)


# ---------------------------------------------------------------- one round
def payload_bytes(codec: str, numel: int) -> int:
    # imported here: the codec package pulls in torch, and `p2p-trainer --help` builds this parser
    from p2p_trainer.codec import int8_format, sparse_format

    if codec == "fp32":
        return 4 * numel
    if codec == "int8":
        return int8_format.payload_size(numel)
    if codec == "sparse":
        return sparse_format.payload_size(numel)
    raise ConfigError(f"codec {codec!r} is not one of {', '.join(CODECS)}")


def wire_bytes(codec: str, numel: int, peers: int) -> int:
    """Bytes one peer puts on each direction of its link in one round: its parts of the k-1 other
    slices out and their averages in, then the average of its own slice out to the k-1 others and
    their parts of it in; averaged over the group, 2(k-1)/k of the encoded slices' total."""
    if peers <= 1:
        return 0
    base, extra = divmod(numel, peers)
    encoded = sum(payload_bytes(codec, base + (i < extra)) for i in range(peers))
    return round(2 * (peers - 1) / peers * encoded)


@dataclass(frozen=True)
class Round:
    codec: str
    payload_mb: float  # the whole vector, encoded
    wire_mb: float  # per peer, each direction
    compute_s: float
    transfer_s: float
    codec_s: float
    latency_s: float
    round_s: float
    utilization_pct: float
    overlapped_round_s: float
    overlapped_utilization_pct: float


def predict_round(codec: str, numel: int, steps: int, step_s: float, hw: Hardware) -> Round:
    """Blocking outer step (today): compute, then encode, transfer, decode. Overlapped
    (``--outer.overlap``): the transfer hides behind the next round's compute; the codec's CPU passes
    stay on the path (they share the cores with a CPU peer's compute)."""
    compute = steps * step_s
    wire = wire_bytes(codec, numel, hw.peers)
    transfer = wire * 8 / (hw.link_mbit * 1e6)
    # encode own vector, decode k parts of own slice, encode its average, decode k averages
    passes = 0.0 if hw.peers <= 1 else 3 + 1 / hw.peers
    codec_s = passes * 4 * numel * CODEC_CPU_FACTOR[codec] / (hw.codec_gbps * GB)
    latency = 0.0 if hw.peers <= 1 else ROUND_TRIPS * hw.rtt_ms / 1e3
    blocking = compute + codec_s + transfer + latency
    overlapped = codec_s + max(compute, transfer + latency)
    return Round(codec, payload_bytes(codec, numel) / 1e6, wire / 1e6, compute, transfer, codec_s, latency,
                 blocking, 100 * compute / blocking, overlapped, 100 * compute / overlapped)


def link_for_transfer(codec: str, numel: int, peers: int, seconds: float) -> float:
    """Mbit/s each way for the transfer of one round to take ``seconds``."""
    return wire_bytes(codec, numel, peers) * 8 / seconds / 1e6


def flops_per_token(cfg: Config, params: int) -> float:
    """6 N + 12 L h s (PaLM's count, fwd + bwd), N the parameters that take part in matmuls."""
    m = cfg.model
    lookup = 0 if m.tie_embeddings else vocab_size(cfg) * m.hidden_size
    return 6 * (params - lookup) + 12 * m.num_layers * m.hidden_size * m.seq_len


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    config: str
    preset: str
    params: int
    vocab: int
    steps_per_round: int
    step_s: float
    step_source: str
    codec: str
    hardware: Hardware
    gpu: dict[str, int]
    cpu: dict[str, int]
    cpu_rank0_extra: int
    rounds: dict[str, Round]
    mfu_pct: float

    def to_json(self) -> dict:
        return asdict(self) | {"intellect1": intellect1_comparison(self)}


def default_step(preset: str, gpus: int) -> tuple[float, str]:
    if preset not in DEFAULT_STEP:
        raise ConfigError(f"--step-s is required for {preset!r}: no measured step time for it")
    step, on_gpus, source = DEFAULT_STEP[preset]
    if max(1, gpus) != on_gpus:  # data parallel over the node: the step scales with its GPUs
        step, source = step * on_gpus / max(1, gpus), f"{source}, scaled to {gpus} GPUs"
    return step, source


def make_plan(
    cfg: Config, hw: Hardware, *, config: str = "", step_s: float | None = None, steps: int | None = None
) -> Plan:
    preset = Path(resolve_preset(config)).stem if config else ""
    source = "given (--step-s)"
    if step_s is None:
        step_s, source = default_step(preset, hw.gpus)
    params = count_params(cfg)
    steps = steps or cfg.inner.steps_per_round
    tokens = cfg.data.batch_size * cfg.model.seq_len
    mfu = 100 * flops_per_token(cfg, params) * tokens / (step_s * max(1, hw.gpus) * hw.gpu_tflops * 1e12)
    rounds = {c: predict_round(c, params, steps, step_s, hw) for c in CODECS}
    return Plan(config, preset, params, vocab_size(cfg), steps, step_s, source, cfg.swarm.codec, hw,
                gpu_memory(cfg, params, hw.gpus), cpu_memory(params, hw.gpus, cfg.swarm.codec),
                cpu_rank0_extra(params, cfg.swarm.codec), rounds, mfu)


def intellect1_comparison(plan: Plan) -> list[tuple[str, str, str]] | None:
    """(what, INTELLECT-1 published, ours on paper) for its shape on 8 GPUs."""
    if plan.preset != "10b-intellect1" or plan.hardware.gpus != 8:
        return None
    hw, r, p = plan.hardware, plan.rounds["int8"], plan.params
    fp32_gb, int8_gb = 4 * p / GB, payload_bytes("int8", p) / GB
    needs = [link_for_transfer("int8", p, hw.peers, s) for s in (103, 469)]
    return [
        ("parameters", INTELLECT1["params"], f"{p / GB:.2f}B"),
        ("machines", INTELLECT1["nodes"], f"{hw.gpus} GPUs per peer, {hw.peers} peers per all-reduce group"),
        ("inner steps", INTELLECT1["inner_steps"],
         f"{plan.steps_per_round} per round ({r.compute_s / 60:.0f} min at {plan.step_s:g} s/step)"),
        ("pseudo-gradient", INTELLECT1["codec"], f"fp32 {fp32_gb:.1f} GB -> int8 {int8_gb:.2f} GB per round"),
        ("bytes vs data parallel", INTELLECT1["bandwidth"],
         f"{plan.steps_per_round * fp32_gb / int8_gb:.0f}x less (H x fp32/int8)"),
        ("all-reduce", INTELLECT1["allreduce_s"],
         f"{r.transfer_s + r.codec_s + r.latency_s:.0f} s at {hw.link_mbit:g} Mbit/s (transfer "
         f"{r.transfer_s:.0f} s); a 103 / 469 s transfer needs {needs[0]:.0f} / {needs[1]:.0f} Mbit/s"),
        ("compute utilization", INTELLECT1["utilization"],
         f"{r.utilization_pct:.1f}% blocking, {r.overlapped_utilization_pct:.1f}% overlapped"),
        ("model FLOPs utilization", INTELLECT1["mfu"],
         f"{plan.mfu_pct:.1f}% at {hw.gpu_tflops:g} TFLOP/s per GPU"),
    ]


# ---------------------------------------------------------------- the check against measurement
def netns_rows(results: dict) -> list[dict]:
    """The utilization rows `make bench-long` measured over tc-limited links (bench/results.json) with
    blocking rounds, the ones this plan predicts (an overlapped round hides behind the inner steps)."""
    rows = (results.get("netns") or {}).get("rows") or []
    return [
        r
        for r in rows
        if str(r.get("part", "")).startswith("utilization") and "util_pct" in r
        and r.get("overlap", "none") == "none"
    ]


def check_row(row: dict, params: int) -> dict:
    """Our prediction for one measured row, with its own link, H, codec, group and step time. The
    netns links add no delay (no netem), so the round trips cost nothing there."""
    hw = Hardware(gpus=0, link_mbit=float(row["link_mbit"]), rtt_ms=0.0, peers=int(row["peers"]))
    r = predict_round(row["codec"], params, int(row["H"]), float(row["inner_step_s"]), hw)
    return {
        "link_mbit": row["link_mbit"],
        "H": row["H"],
        "codec": row["codec"],
        "step_s": row["inner_step_s"],
        "measured_pct": row["util_pct"],
        "predicted_pct": round(r.utilization_pct, 1),
        "measured_allreduce_s": row.get("allreduce_s"),
        "predicted_allreduce_s": round(r.transfer_s + r.codec_s, 2),
        "measured_MB_sent": row.get("MB_sent_round"),
        "predicted_MB_sent": round(r.wire_mb, 2),
    }
