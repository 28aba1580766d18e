"""The fp32 and int8 pseudo-gradient codecs: C kernel vs torch reference, hostile payloads, fallback."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from p2p_trainer.codec import CODECS, Codec, CodecError, get_codec, native
from p2p_trainer.codec import int8_format as fmt
from p2p_trainer.codec.int8 import Int8Codec

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> native.BuildConfig:
    """A private kernel cache, so the test run really compiles the current source."""
    return native.BuildConfig(
        compiler=os.environ.get("CC") or "cc", cache_dir=tmp_path_factory.mktemp("kernels")
    )


def pair(build: native.BuildConfig, chunk_size: int = fmt.DEFAULT_CHUNK_SIZE) -> tuple[Int8Codec, Int8Codec]:
    return (
        Int8Codec("native", chunk_size=chunk_size, build=build),
        Int8Codec("reference", chunk_size=chunk_size),
    )


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def student_t(n: int, df: int, seed: int = 0) -> torch.Tensor:
    z = torch.randn(df + 1, n, generator=gen(seed), dtype=torch.float64)
    chi2 = z[1:].square().sum(0)  # seeded, unlike torch.distributions.Chi2
    return (z[0] / torch.sqrt(chi2 / df)).float()


def cauchy(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.empty(n, dtype=torch.float64).cauchy_(generator=gen(seed))
    return x.clamp(-1e30, 1e30).float()  # finite, but with outliers 30 orders above the bulk


def mixed_chunks(n: int) -> torch.Tensor:
    # chunk size 64 below: constant, all-zero, -0.0/+0.0, tiny subnormals, huge values, normal
    x = torch.randn(n, generator=gen(3))
    x[0:64] = 2.5
    x[64:128] = 0.0
    x[128:192] = 0.0
    x[128:192:2] = -0.0
    x[192:256] = torch.randn(64, generator=gen(4)) * 1e-44
    x[256:320] = torch.randn(64, generator=gen(5)).sign() * 3e38
    return x


INPUTS = {
    "normal": (lambda: torch.randn(100_000, generator=gen(1)) * 3 + 0.5, 1 << 14),
    "normal-default-chunk": (lambda: torch.randn(600_001, generator=gen(2)), fmt.DEFAULT_CHUNK_SIZE),
    "student-t-2": (lambda: student_t(70_000, 2), 1 << 12),
    "cauchy": (lambda: cauchy(70_000), 1 << 12),
    "constant": (lambda: torch.full((5000,), -1.7), 1 << 10),
    "all-zero": (lambda: torch.zeros(5000), 1 << 10),
    "one": (lambda: torch.tensor([0.3]), fmt.DEFAULT_CHUNK_SIZE),
    "two": (lambda: torch.tensor([0.3, -2.0]), fmt.DEFAULT_CHUNK_SIZE),
    "three": (lambda: torch.tensor([1.0, 1.0, 7.0]), fmt.DEFAULT_CHUNK_SIZE),
    "ragged-tail": (lambda: torch.randn(64 * 5 + 37, generator=gen(6)), 64),
    "tail-of-one": (lambda: torch.randn(1025, generator=gen(7)), 1024),
    "mixed-chunks": (lambda: mixed_chunks(64 * 9 + 5), 64),
    "offset-mean": (lambda: 1000.0 + torch.randn(50_000, generator=gen(8)) * 1e-3, 1 << 13),
    "empty": (lambda: torch.zeros(0), 1 << 10),
}


# -- API -----------------------------------------------------------------------------------------


def test_registry_and_protocol() -> None:
    assert {"fp32", "int8"} <= set(CODECS)  # other codecs may join the registry
    for name in CODECS:
        codec = get_codec(name)
        assert codec.name == name
        assert isinstance(codec, Codec)
    with pytest.raises(ValueError, match=r"'int4'.*fp32, int8"):
        get_codec("int4")
    with pytest.raises(ValueError, match="backend"):
        get_codec("int8", backend="gpu")
    assert issubclass(CodecError, ValueError)


@pytest.mark.parametrize("name", ["int8", "sparse"])
def test_threads_per_call_reach_the_kernel_and_do_not_change_the_bytes(name: str) -> None:
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(5))
    one, three = get_codec(name, threads=1), get_codec(name, threads=3)
    assert (one._threads(), three._threads()) == (1, 3)
    assert one.encode(x) == three.encode(x)


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    # Importing and constructing must not compile anything; only the first encode may.
    code = (
        "import torch; from p2p_trainer.codec import get_codec; c = get_codec('int8'); "
        "import os, sys; sys.exit(1 if os.path.exists(sys.argv[1]) else 0)"
    )
    env = {**os.environ, "P2P_TRAINER_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "cache")], env=env, cwd=REPO, timeout=50
    )
    assert proc.returncode == 0


@pytest.mark.parametrize(
    "name,backend", [("fp32", "auto"), *((n, b) for n in ("int8", "sparse") for b in ("native", "reference"))]
)
def test_a_received_frame_decodes_in_place_as_its_bytes_do(name: str, backend: str) -> None:
    """A payload as the wire hands it over (a view at an offset into a bytearray, not a copy)
    decodes to the same bits as the same payload in ``bytes``, in every decode call."""
    codec = get_codec(name, backend=backend)
    x = torch.randn(70_001, generator=gen(3))
    payload = codec.encode(x)
    frame = bytearray(b"\x07" + payload)  # the frame's kind byte, then the payload
    view = memoryview(frame)[1:]
    assert torch.equal(codec.decode(view, x.numel()), codec.decode(payload, x.numel()))
    a, b = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    codec.decode_into(view, a)
    codec.decode_into(payload, b)
    assert torch.equal(a, b)
    a, b = torch.ones_like(x), torch.ones_like(x)
    codec.decode_accumulate(frame[1:], a, 0.5)  # a bytearray of its own too
    codec.decode_accumulate(payload, b, 0.5)
    assert torch.equal(a, b)


# -- fp32 ----------------------------------------------------------------------------------------


def test_fp32_is_lossless_little_endian_bytes() -> None:
    x = torch.randn(1001, generator=gen())
    x[:4] = torch.tensor([-0.0, 1e-45, 3.4028235e38, -1.1754944e-38])
    codec = get_codec("fp32")
    payload = codec.encode(x)
    assert payload == x.numpy().astype("<f4").tobytes()
    y = codec.decode(payload, x.numel())
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))  # bit for bit, -0.0 included
    y[0] = 5.0
    assert x[0].item() == 0.0  # decode returns a new tensor


def test_fp32_decode_accumulate() -> None:
    x = torch.randn(777, generator=gen(1))
    out = torch.randn(777, generator=gen(2))
    expected = out + 0.25 * x
    get_codec("fp32").decode_accumulate(get_codec("fp32").encode(x), out, 0.25)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)


def test_fp32_rejects_bad_input_and_payloads() -> None:
    codec = get_codec("fp32")
    x = torch.randn(10)
    payload = codec.encode(x)
    for bad in (payload[:-1], payload + b"\0", b""):
        with pytest.raises(CodecError, match="bytes"):
            codec.decode(bad, 10)
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode(struct.pack("<f", math.nan) + payload[4:], 10)
    for value, kind in ((math.nan, "1 NaN"), (math.inf, "1 Inf")):
        y = x.clone()
        y[7] = value
        with pytest.raises(CodecError, match=f"{kind}.*index 7"):
            codec.encode(y)
    with pytest.raises(CodecError, match="1-D contiguous float32"):
        codec.encode(torch.randn(4, 4))


# -- int8: native kernel vs reference --------------------------------------------------------------


@needs_cc
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_native_matches_reference(build: native.BuildConfig, kind: str) -> None:
    make, chunk = INPUTS[kind]
    x = make()
    fast, ref = pair(build, chunk)
    assert fast.backend == "native"
    codes_n, books_n, stats_n = fast.quantize(x)
    codes_r, books_r, stats_r = ref.quantize(x)
    assert stats_n == stats_r  # mean, std, lo, scale: the same doubles
    assert torch.equal(codes_n, codes_r)
    torch.testing.assert_close(books_n, books_r, rtol=1e-6, atol=0.0)
    assert torch.isfinite(books_n).all()
    payload_n, payload_r = fast.encode(x), ref.encode(x)
    assert len(payload_n) == len(payload_r) == fmt.payload_size(x.numel(), chunk)
    codes_at = len(payload_n) - x.numel()
    assert payload_n[: fmt.HEADER_SIZE] == payload_r[: fmt.HEADER_SIZE]
    assert payload_n[codes_at:] == payload_r[codes_at:]
    # Each backend decodes the other's payload to the same values.
    for payload in (payload_n, payload_r):
        assert torch.equal(fast.decode(payload, x.numel()), ref.decode(payload, x.numel()))


@needs_cc
def test_native_matches_reference_large(build: native.BuildConfig) -> None:
    x = torch.randn((1 << 24) + 7, generator=gen(11))
    x[: 1 << 18] *= 100.0  # chunks with different ranges
    fast, ref = pair(build)
    codes_n, books_n, stats_n = fast.quantize(x)
    codes_r, books_r, stats_r = ref.quantize(x)
    assert len(stats_n) == 65
    assert stats_n == stats_r
    assert torch.equal(codes_n, codes_r)
    torch.testing.assert_close(books_n, books_r, rtol=1e-6, atol=0.0)


@needs_cc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 baseline flag")
def test_portable_kernel_path_matches_reference(tmp_path: Path) -> None:
    # Built without AVX2, the kernel takes its plain C path; it must give the same bits.
    config = native.BuildConfig(
        compiler=os.environ.get("CC") or "cc", cache_dir=tmp_path, arch_flags=("-march=x86-64",)
    )
    fast = Int8Codec("native", chunk_size=1 << 10, build=config)
    ref = Int8Codec("reference", chunk_size=1 << 10)
    for x in (student_t(20_000, 3, seed=5), mixed_chunks(64 * 20 + 9)):
        codes_n, books_n, stats_n = fast.quantize(x)
        codes_r, books_r, stats_r = ref.quantize(x)
        assert stats_n == stats_r
        assert torch.equal(codes_n, codes_r)
        torch.testing.assert_close(books_n, books_r, rtol=1e-6, atol=0.0)
        payload = fast.encode(x)
        assert torch.equal(fast.decode(payload, x.numel()), ref.decode(payload, x.numel()))
        a, b = torch.randn(x.numel(), generator=gen(9)), torch.randn(x.numel(), generator=gen(9))
        fast.decode_accumulate(payload, a, -0.61)
        ref.decode_accumulate(payload, b, -0.61)
        assert torch.equal(a, b)


def _edge_probes(lo: float, scale: float) -> torch.Tensor:
    """Every bucket edge of step 3 in the precision step 3 uses, and one ulp either side of it."""
    k = torch.arange(257, dtype=torch.float64)
    if fmt.float_codes(lo, scale):
        lo_f, scale_f = torch.tensor(lo, dtype=torch.float32), torch.tensor(scale, dtype=torch.float32)
        edges = lo_f + k.float() / scale_f
    else:
        edges = (lo + k / scale).float()
    return torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])


@needs_cc
@pytest.mark.parametrize("magnitude", [1.0, 1e-40])  # fp32 code arithmetic, and the double fallback
def test_bucket_boundaries_code_identically(build: native.BuildConfig, magnitude: float) -> None:
    # The probes shift the chunk's range, so iterate until they sit on the edges of the range they
    # produce (a fixed point, reached in ~10 rounds).
    base = torch.randn(1 << 16, generator=gen(12)) * magnitude
    fast, ref = pair(build, 1 << 16)
    x, used = base, None
    for _ in range(40):
        stats = ref.quantize(x)[2][0]
        if stats == used:
            break
        used = stats
        probes = _edge_probes(stats[2], stats[3])
        x = base.clone()
        x[1 : 1 + probes.numel()] = probes
    else:
        pytest.fail("edge probes did not settle")
    codes_n, codes_r = fast.quantize(x)[0], ref.quantize(x)[0]
    assert torch.equal(codes_n, codes_r)
    # The probes reach (almost) every bucket, so they really sit on edges across the whole range.
    assert len(set(codes_r[1 : 1 + probes.numel()].tolist())) > 230


# -- int8: behaviour ---------------------------------------------------------------------------------


@pytest.fixture(params=["native", "reference"])
def int8(request: pytest.FixtureRequest, build: native.BuildConfig) -> Int8Codec:
    if request.param == "native" and not HAVE_CC:
        pytest.skip("no C compiler")
    return Int8Codec(request.param, build=build)


def test_int8_gaussian_error(int8: Int8Codec) -> None:
    # 256 buckets over +-6 sigma are 0.047 sigma wide: uniform rounding error is width/sqrt(12) = 1.35%.
    x = torch.randn(1 << 20, generator=gen(13)) * 0.01
    y = int8.decode(int8.encode(x), x.numel())
    rel = ((y - x).norm() / x.norm()).item()
    assert 0.010 < rel < 0.0140, rel
    assert torch.isfinite(y).all()


def test_int8_constant_chunks_roundtrip_exactly(int8: Int8Codec) -> None:
    x = torch.cat([torch.full((1 << 18,), 0.1234567), torch.zeros(1 << 18), torch.full((5,), -3e38)])
    y = int8.decode(int8.encode(x), x.numel())
    assert torch.equal(y, x)


def test_int8_tiny_inputs_roundtrip(int8: Int8Codec) -> None:
    for values in ([0.3], [0.3, -2.0], [1.0, 1.0, 7.0], []):
        x = torch.tensor(values, dtype=torch.float32)
        payload = int8.encode(x)
        assert len(payload) == fmt.payload_size(len(values))
        # Two or three distinct values land in distinct buckets whose mean is the value itself.
        assert torch.equal(int8.decode(payload, x.numel()), x)


def test_int8_payload_size_and_overhead(int8: Int8Codec) -> None:
    n = (1 << 22) + 3
    x = torch.randn(n, generator=gen(14))
    payload = int8.encode(x)
    chunks = fmt.n_chunks(n, fmt.DEFAULT_CHUNK_SIZE)
    assert len(payload) == fmt.HEADER_SIZE + chunks * 1024 + n
    assert chunks * 1024 / len(payload) < 0.01
    assert len(payload) <= 0.26 * 4 * n


def test_int8_refuses_non_finite(int8: Int8Codec) -> None:
    x = torch.randn(3 * (1 << 18) + 11, generator=gen(15))
    for index, value, kind in (
        (0, math.inf, "1 Inf"),
        (x.numel() - 1, math.nan, "1 NaN"),
        (300_000, -math.inf, "1 Inf"),
    ):
        y = x.clone()
        y[index] = value
        with pytest.raises(CodecError, match=f"{kind}.*index {index}"):
            int8.encode(y)


def test_int8_decode_accumulate(int8: Int8Codec) -> None:
    x = torch.randn(300_007, generator=gen(16))
    payload = int8.encode(x)
    decoded = int8.decode(payload, x.numel())
    for weight in (1.0, 0.3, -2.5):
        out = torch.randn(x.numel(), generator=gen(17))
        expected = out + weight * decoded
        int8.decode_accumulate(payload, out, weight)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    before = out.clone()
    with pytest.raises(ValueError, match="float32.*1e\\+39"):  # float32(weight) would be inf
        int8.decode_accumulate(payload, out, 1e39)
    assert torch.equal(out, before)


@needs_cc
def test_decode_accumulate_backends_agree_bitwise(build: native.BuildConfig) -> None:
    fast, ref = pair(build, 1 << 12)
    x = student_t(50_001, 3, seed=18)
    payload = fast.encode(x)
    a = torch.randn(x.numel(), generator=gen(19))
    b = a.clone()
    fast.decode_accumulate(payload, a, 0.37)
    ref.decode_accumulate(payload, b, 0.37)
    assert torch.equal(a, b)


def _corruptions(payload: bytes, numel: int) -> dict[str, tuple[bytes, int]]:
    def patch(offset: int, data: bytes) -> bytes:
        return payload[:offset] + data + payload[offset + len(data) :]

    codebook = fmt.HEADER_SIZE
    return {
        "empty": (b"", numel),
        "header only": (payload[: fmt.HEADER_SIZE - 1], numel),
        "truncated codebook": (payload[: fmt.HEADER_SIZE + 100], numel),
        "truncated codes": (payload[:-1], numel),
        "extra byte": (payload + b"\0", numel),
        "wrong numel": (payload, numel - 1),
        "wrong numel 2": (payload, numel + 1),
        "bad magic": (patch(0, b"XXXX"), numel),
        "bad version": (patch(4, b"\x09"), numel),
        "reserved flags": (patch(5, b"\x01"), numel),
        "chunk not pow2": (patch(16, struct.pack("<I", 1000)), numel),
        "chunk too small": (patch(16, struct.pack("<I", 1)), numel),
        "chunk count": (patch(20, struct.pack("<I", 3)), numel),
        "header numel": (patch(8, struct.pack("<Q", 1 << 60)), numel),
        "nan codebook": (patch(codebook + 4 * 17, struct.pack("<f", math.nan)), numel),
        "inf codebook": (patch(codebook + 1024 + 4 * 255, struct.pack("<f", -math.inf)), numel),
        "garbage": (bytes(range(256)) * 40, numel),
    }


@pytest.mark.parametrize(
    "case",
    sorted(_corruptions(b"\0" * 64, 1)),  # names only; payloads are built per codec below
)
def test_int8_rejects_malformed_payloads(int8: Int8Codec, case: str) -> None:
    n = (1 << 18) + 5
    x = torch.randn(n, generator=gen(20))
    payload = int8.encode(x)
    bad, numel = _corruptions(payload, n)[case]
    with pytest.raises(CodecError):
        int8.decode(bad, numel)
    out = torch.zeros(numel)
    with pytest.raises(CodecError):
        int8.decode_accumulate(bad, out, 1.0)
    assert not out.any()  # validation happens before anything is written


def _address(buf: bytes) -> int:
    return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value or 0


@needs_cc
def test_native_entry_points_check_every_length(build: native.BuildConfig) -> None:
    # The C functions are called directly, bypassing int8_format.parse: every short or lying length,
    # header field or codebook gets its own error code, and nothing is written.
    kernels = native.load(build)
    n, chunk = 1000, 256
    x = torch.randn(n, generator=gen(26))
    payload = Int8Codec("native", chunk_size=chunk, build=build).encode(x)
    at = _address(payload)
    out = torch.full((n + 64,), 7.0)  # 64 spare values: a write past the claimed length would show
    ob = 4 * n

    def patch(offset: int, data: bytes) -> bytes:
        return payload[:offset] + data + payload[offset + len(data) :]

    def decode_both(buf: bytes, length: int, out_bytes: int = ob, threads: int = 2) -> set[int]:
        address = _address(buf)
        return {
            kernels.dequantize(address, length, out.data_ptr(), out_bytes, threads),
            kernels.decode_accumulate(address, length, 0.5, out.data_ptr(), out_bytes, threads),
        }

    huge = patch(8, struct.pack("<Q", 1 << 60))
    cases = {
        "short header": (decode_both(payload, 23), -3),
        "no payload": ({kernels.dequantize(None, 0, out.data_ptr(), ob, 1)}, -2),
        "negative length": (decode_both(payload, -1), -2),
        "odd out length": (decode_both(payload, len(payload), ob - 2), -2),
        "no threads": (decode_both(payload, len(payload), ob, 0), -2),
        "payload one byte short": (decode_both(payload, len(payload) - 1), -10),
        "out one value short": (decode_both(payload, len(payload), ob - 4), -7),
        "bad magic": (decode_both(patch(0, b"P2Q9"), len(payload)), -4),
        "bad version": (decode_both(patch(4, b"\x02"), len(payload)), -5),
        "reserved": (decode_both(patch(6, b"\x01"), len(payload)), -6),
        "chunk 0": (decode_both(patch(16, struct.pack("<I", 0)), len(payload)), -8),
        "chunk 2^31": (decode_both(patch(16, struct.pack("<I", 1 << 31)), len(payload)), -8),
        "chunk count": (decode_both(patch(20, struct.pack("<I", 5)), len(payload)), -9),
        "header numel 2^60": (decode_both(huge, len(payload)), -7),
        "lying out length": (decode_both(payload, len(payload), 1 << 62), -7),
        "nan codebook": (decode_both(patch(24 + 4 * 300, struct.pack("<f", math.nan)), len(payload)), -11),
        "inf codebook": (decode_both(patch(24 + 4 * 767, struct.pack("<f", -math.inf)), len(payload)), -11),
    }
    # A header for 2^55 values (with a consistent chunk count) and an output that claims to hold them:
    # rejected on the payload's length before anything is touched.
    claims = patch(8, struct.pack("<QII", 1 << 55, 1 << 24, 1 << 31))
    cases["huge numel, lying out"] = (decode_both(claims, len(payload), 4 << 55), -10)
    for name, (got, want) in cases.items():
        assert got == {want}, (name, got)
        assert want in fmt.NATIVE_ERRORS
    assert kernels.decode_accumulate(at, len(payload), math.nan, out.data_ptr(), ob, 1) == -2
    assert torch.equal(out, torch.full((n + 64,), 7.0))  # no call wrote anything
    # Valid calls write exactly n values, at any alignment (streaming stores need 32 bytes).
    expected = Int8Codec("reference", chunk_size=chunk).decode(payload, n)
    for shift in (0, 1, 3):
        assert kernels.dequantize(at, len(payload), out[shift:].data_ptr(), ob, 2) == 0
        assert torch.equal(out[shift : shift + n], expected) and bool((out[shift + n :] == 7.0).all())
        out.fill_(7.0)

    # Encode side: the output must be exactly the payload's size, lengths whole floats.
    buf = bytearray(len(payload))
    dst = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    assert kernels.encode(x.data_ptr(), 4 * n, chunk, dst, len(buf) - 1, 1) == -12
    assert kernels.encode(x.data_ptr(), 4 * n - 1, chunk, dst, len(buf), 1) == -2
    assert kernels.encode(x.data_ptr(), 4 * n, 100, dst, len(buf), 1) == -8
    assert kernels.encode(x.data_ptr(), 4 * n, chunk, dst, len(buf), 1) == -1
    assert bytes(buf) == payload
    codes, books = torch.empty(n, dtype=torch.uint8), torch.empty(4, 256)
    stats = torch.empty(4, 4, dtype=torch.float64)
    ptrs = (codes.data_ptr(), n, books.data_ptr(), 4096, stats.data_ptr())
    assert kernels.quantize(x.data_ptr(), 4 * n, chunk, *ptrs, 8 * 16, 1) == -1
    assert kernels.quantize(x.data_ptr(), 4 * n, chunk, *ptrs, 8 * 15, 1) == -12
    assert kernels.quantize(x.data_ptr(), 4 * n, chunk, codes.data_ptr(), n - 1, *ptrs[2:], 128, 1) == -12
    assert kernels.quantize(x.data_ptr(), 4 * n, chunk, *ptrs[:3], 4095, None, 0, 1) == -12
    with pytest.raises(CodecError, match=r"p2pq_decode refused.*bad magic \(code -4\)"):
        raise fmt.native_error(-4, "p2pq_decode")


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_tensors_requiring_grad_are_accepted(int8: Int8Codec, which: str) -> None:
    codec = get_codec("fp32") if which == "fp32" else int8
    x = torch.randn(3000, generator=gen(25)).requires_grad_()
    out = torch.zeros(3000).requires_grad_()
    payload = codec.encode(x)
    codec.decode_accumulate(payload, out, 2.0)
    torch.testing.assert_close(out.detach(), 2.0 * codec.decode(payload, 3000))


def test_int8_decode_accepts_bytes_like(int8: Int8Codec) -> None:
    x = torch.randn(1000, generator=gen(21))
    payload = int8.encode(x)
    expected = int8.decode(payload, x.numel())
    assert torch.equal(int8.decode(bytearray(payload), x.numel()), expected)
    assert torch.equal(int8.decode(memoryview(payload), x.numel()), expected)
    with pytest.raises(CodecError):
        int8.decode("not bytes", 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "which", ["fp32", "int8-native", "int8-reference", "sparse-native", "sparse-reference"]
)
def test_decode_into_writes_the_decoded_values_into_a_slice_only(
    build: native.BuildConfig, which: str
) -> None:
    name, _, backend = which.partition("-")
    if backend == "native" and not HAVE_CC:
        pytest.skip("no C compiler")
    if name == "int8":
        codec: Codec = Int8Codec(backend, build=build)
    elif name == "sparse":
        from p2p_trainer.codec.sparse import SparseCodec

        codec = SparseCodec(backend, build=dataclasses.replace(build, source=native.SPARSE_SOURCE))
    else:
        codec = get_codec("fp32")
    x = student_t(70_001, 3, seed=26)
    payload = codec.encode(x)
    buffer = torch.full((x.numel() + 20,), 7.0)
    codec.decode_into(payload, buffer[10:-10])
    assert torch.equal(buffer[10:-10], codec.decode(payload, x.numel()))  # the same bits as decode
    assert torch.equal(buffer[:10], torch.full((10,), 7.0)) and torch.equal(buffer[-10:], buffer[:10])
    codec.decode_into(bytearray(payload), buffer[10:-10])  # what a received frame is
    before = buffer.clone()
    # fp32: a NaN; the others: a bad magic
    hostile = struct.pack("<f", math.nan) if name == "fp32" else payload[:3] + b"!"
    for bad in (payload[:-1], hostile + payload[4:]):
        with pytest.raises(CodecError):
            codec.decode_into(bad, buffer[10:-10])
        assert torch.equal(buffer, before)  # untouched by a malformed payload
    with pytest.raises(CodecError):
        codec.decode_into(payload, buffer[10:-11])  # the payload holds more values than out
    with pytest.raises(TypeError, match="out must be a 1-D contiguous float32"):
        codec.decode_into(payload, torch.zeros(x.numel(), dtype=torch.float64))


# -- building, caching and falling back --------------------------------------------------------------


def test_missing_compiler_falls_back_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = native.BuildConfig(compiler=str(tmp_path / "no-such-cc"), cache_dir=tmp_path / "cache")
    x = torch.randn(5000, generator=gen(22))
    with caplog.at_level(logging.WARNING, logger="p2p_trainer.codec"):
        codec = Int8Codec("auto", chunk_size=1 << 10, build=config)
        payload = codec.encode(x)
        assert codec.backend == "reference"
        Int8Codec("auto", chunk_size=1 << 10, build=config).encode(x)  # the same failure warns only once
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "no C compiler" in message and "no-such-cc" in message and "reference" in message
    assert payload == Int8Codec("reference", chunk_size=1 << 10).encode(x)
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        Int8Codec("native", build=config).encode(x)


def test_cc_environment_variable_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "missing-compiler"))
    monkeypatch.setenv("P2P_TRAINER_CACHE_DIR", str(tmp_path))
    codec = get_codec("int8")
    with caplog.at_level(logging.WARNING, logger="p2p_trainer.codec"):
        x = torch.randn(100, generator=gen(23))
        y = codec.decode(codec.encode(x), 100)
    assert codec.backend == "reference"  # type: ignore[attr-defined]
    assert ((y - x).norm() / x.norm()) < 0.05
    assert any("missing-compiler" in r.getMessage() for r in caplog.records)


def test_broken_source_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = tmp_path / "broken.c"
    source.write_text("this is not C\n")
    config = native.BuildConfig(compiler=os.environ.get("CC") or "cc", cache_dir=tmp_path, source=source)
    with caplog.at_level(logging.WARNING, logger="p2p_trainer.codec"):
        codec = Int8Codec("auto", build=config)
        assert codec.backend == "reference"
    if HAVE_CC:
        assert any("compiling the int8 kernel failed" in r.getMessage() for r in caplog.records)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp*"))  # nothing half-built left


@needs_cc
def test_concurrent_builds_share_one_cached_library(tmp_path: Path) -> None:
    # Two processes racing to build into the same empty cache must both succeed.
    code = (
        "import sys, torch; from p2p_trainer.codec.int8 import Int8Codec; "
        "c = Int8Codec('native'); x = torch.arange(1000.0); "
        "assert c.decode(c.encode(x), 1000).sub(x).abs().max() < 12; print(c.backend)"
    )
    env = {**os.environ, "P2P_TRAINER_CACHE_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=50)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert all(o.strip() == "native" for o in outs)
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1
    assert not list((tmp_path / "kernels").glob("*.tmp*"))


def test_payload_header_layout() -> None:
    payload = Int8Codec("reference", chunk_size=1 << 10).encode(torch.randn(2500, generator=gen(24)))
    magic, version, flags, reserved, numel, chunk, chunks = struct.unpack_from("<4sBBHQII", payload)
    assert (magic, version, flags, reserved, numel, chunk, chunks) == (b"P2Q8", 1, 0, 0, 2500, 1024, 3)
    books = np.frombuffer(payload, "<f4", count=3 * 256, offset=24)
    assert np.isfinite(books).all()
