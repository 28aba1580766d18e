"""The sparse codec: selection and quantization rules, kernel vs reference bytes, hostile payloads."""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_trainer.codec import Codec, CodecError, SparseParams, get_codec, native
from p2p_trainer.codec import sparse_format as fmt
from p2p_trainer.codec.sparse import SparseCodec
from p2p_trainer.config import ConfigError, SwarmConfig
from p2p_trainer.config_file import load_config
from p2p_trainer.contracts import run_fingerprint

pytestmark = pytest.mark.timeout(60)

HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
# Deterministic runs that leave no example database behind; bounded by example counts, not time.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> native.BuildConfig:
    """A private kernel cache, so the test run really compiles the current source."""
    return native.BuildConfig(
        compiler=os.environ.get("CC") or "cc",
        cache_dir=tmp_path_factory.mktemp("sparse-kernels"),
        source=native.SPARSE_SOURCE,
    )


def pair(build: native.BuildConfig, params: SparseParams | None = None) -> tuple[SparseCodec, SparseCodec]:
    p = params or SparseParams()
    kw = dict(chunk_size=p.chunk_size, k=p.k, value_bits=p.value_bits)
    return SparseCodec("native", build=build, **kw), SparseCodec("reference", **kw)


@pytest.fixture(params=["native", "reference"])
def sparse(request: pytest.FixtureRequest, build: native.BuildConfig) -> SparseCodec:
    if request.param == "native" and not HAVE_CC:
        pytest.skip("no C compiler")
    return SparseCodec(request.param, build=build)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected_kept(x: torch.Tensor, p: SparseParams) -> list[int]:
    """Step 1 of the spec, independently: per chunk the min(k, n) largest |x| (ties to the lower index),
    zeros left out, as sorted global positions."""
    a = np.abs(x.numpy().astype(np.float64))
    kept = []
    for start in range(0, a.size, p.chunk_size):
        chunk = a[start : start + p.chunk_size]
        order = np.lexsort((np.arange(chunk.size), -chunk))  # by -|x|, then by index
        top = order[: min(p.k, chunk.size)]
        kept += sorted(start + int(i) for i in top if chunk[i] != 0)
    return kept


def mixed(n: int, seed: int) -> torch.Tensor:
    """Chunks of 64 with the awkward cases side by side."""
    x = torch.randn(n, generator=gen(seed))
    x[0:64] = 2.5  # constant: every magnitude ties
    x[64:128] = 0.0
    x[128:192] = torch.tensor([-0.0, 0.0] * 32)
    x[192:256] = torch.randn(64, generator=gen(seed + 1)) * 1e-44  # subnormals
    x[256:320] = torch.randn(64, generator=gen(seed + 2)).sign() * 3e38  # near the fp32 limit
    x[320:384] = torch.randint(-2, 3, (64,), generator=gen(seed + 3)).float()  # a few values, many ties
    x[384:448] = 0.0
    x[390], x[400], x[447] = 1.0, -3.0, 1e-45  # fewer non-zeros than k
    x[448:512] = torch.tensor([1.0, -1.0] * 32)  # equal magnitudes, both signs
    return x


def sampled_positions(chunks: int) -> torch.Tensor:
    """Non-zero only where the kernel samples its threshold guess (every 16th value at 4096 per chunk):
    too few candidates pass the guess, so the exact fallback runs."""
    x = torch.zeros(4096 * chunks)
    x[8::16] = torch.randn(256 * chunks, generator=gen(32))
    return x


SMALL = SparseParams(chunk_size=64, k=4, value_bits=2)
INPUTS: dict[str, tuple] = {
    "normal": (lambda: torch.randn(300_000, generator=gen(1)) * 0.01, SparseParams()),
    "normal-ragged": (lambda: torch.randn(4096 * 5 + 777, generator=gen(2)), SparseParams()),
    "heavy-tailed": (
        lambda: torch.randn(50_000, generator=gen(30)) / torch.rand(50_000, generator=gen(31)),
        SparseParams(1024, 16, 3),
    ),
    "mixed": (lambda: mixed(64 * 9 + 5, 3), SMALL),
    "mixed-1bit": (lambda: mixed(64 * 9, 4), SparseParams(64, 7, 1)),
    "mixed-8bit": (lambda: mixed(64 * 8 + 63, 5), SparseParams(64, 32, 8)),
    "zeros": (lambda: torch.zeros(10_000), SparseParams()),
    "constant": (lambda: torch.full((10_000,), -1.7), SparseParams()),
    "integers": (lambda: torch.randint(-3, 4, (20_000,), generator=gen(6)).float(), SparseParams(256, 50, 4)),
    "subnormal": (lambda: torch.randn(9000, generator=gen(7)) * 1e-42, SparseParams(1024, 10, 3)),
    "huge": (lambda: torch.randn(9000, generator=gen(8)).sign() * 3.4e38, SparseParams(1024, 10, 2)),
    "one": (lambda: torch.tensor([0.3]), SparseParams()),
    "two": (lambda: torch.tensor([-0.0, 5.0]), SparseParams()),
    "tail-of-one": (lambda: torch.randn(4097, generator=gen(9)), SparseParams()),
    "empty": (lambda: torch.zeros(0), SparseParams()),
    "big-chunk": (lambda: torch.randn(70_000, generator=gen(10)), SparseParams(1 << 16, 1 << 15, 2)),
    "sorted": (lambda: torch.linspace(-1, 1, 20_000), SparseParams(4096, 100, 2)),
    "sampled-positions": (lambda: sampled_positions(3), SparseParams()),  # the kernel's first guess fails
    "spike": (lambda: torch.cat([torch.zeros(4000), torch.ones(96)]).repeat(3), SparseParams()),
}


# -- API and parameters --------------------------------------------------------------------------------


def test_registry_and_params() -> None:
    codec = get_codec("sparse")
    assert isinstance(codec, SparseCodec) and isinstance(codec, Codec) and codec.name == "sparse"
    assert codec.params == SparseParams(4096, 224, 4)
    custom = get_codec("sparse", backend="reference", sparse=SparseParams(1024, 8, 3))
    assert custom.params == SparseParams(1024, 8, 3)  # type: ignore[attr-defined]
    assert get_codec("int8", sparse=SparseParams(1024, 8, 3)).name == "int8"  # ignored by the others
    for bad, match in (
        (dict(chunk_size=1000), "chunk_size.*1000"),
        (dict(chunk_size=32, k=1), "chunk_size.*32"),
        (dict(k=0), "k .*got 0"),
        (dict(k=2049), "k .*2049"),
        (dict(value_bits=0), "value_bits.*got 0"),
        (dict(value_bits=9), "value_bits.*got 9"),
    ):
        with pytest.raises(ValueError, match=match):
            SparseParams(**bad)
    with pytest.raises(ValueError, match="backend"):
        SparseCodec("gpu")


def test_swarm_config_fields() -> None:
    cfg = SwarmConfig(codec="sparse", sparse_chunk=1024, sparse_k=20, sparse_bits=3)
    cfg.validate()
    codec = get_codec(cfg.codec, sparse=SparseParams(cfg.sparse_chunk, cfg.sparse_k, cfg.sparse_bits))
    assert codec.params == SparseParams(1024, 20, 3)  # type: ignore[attr-defined]
    for field, value in (("sparse_chunk", 100), ("sparse_k", 0), ("sparse_k", 513), ("sparse_bits", 9)):
        bad = SwarmConfig(**{"sparse_chunk": 1024, field: value})
        with pytest.raises(ConfigError, match=rf"swarm\.{field}={value}"):
            bad.validate()


def test_the_run_fingerprint_names_the_sparse_format_and_its_parameters() -> None:
    # peers with another wire format or other parameters would decode each other's parts wrongly
    # or not at all: they must not share a run
    overrides = {"swarm.codec": "sparse", "swarm.sparse_k": 20, "swarm.sparse_chunk": 1024}
    sparse = run_fingerprint(load_config("configs/debug.toml", overrides), "tok", 256)
    assert sparse["codec"] == "sparse-v2/1024/20/4" and fmt.VERSION == 2
    assert run_fingerprint(load_config("configs/debug.toml", {}), "tok", 256)["codec"] == "int8"


def test_payload_size_and_compression(sparse: SparseCodec) -> None:
    n = (1 << 18) + 3
    payload = sparse.encode(torch.randn(n, generator=gen(11)))
    assert len(payload) == fmt.payload_size(n) == sparse.payload_size(n)
    one_leg = 4 * n / len(payload)
    assert one_leg > 51, one_leg  # 0.62 bits per value: 51.5x on whole chunks
    # A 4-peer butterfly round: 3/4 of our payload out, 3/4 of the average's payload back, against
    # fp32's 2 * 3/4 * 4 bytes per value. The average's payload has the same size as ours.
    round_ratio = (2 * 0.75 * 4 * n) / (0.75 * len(payload) + 0.75 * len(payload))
    assert round_ratio >= 50, round_ratio


def test_header_layout() -> None:
    payload = SparseCodec("reference", chunk_size=256, k=5, value_bits=3).encode(torch.randn(1000))
    fields = struct.unpack_from("<4sBBHQIIII", payload)
    assert fields == (b"P2SP", 2, 3, 0, 1000, 256, 5, 4, 0)
    lay = fmt.layout(1000, SparseParams(256, 5, 3))
    assert (lay.levels_offset, lay.counts_offset, lay.slots_offset) == (32, 32 + 4 * 4 * 4, 32 + 64 + 8)
    # low bits floor(log2(256 / 5)) = 5, slots 5 + 3 bits, bitmap (255 >> 5) + 1 + 5 bits: 53 bits
    assert lay.block == fmt.Block(256, 5, 5, 8, 13, 7)
    assert lay.last_block == fmt.Block(232, 5, 5, 8, 13, 7)  # (231 >> 5) + 1 + 5
    assert lay.size == 32 + 64 + 8 + 4 * 7 == len(payload)


# -- the rules of the format ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["normal-ragged", "mixed", "mixed-1bit", "integers", "subnormal", "spike", "sampled-positions"]
)
def test_keeps_the_top_k_with_ties_to_the_lower_index(
    sparse: SparseCodec, build: native.BuildConfig, kind: str
) -> None:
    make, p = INPUTS[kind]
    x = make()
    codec = SparseCodec(sparse.requested_backend, build=build, **vars(p))
    y = codec.decode(codec.encode(x), x.numel())
    kept = y.nonzero().view(-1).tolist()
    assert kept == expected_kept(x, p)
    assert torch.equal(torch.signbit(y[kept]), torch.signbit(x[kept]))
    parsed = fmt.parse(codec.encode(x), x.numel())
    for c in range(parsed.layout.n_chunks):
        chunk = x[c * p.chunk_size : (c + 1) * p.chunk_size]
        nonzero = int((chunk != 0).sum())
        assert parsed.counts[c] == min(parsed.layout.chunk_k(c), nonzero)  # exactly k unless too few


def test_levels_are_bucket_means(sparse: SparseCodec, build: native.BuildConfig) -> None:
    # One bit: a sign and one level per chunk, the mean kept magnitude (summed in double).
    p = SparseParams(1024, 100, 1)
    x = torch.randn(5 * 1024, generator=gen(12))
    codec = SparseCodec(sparse.requested_backend, build=build, **vars(p))
    y = codec.decode(codec.encode(x), x.numel())
    for c in range(5):
        xs, ys = x[c * 1024 : (c + 1) * 1024], y[c * 1024 : (c + 1) * 1024]
        kept = ys != 0
        assert int(kept.sum()) == 100
        assert torch.unique(ys[kept].abs()).numel() == 1
        assert ys[kept].abs()[0].item() == pytest.approx(xs[kept].double().abs().mean().item(), rel=1e-7)
    # Two bits: the two levels split the kept magnitudes at the middle of their range.
    two_bits = SparseCodec(sparse.requested_backend, build=build, value_bits=2)
    x = torch.randn(4096, generator=gen(13))
    y = two_bits.decode(two_bits.encode(x), 4096)
    a, b = x[y != 0].double().abs(), y[y != 0].double().abs()
    middle = (a.min() + a.max()) / 2
    low, high = a < middle, a >= middle
    assert torch.allclose(b[low], a[low].mean().expand(int(low.sum())), rtol=1e-6)
    assert torch.allclose(b[high], a[high].mean().expand(int(high.sum())), rtol=1e-6)


def test_equal_magnitudes_round_trip_exactly(sparse: SparseCodec) -> None:
    for x in (torch.full((8192,), -1.7), torch.tensor([3e38, -3e38] * 2048), torch.full((100,), 1e-45)):
        y = sparse.decode(sparse.encode(x), x.numel())
        kept = y != 0
        assert torch.equal(y[kept], x[kept])
        assert int(kept.sum()) == min(fmt.DEFAULT_K, x.numel()) * -(-x.numel() // 4096)


def test_gaussian_error_and_error_feedback(sparse: SparseCodec) -> None:
    # The top 5.5% of a Gaussian (|x| > 1.92) holds 30% of its energy: sqrt(1 - 0.30) = 0.84 is left
    # (0.8388 for this x's exact top k), and what is left is what error feedback carries. Eight
    # magnitude levels per chunk add next to nothing to that (0.8389).
    x = torch.randn(1 << 18, generator=gen(14))
    rows = x.view(-1, 4096)
    top = rows.abs().topk(fmt.DEFAULT_K, dim=1).indices
    exact = torch.zeros_like(rows).scatter_(1, top, rows.gather(1, top)).flatten()
    floor = ((x - exact).norm() / x.norm()).item()
    y = sparse.decode(sparse.encode(x), x.numel())
    rel = ((y - x).norm() / x.norm()).item()
    assert 0.75 < floor < rel < floor + 0.01, (floor, rel)
    residual = x - y  # error feedback: the next round sends the largest entries of what is left
    z = sparse.decode(sparse.encode(residual), x.numel())
    two_rounds = ((x - y - z).norm() / x.norm()).item()
    assert two_rounds < rel - 0.03, (rel, two_rounds)


def test_refuses_non_finite(sparse: SparseCodec) -> None:
    x = torch.randn(3 * 4096 + 11, generator=gen(15))
    for index, value, kind in (
        (0, math.inf, "1 Inf"),
        (x.numel() - 1, math.nan, "1 NaN"),
        (5000, -math.inf, "1 Inf"),
    ):
        y = x.clone()
        y[index] = value
        with pytest.raises(CodecError, match=f"{kind}.*index {index}"):
            sparse.encode(y)
    with pytest.raises(CodecError, match="1-D contiguous float32"):
        sparse.encode(torch.randn(4, 4))


def test_decode_accumulate(sparse: SparseCodec) -> None:
    x = torch.randn(100_003, generator=gen(16))
    payload = sparse.encode(x)
    decoded = sparse.decode(payload, x.numel())
    for weight in (1.0, 0.3, -2.5, 0.0):
        out = torch.randn(x.numel(), generator=gen(17))
        expected = out + torch.tensor(weight, dtype=torch.float32) * decoded  # one product, one add
        sparse.decode_accumulate(payload, out, weight)
        assert torch.equal(out, expected)
    out = torch.zeros(x.numel()).requires_grad_()
    sparse.decode_accumulate(bytearray(payload), out, 2.0)
    assert torch.equal(out.detach(), 2.0 * decoded)
    with pytest.raises(ValueError, match="finite"):
        sparse.decode_accumulate(payload, torch.zeros(x.numel()), math.nan)
    with pytest.raises(TypeError, match="out must be"):
        sparse.decode_accumulate(payload, torch.zeros(x.numel(), dtype=torch.float64), 1.0)


# -- native kernel vs reference --------------------------------------------------------------------------


@needs_cc
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_native_and_reference_give_the_same_bytes(build: native.BuildConfig, kind: str) -> None:
    make, p = INPUTS[kind]
    x = make()
    fast, ref = pair(build, p)
    assert fast.backend == "native"
    payload = fast.encode(x)
    assert payload == ref.encode(x)
    assert len(payload) == fmt.payload_size(x.numel(), p)
    decoded = fast.decode(payload, x.numel())
    assert torch.equal(decoded, ref.decode(payload, x.numel()))
    a = torch.randn(x.numel(), generator=gen(18))
    b = a.clone()
    fast.decode_accumulate(payload, a, 0.37)
    ref.decode_accumulate(payload, b, 0.37)
    assert torch.equal(a, b)


def _edge_probes(lo: float, hi: float, levels: int) -> torch.Tensor:
    """A chunk whose kept magnitudes sit on every bucket edge of step 2 and one ulp either side."""
    lo32, hi32 = torch.tensor(lo), torch.tensor(hi)
    edges = (lo32.double() + (hi32.double() - lo32.double()) * torch.arange(1, levels) / levels).float()
    probes = torch.cat(
        [lo32.view(1), hi32.view(1), edges, torch.nextafter(edges, hi32), torch.nextafter(edges, lo32)]
    )
    signs = torch.where(torch.arange(probes.numel()) % 3 == 0, -1.0, 1.0)
    chunk = torch.zeros(1024)
    chunk[torch.randperm(1024, generator=gen(33))[: probes.numel()]] = probes * signs
    return chunk


@needs_cc
def test_bucket_edges_code_identically(build: native.BuildConfig) -> None:
    p = SparseParams(1024, 512, 8)
    x = torch.cat([_edge_probes(1.0, 2.0, 128), _edge_probes(0.1, 0.7, 128), _edge_probes(1e-40, 3e-38, 128)])
    fast, ref = pair(build, p)
    payload = fast.encode(x)
    assert payload == ref.encode(x)
    y = fast.decode(payload, x.numel())
    for c in range(3):  # every probe kept, and a larger magnitude never gets a lower level
        xs, ys = x[c * 1024 : (c + 1) * 1024], y[c * 1024 : (c + 1) * 1024]
        kept = xs != 0
        assert torch.equal(ys != 0, kept)
        order = xs[kept].abs().argsort()
        assert bool((ys[kept].abs()[order].diff() >= 0).all())
        assert torch.unique(ys[kept].abs()).numel() > 100  # the probes really spread over the levels


@needs_cc
def test_threads_do_not_change_the_bytes(build: native.BuildConfig) -> None:
    x = torch.randn((1 << 20) + 5, generator=gen(19))
    one = SparseCodec("native", build=build, threads=1).encode(x)
    assert SparseCodec("native", build=build, threads=3).encode(x) == one
    a = SparseCodec("native", build=build, threads=4).decode(one, x.numel())
    assert torch.equal(a, SparseCodec("native", build=build, threads=1).decode(one, x.numel()))


@needs_cc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 baseline flag")
def test_portable_kernel_path_matches_reference(tmp_path: Path) -> None:
    # Built without AVX2, the kernel takes its plain C paths; they must give the same bytes.
    config = native.BuildConfig(
        compiler=os.environ.get("CC") or "cc",
        cache_dir=tmp_path,
        source=native.SPARSE_SOURCE,
        arch_flags=("-march=x86-64",),
    )
    for kind in ("normal-ragged", "mixed", "integers", "sampled-positions"):
        make, p = INPUTS[kind]
        x = make()
        fast = SparseCodec("native", build=config, **vars(p))
        assert fast.encode(x) == SparseCodec("reference", **vars(p)).encode(x)


@needs_cc
def test_butterfly_replicas_are_identical_across_backends(build: native.BuildConfig) -> None:
    # Each member encodes its part; the reducer (here with either backend) decodes them, averages in
    # member order and re-encodes once; every member decodes those bytes, with either backend.
    fast, ref = pair(build)
    parts = [torch.randn(20_000, generator=gen(20 + i)) for i in range(4)]
    averages = []
    for reducer in (fast, ref):
        average = torch.zeros(20_000)
        for part in parts:
            reducer.decode_accumulate((fast if len(averages) else ref).encode(part), average, 0.25)
        averages.append(reducer.encode(average))
    assert averages[0] == averages[1]
    replicas = [fast.decode(averages[0], 20_000), ref.decode(averages[0], 20_000)]
    assert torch.equal(replicas[0], replicas[1])


# -- hostile payloads --------------------------------------------------------------------------------------


def _valid(numel: int = 3 * 256 + 100, p: SparseParams = SparseParams(256, 6, 3)) -> tuple[bytes, int]:
    x = torch.randn(numel, generator=gen(21))
    return SparseCodec("reference", **vars(p)).encode(x), numel


def _read_block(payload: bytes, numel: int, chunk: int) -> tuple[list[int], list[int]]:
    """A chunk's block, independently of the format module's decoder: its slots and its bitmap's ones."""
    lay = fmt.parse(payload, numel).layout
    b, at = lay.block_of(chunk), lay.block_offset(chunk)
    bits = int.from_bytes(payload[at : at + b.size], "little")
    slots = [(bits >> (s * b.slot_bits)) & ((1 << b.slot_bits) - 1) for s in range(b.kc)]
    bitmap = bits >> (b.kc * b.slot_bits)
    return slots, [i for i in range(8 * b.size - b.kc * b.slot_bits) if bitmap >> i & 1]


def _write_block(payload: bytes, numel: int, chunk: int, slots: list[int], ones: list[int], m: int) -> bytes:
    """Replace a chunk's block and count by exactly these slots, bitmap ones and count."""
    lay = fmt.parse(payload, numel).layout
    b, at = lay.block_of(chunk), lay.block_offset(chunk)
    bits = sum(v << (s * b.slot_bits) for s, v in enumerate(slots)) + sum(
        1 << (b.kc * b.slot_bits + i) for i in ones
    )
    payload = payload[:at] + bits.to_bytes(b.size, "little") + payload[at + b.size :]
    c = lay.counts_offset + 2 * chunk
    return payload[:c] + struct.pack("<H", m) + payload[c + 2 :]


def _with_entries(payload: bytes, numel: int, chunk: int, entries: list[tuple[int, int]]) -> bytes:
    """A chunk re-encoded, Elias-Fano as the spec says, from (index, code) entries taken as given."""
    b = fmt.parse(payload, numel).layout.block_of(chunk)
    low = (1 << b.low_bits) - 1
    slots = [(i & low) | code << b.low_bits for i, code in entries] + [0] * (b.kc - len(entries))
    ones = [(i >> b.low_bits) + j for j, (i, _) in enumerate(entries)]
    return _write_block(payload, numel, chunk, slots, ones, len(entries))


def _entries(payload: bytes, numel: int, chunk: int) -> list[tuple[int, int]]:
    b = fmt.parse(payload, numel).layout.block_of(chunk)
    slots, ones = _read_block(payload, numel, chunk)
    low = (1 << b.low_bits) - 1
    return [((p - j) << b.low_bits | slots[j] & low, slots[j] >> b.low_bits) for j, p in enumerate(ones)]


def _corruptions() -> dict[str, tuple[bytes, int]]:
    payload, n = _valid()
    lay = fmt.parse(payload, n).layout

    def patch(offset: int, data: bytes) -> bytes:
        return payload[:offset] + data + payload[offset + len(data) :]

    def set_bit(offset: int, bit: int) -> bytes:
        return patch(offset, bytes([payload[offset] | 1 << bit]))

    def entries(chunk: int, edit) -> bytes:
        return _with_entries(payload, n, chunk, edit(_entries(payload, n, chunk)))

    def block(chunk: int, edit_slots=lambda s: s, edit_ones=lambda o: o, m: int | None = None) -> bytes:
        slots, ones = _read_block(payload, n, chunk)
        return _write_block(
            payload, n, chunk, edit_slots(slots), edit_ones(ones), len(ones) if m is None else m
        )

    last, b = lay.n_chunks - 1, lay.block
    low = lay.last_block.low_bits
    past = (((lay.last_n - 1) >> low) + 1 << low) - 1  # the last index of the last high bucket
    for blk in (b, lay.last_block):  # the padding cases below need a free last bit in the block
        assert blk.kc * blk.slot_bits + blk.bitmap_bits < 8 * blk.size
    return {
        "empty": (b"", n),
        "short header": (payload[:31], n),
        "truncated": (payload[:-1], n),
        "extra byte": (payload + b"\0", n),
        "numel -1": (payload, n - 1),
        "numel +1": (payload, n + 1),
        "numel huge": (payload, 1 << 40),  # must be refused before anything of that size exists
        "numel negative": (payload, -1),
        "bad magic": (patch(0, b"XXXX"), n),
        "old version": (patch(4, b"\x01"), n),
        "bad version": (patch(4, b"\x03"), n),
        "bits 0": (patch(5, b"\x00"), n),
        "bits 9": (patch(5, b"\x09"), n),
        "reserved": (patch(6, b"\x01"), n),
        "reserved 2": (patch(28, b"\x01"), n),
        "header numel": (patch(8, struct.pack("<Q", 1 << 62)), n),
        "chunk not pow2": (patch(16, struct.pack("<I", 300)), n),
        "chunk 2^17": (patch(16, struct.pack("<I", 1 << 17)), n),
        "k 0": (patch(20, struct.pack("<I", 0)), n),
        "k > chunk/2": (patch(20, struct.pack("<I", 129)), n),
        "chunk count": (patch(24, struct.pack("<I", 3)), n),
        "nan level": (patch(32 + 4, struct.pack("<f", math.nan)), n),
        "inf level": (patch(32 + 4 * 5, struct.pack("<f", math.inf)), n),
        "negative level": (patch(32, struct.pack("<f", -1.0)), n),
        "count > k": (patch(lay.counts_offset + 2, struct.pack("<H", 7)), n),
        "last count > last k": (patch(lay.counts_offset + 2 * last, struct.pack("<H", 7)), n),
        "a one missing": (block(1, edit_ones=lambda o: o[:-1], m=6), n),
        "one too many": (block(1, edit_ones=lambda o: sorted({*o, max(o) + 1})), n),
        "one moved past the bitmap": (block(0, edit_ones=lambda o: o[:-1] + [b.bitmap_bits]), n),
        "index repeated": (entries(1, lambda e: [e[0], e[0], *e[2:]]), n),
        "index decreasing": (entries(0, lambda e: [*e[:4], (e[3][0] - 1, e[3][1]), e[5]]), n),
        "index past the tail": (entries(last, lambda e: [*e[:-1], (past, 0)]), n),
        "padding slot": (block(2, edit_slots=lambda s: s[:-1] + [1], edit_ones=lambda o: o[:-1], m=5), n),
        "padding bits": (set_bit(lay.block_offset(0) + b.size - 1, 7), n),
        "tail bits": (set_bit(lay.size - 1, 7), n),
        "garbage": (bytes(range(256)) * 4, n),
    }


def test_block_helpers_keep_valid_payloads_valid() -> None:
    payload, n = _valid()
    lay = fmt.parse(payload, n).layout
    for chunk in range(lay.n_chunks):
        assert _with_entries(payload, n, chunk, _entries(payload, n, chunk)) == payload
    shorter = _with_entries(payload, n, 2, _entries(payload, n, 2)[:-1])  # one entry fewer is valid
    fmt.validate(shorter, n)
    assert (
        SparseCodec("reference", **vars(SparseParams(256, 6, 3))).decode(shorter, n) != 0
    ).sum() == 6 * 4 - 1


@pytest.mark.parametrize("case", sorted(_corruptions()))
def test_rejects_malformed_payloads(sparse: SparseCodec, case: str) -> None:
    bad, numel = _corruptions()[case]
    with pytest.raises(CodecError):
        fmt.validate(bad, numel)
    with pytest.raises(CodecError):
        sparse.decode(bad, numel)
    if 0 <= numel < 1 << 20:
        out = torch.ones(numel)
        with pytest.raises(CodecError):
            sparse.decode_accumulate(bad, out, 1.0)
        assert bool((out == 1).all())  # validation happens before anything is written


def _agree(codecs: list[SparseCodec], payload: bytes, numel: int) -> None:
    """Every decoder and the format's own check accept the same payloads, and decode them alike."""
    try:
        fmt.validate(payload, numel)
        valid = True
    except CodecError:
        valid = False
    results = []
    for codec in codecs:
        try:
            results.append(codec.decode(payload, numel))
        except CodecError:
            results.append(None)
        out = torch.ones(numel)
        try:
            codec.decode_accumulate(payload, out, 0.5)
        except CodecError:
            assert bool((out == 1).all())
        else:
            assert results[-1] is not None and torch.equal(out, 1 + 0.5 * results[-1])
    assert [r is not None for r in results] == [valid] * len(codecs)
    if valid:
        assert all(torch.equal(r, results[0]) for r in results)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def both(build: native.BuildConfig) -> list[SparseCodec]:
    return [SparseCodec("reference")] + ([SparseCodec("native", build=build)] if HAVE_CC else [])


@pytest.mark.timeout(60)
@FUZZ
@given(data=st.binary(max_size=600), numel=st.integers(0, 3000))
def test_fuzz_random_payloads(both: list[SparseCodec], data: bytes, numel: int) -> None:
    _agree(both, data, numel)


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=50)
@given(
    header=st.tuples(
        st.sampled_from([6, 64, 128, 256, 1 << 16, 100]),  # chunk
        st.integers(0, 70),  # k
        st.integers(0, 9),  # bits
        st.integers(0, 2000),  # numel
    ),
    body=st.binary(max_size=400),
)
def test_fuzz_payloads_with_plausible_headers(both: list[SparseCodec], header: tuple, body: bytes) -> None:
    # Random bodies behind headers that often pass, padded to the length they imply when they do.
    chunk, k, bits, numel = header
    head = struct.pack("<4sBBHQIIII", b"P2SP", fmt.VERSION, bits, 0, numel, chunk, k, -(-numel // chunk), 0)
    try:
        size = fmt.payload_size(numel, SparseParams(chunk, k, bits))
        body = (body * (1 + size // max(1, len(body))))[: size - 32] if body else bytes(size - 32)
    except ValueError:
        pass
    _agree(both, head + body, numel)


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=80)
@given(
    seed=st.integers(0, 2**16),
    numel=st.integers(1, 1500),
    params=st.sampled_from([SparseParams(64, 4, 2), SparseParams(256, 6, 3), SparseParams(64, 32, 8)]),
    mutations=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 2)), max_size=4),
)
def test_fuzz_mutated_payloads(
    both: list[SparseCodec], seed: int, numel: int, params: SparseParams, mutations: list
) -> None:
    payload = bytearray(
        SparseCodec("reference", **vars(params)).encode(torch.randn(numel, generator=gen(seed)))
    )
    for where, value, kind in mutations:  # overwrite, insert or delete one byte
        at = where % (len(payload) + 1)
        if kind == 0 and at < len(payload):
            payload[at] = value
        elif kind == 1:
            payload.insert(at, value)
        elif at < len(payload):
            del payload[at]
    _agree(both, bytes(payload), numel)


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@needs_cc
@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=60)
@given(
    values=st.lists(st.one_of(finite_f32, st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45])), max_size=700),
    params=st.sampled_from([SparseParams(64, 1, 1), SparseParams(64, 5, 2), SparseParams(128, 64, 8)]),
)
def test_fuzz_encode_same_bytes_and_round_trip(
    build: native.BuildConfig, values: list[float], params: SparseParams
) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    fast, ref = pair(build, params)
    payload = fast.encode(x)
    assert payload == ref.encode(x)
    y = fast.decode(payload, x.numel())
    assert y.nonzero().view(-1).tolist() == expected_kept(x, params)
    assert torch.isfinite(y).all()


# -- building and falling back ----------------------------------------------------------------------------


def test_missing_compiler_falls_back_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = native.BuildConfig(
        compiler=str(tmp_path / "no-such-cc"), cache_dir=tmp_path / "cache", source=native.SPARSE_SOURCE
    )
    x = torch.randn(5000, generator=gen(22))
    with caplog.at_level(logging.WARNING, logger="p2p_trainer.codec"):
        codec = SparseCodec("auto", build=config)
        payload = codec.encode(x)
        assert codec.backend == "reference"
        SparseCodec("auto", build=config).encode(x)  # the same failure warns only once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C compiler" in warnings[0] and "reference" in warnings[0], warnings
    assert payload == SparseCodec("reference").encode(x)
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        SparseCodec("native", build=config).encode(x)


@needs_cc
def test_a_library_without_the_sparse_entry_points_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "other.c"
    source.write_text("int p2pq_abi_version(void) { return 1; }\n")
    config = native.BuildConfig(compiler=os.environ.get("CC") or "cc", cache_dir=tmp_path, source=source)
    with pytest.raises(native.NativeUnavailable, match="cannot load the sparse kernel"):
        SparseCodec("native", build=config).encode(torch.ones(3))
