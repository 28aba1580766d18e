"""Property-based fuzzing of the int8 payload parser and decoders, reference and native C.

Payloads come from other peers, so every decoder must answer a malformed one with CodecError (the C
entry points with an error code), never crash, hang, write to its output, or allocate what a lying
header asks for. Mutations start from valid payloads (truncation, extension, flipped bytes, extreme
header fields, NaN/Inf codebooks) so that they get past the first checks and reach the later ones.
The two backends must then agree exactly: both refuse, or both return the same bits.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_trainer.codec import CodecError, native, reference
from p2p_trainer.codec import int8_format as fmt
from p2p_trainer.codec.int8 import Int8Codec

pytestmark = pytest.mark.timeout(120)

HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")

# derandomize: the same examples on every run (CI stability); database=None: no .hypothesis folder.
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

CHUNKS = (64, 128, 256)
U32_EDGES = (0, 1, 63, 64, 65, 128, 1 << 24, (1 << 24) + 1, 1 << 31, (1 << 32) - 1)
U64_EDGES = (0, 1, 2, 1 << 32, 1 << 40, 1 << 55, 1 << 62, (1 << 63) - 1, (1 << 64) - 1)
FIELDS = {"numel": (8, "<Q"), "chunk_size": (16, "<I"), "n_chunks": (20, "<I")}
POISON = (
    struct.pack("<f", math.nan),
    struct.pack("<f", math.inf),
    struct.pack("<f", -math.inf),
    struct.pack("<I", 0x7F800001),  # signalling NaN
    struct.pack("<I", 0xFFFFFFFF),  # negative quiet NaN, all payload bits set
)


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> native.BuildConfig:
    return native.BuildConfig(
        compiler=os.environ.get("CC") or "cc", cache_dir=tmp_path_factory.mktemp("kernels")
    )


def _address(buf: bytes) -> int:
    return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value or 0


# -- payloads and their mutations -------------------------------------------------------------------


@st.composite
def valid_payloads(draw: st.DrawFn) -> tuple[bytes, int]:
    """A real payload from the reference encoder: several chunks, a ragged tail, varied ranges."""
    numel = draw(st.integers(0, 600))
    chunk = draw(st.sampled_from(CHUNKS))
    seed = draw(st.integers(0, 1 << 16))
    scale = 10.0 ** draw(st.integers(-6, 6))
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale
    codes, books, _ = reference.quantize(x, chunk)
    payload = fmt.pack_header(numel, chunk) + books.numpy().astype("<f4").tobytes() + codes.numpy().tobytes()
    return payload, numel


def mutation() -> st.SearchStrategy[tuple]:
    where = st.floats(0.0, 1.0, exclude_max=True)  # a position as a fraction, valid for any length
    field = st.sampled_from(sorted(FIELDS))
    return st.one_of(
        st.tuples(st.just("truncate"), where),
        st.tuples(st.just("extend"), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("flip"), where, st.integers(1, 255)),
        st.tuples(st.just("header byte"), st.integers(0, 7), st.integers(0, 255)),
        st.tuples(
            st.just("field"),
            field,
            st.one_of(st.sampled_from(U32_EDGES + U64_EDGES), st.integers(0, (1 << 64) - 1)),
        ),
        st.tuples(st.just("codebook"), where, st.sampled_from(POISON)),
        # numel, chunk size and chunk count that agree with each other, not with the payload's length
        st.tuples(
            st.just("consistent header"),
            st.one_of(st.sampled_from(U64_EDGES[:-2]), st.integers(0, 1 << 40)),
            st.sampled_from((0, 1, 63, 64, 100, 128, 256, 1 << 18, 1 << 24, 1 << 25, 1 << 31)),
        ),
    )


def mutate(payload: bytes, steps: list[tuple]) -> bytes:
    out = bytearray(payload)
    for kind, *args in steps:
        if kind == "truncate":
            del out[int(args[0] * len(out)) :]
        elif kind == "extend":
            out += args[0]
        elif kind == "flip" and out:
            out[int(args[0] * len(out))] ^= args[1]
        elif kind == "header byte" and len(out) > args[0]:
            out[args[0]] = args[1]
        elif kind == "field":
            offset, form = FIELDS[args[0]]
            value = args[1] & ((1 << (8 * struct.calcsize(form))) - 1)
            if len(out) >= offset + struct.calcsize(form):
                struct.pack_into(form, out, offset, value)
        elif kind == "consistent header" and len(out) >= fmt.HEADER_SIZE:
            numel, chunk = args
            chunks = min(fmt.n_chunks(numel, chunk), (1 << 32) - 1) if chunk else 0
            struct.pack_into("<QII", out, 8, numel, chunk, chunks)
        elif kind == "codebook" and len(out) >= fmt.HEADER_SIZE + 4:
            entries = (len(out) - fmt.HEADER_SIZE) // 4
            at = fmt.HEADER_SIZE + 4 * int(args[0] * min(entries, 1 << 20))
            if at + 4 <= len(out):
                out[at : at + 4] = args[1]
    return bytes(out)


@st.composite
def hostile(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """(mutated payload, numel the caller passes, numel it really holds)."""
    payload, numel = draw(valid_payloads())
    bad = mutate(payload, draw(st.lists(mutation(), min_size=1, max_size=3)))
    claim = draw(st.sampled_from(("true", "true", "true", "header", "header", "near", "huge")))
    if claim == "header" and len(bad) >= 16:  # the caller believes the (maybe lying) header
        claimed = struct.unpack_from("<Q", bad, 8)[0]
    elif claim == "near":
        claimed = draw(st.integers(max(0, numel - 2), numel + 2))
    elif claim == "huge":
        claimed = draw(st.sampled_from((1 << 24, 1 << 40, (1 << 62) - 1)))
    else:
        claimed = numel
    return bad, claimed, numel


def verdict(payload: bytes, numel: int) -> bool:
    """Whether the parser accepts; anything but a clean accept or CodecError fails the test."""
    try:
        parsed = fmt.parse(payload, numel)
    except CodecError:
        return False
    assert len(payload) == fmt.payload_size(numel, parsed.chunk_size)
    assert parsed.codebooks.shape == (parsed.n_chunks, fmt.N_BUCKETS)
    assert bool(torch.isfinite(torch.from_numpy(parsed.codebooks.copy())).all())
    return True


# -- the parser -------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=3000), st.integers(0, 1 << 64))
def test_parser_on_random_bytes(data: bytes, numel: int) -> None:
    verdict(data, numel)


@FUZZ
@given(hostile())
def test_parser_on_mutated_payloads(case: tuple[bytes, int, int]) -> None:
    bad, claimed, _ = case
    verdict(bad, claimed)


@FUZZ
@given(valid_payloads())
def test_parser_accepts_what_the_encoder_writes(case: tuple[bytes, int]) -> None:
    payload, numel = case
    assert verdict(payload, numel)


# -- the decoders: reference and native agree on every hostile payload -------------------------------


def _outcome(fn) -> torch.Tensor | None:
    try:
        return fn()
    except CodecError:
        return None


def _accumulate(codec: Int8Codec, payload: bytes, numel: int) -> torch.Tensor | None:
    out = torch.linspace(-3.0, 3.0, numel)
    before = out.clone()
    try:
        codec.decode_accumulate(payload, out, 0.37)
    except CodecError:
        assert torch.equal(out, before)  # refused before anything was written
        return None
    return out


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@FUZZ
@given(hostile())
def test_reference_decoders_refuse_or_decode(case: tuple[bytes, int, int]) -> None:
    bad, claimed, _ = case
    ok = verdict(bad, claimed)
    codec = Int8Codec("reference")
    decoded = _outcome(lambda: codec.decode(bad, claimed))  # a lying numel never reaches an allocation
    assert (decoded is not None) == ok
    if ok:
        assert decoded.shape == (claimed,) and bool(torch.isfinite(decoded).all())
        assert (_accumulate(codec, bad, claimed) is not None) == ok


@needs_cc
@FUZZ
@given(hostile())
def test_native_decoders_match_reference(build: native.BuildConfig, case: tuple[bytes, int, int]) -> None:
    bad, claimed, _ = case
    ok = verdict(bad, claimed)
    fast, ref = Int8Codec("native", build=build), Int8Codec("reference")
    got = _outcome(lambda: fast.decode(bad, claimed))
    assert (got is not None) == ok
    assert _same_bits(got, _outcome(lambda: ref.decode(bad, claimed)))
    if claimed <= 1 << 16:  # the accumulator is the caller's: only a size it could really hold
        acc = _accumulate(fast, bad, claimed)
        assert (acc is not None) == ok
        assert _same_bits(acc, _accumulate(ref, bad, claimed))


@needs_cc
@FUZZ
@given(hostile(), st.data())
def test_native_entry_points_on_hostile_payloads_and_lengths(
    build: native.BuildConfig, case: tuple[bytes, int, int], data: st.DataObject
) -> None:
    # Straight to C, no Python validation in front: the kernel must reach the parser's verdict from
    # the lengths alone. Lengths may be short or inconsistent, never longer than the real buffers
    # (no function can detect that), so a crash or stray write here is a bug in the kernel.
    bad, _, numel = case
    kernels = native.load(build)
    payload_bytes = data.draw(st.one_of(st.just(len(bad)), st.integers(-2, len(bad))), label="payload_bytes")
    out_bytes = data.draw(st.one_of(st.just(4 * numel), st.integers(-4, 4 * numel + 8)), label="out_bytes")
    out = torch.full((numel + 2,), 7.0)  # room for the longest out_bytes drawn, never more
    sane = payload_bytes >= 0 and out_bytes >= 0 and out_bytes % 4 == 0
    ok = sane and verdict(bad[:payload_bytes], out_bytes // 4)
    for call in (
        lambda: kernels.dequantize(_address(bad), payload_bytes, out.data_ptr(), out_bytes, 2),
        lambda: kernels.decode_accumulate(_address(bad), payload_bytes, 0.5, out.data_ptr(), out_bytes, 2),
    ):
        before = out.clone()
        rc = call()
        assert (rc == 0) == ok, rc
        assert rc == 0 or rc in fmt.NATIVE_ERRORS
        written = out_bytes // 4 if ok else 0  # a refused call writes nothing, an accepted one no further
        assert torch.equal(out[written:], before[written:])


@st.composite
def forged(draw: st.DrawFn) -> tuple[bytes, int]:
    """A well-formed header with chosen numel / chunk size / chunk count and a body of some length:
    reaches the parser's later checks (chunk size, chunk count, length, codebook) directly."""
    numel = draw(st.one_of(st.integers(0, 3000), st.sampled_from(U64_EDGES)))
    chunk = draw(st.one_of(st.sampled_from(CHUNKS), st.sampled_from(U32_EDGES)))
    consistent = fmt.n_chunks(numel, chunk) if chunk else 0
    count = draw(st.one_of(st.just(consistent), st.sampled_from(U32_EDGES))) & 0xFFFFFFFF
    body = draw(st.one_of(st.just(consistent * fmt.CODEBOOK_BYTES + numel), st.integers(0, 8000)))
    body = min(body, 1 << 16)  # a header may claim anything; the bytes behind it stay small
    payload = bytearray(struct.pack("<4sBBHQII", fmt.MAGIC, fmt.VERSION, 0, 0, numel, chunk, count))
    payload += bytes(body)
    if body >= 4 and draw(st.booleans()):
        at = fmt.HEADER_SIZE + 4 * draw(st.integers(0, body // 4 - 1))
        payload[at : at + 4] = draw(st.sampled_from(POISON))
    claimed = numel if numel <= 1 << 16 and draw(st.booleans()) else draw(st.integers(0, 3000))
    return bytes(payload), claimed


@needs_cc
@FUZZ
@given(forged())
def test_forged_headers_get_one_verdict(build: native.BuildConfig, case: tuple[bytes, int]) -> None:
    payload, numel = case
    ok = verdict(payload, numel)
    kernels = native.load(build)
    out = torch.zeros(numel + 1)
    assert (kernels.dequantize(_address(payload), len(payload), out.data_ptr(), 4 * numel, 1) == 0) == ok
    assert out[numel] == 0.0
    for backend in ("native", "reference"):
        assert (_outcome(lambda b=backend: Int8Codec(b).decode(payload, numel)) is not None) == ok


@pytest.mark.parametrize("numel", [1 << 30, 1 << 40, 1 << 55])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_lying_header_is_refused_before_any_allocation(numel: int, backend: str) -> None:
    # A header and a numel that agree on an absurd size, a payload of a few bytes: the length check
    # comes first, so no decoder ever asks for numel * 4 bytes (which would raise, not CodecError).
    if backend == "native" and not HAVE_CC:
        pytest.skip("no C compiler")
    payload = fmt.pack_header(numel, 1 << 24) + b"\0" * 64
    with pytest.raises(CodecError, match="bytes"):
        Int8Codec(backend).decode(payload, numel)


# -- the encoder: native vs reference on awkward inputs ------------------------------------------------


@st.composite
def awkward_inputs(draw: st.DrawFn) -> torch.Tensor:
    """Shapes of data that stress the arithmetic: tiny, subnormal and huge scales (the double code path
    of step 3), large offsets, constant runs, outliers, signed zeros."""
    n = draw(st.integers(1, 700))
    g = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    scale = 2.0 ** draw(st.integers(-140, 120))
    offset = draw(st.sampled_from((0.0, 1.0, -1e3, 1e20))) * scale
    x = (torch.randn(n, generator=g, dtype=torch.float64) * scale + offset).clamp(-3e38, 3e38)
    if draw(st.booleans()):  # a constant run
        start = draw(st.integers(0, n - 1))
        x[start : start + draw(st.integers(1, 200))] = x[start].item()
    for _ in range(draw(st.integers(0, 3))):  # outliers up to 2^20 x the bulk
        i = draw(st.integers(0, n - 1))
        x[i] = max(-3e38, min(3e38, x[i].item() * 2.0 ** draw(st.integers(-20, 20))))
    if draw(st.booleans()):
        x[: draw(st.integers(0, n))] *= 0.0  # zeros, negative ones included
    return x.float()


def _bucket_tolerance(x: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, chunk: int) -> torch.Tensor:
    """How far two correct codebooks may differ: bucket sums are taken in double in a free order, so two
    sums of a bucket's k values differ by at most 2 (k - 1) 2^-53 sum|x| (the mean by 2^-52 sum|x|), and
    each mean is then rounded to fp32 (one ulp apart at most; 2^-148 covers subnormal results)."""
    index = (torch.arange(x.numel()) // chunk) * fmt.N_BUCKETS + codes.long()
    abs_sum = torch.zeros(books.numel(), dtype=torch.float64).index_add_(0, index, x.double().abs())
    return (2.0**-52 * abs_sum).view_as(books) + 2.0**-22 * books.double().abs() + 2.0**-148


@needs_cc
@FUZZ
@given(awkward_inputs(), st.sampled_from(CHUNKS))
def test_native_encoder_matches_reference(build: native.BuildConfig, x: torch.Tensor, chunk: int) -> None:
    fast, ref = Int8Codec("native", chunk_size=chunk, build=build), Int8Codec("reference", chunk_size=chunk)
    codes_n, books_n, stats_n = fast.quantize(x)
    codes_r, books_r, stats_r = ref.quantize(x)
    assert stats_n == stats_r
    assert torch.equal(codes_n, codes_r)
    assert bool(torch.isfinite(books_n).all())
    gap = (books_n.double() - books_r.double()).abs()
    assert bool((gap <= _bucket_tolerance(x, codes_r, books_r, chunk)).all())
    payload = fast.encode(x)
    assert payload[fmt.HEADER_SIZE + 4 * books_n.numel() :] == codes_n.numpy().tobytes()
    assert torch.equal(fast.decode(payload, x.numel()), ref.decode(payload, x.numel()))
