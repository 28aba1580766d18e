"""The int8 codec's exact arithmetic and wire format, shared by the C kernel and the torch reference.

Arithmetic (both implementations follow it operation by operation, so the codes agree bit for bit):

Per chunk of ``n`` values ``x`` (``1 <= n <= chunk_size``; only the last chunk is short):

1. Statistics, shifted by the first value so that a constant chunk gives exactly ``std == 0`` and the
   single pass stays accurate (``|x0 - mean| <= sqrt(n) * std``, so at most ~5 digits are lost):
   ``x0 = double(x[0])``, ``d[i] = double(x[i]) - x0``, ``q[i] = d[i] * d[i]`` (no FMA anywhere),
   zero-padded to ``P = BLOCK * next_pow2(ceil(n / BLOCK))`` entries. ``S(v)`` is a fixed tree: view ``v``
   as rows of ``BLOCK`` values, fold each row in halves (``r[j] += r[j + h]`` for ``h = BLOCK/2 .. 1``),
   then add adjacent row sums pairwise (``s[k] = s[2k] + s[2k+1]``) until one value is left.
   ``m1 = S(d) / n``, ``mean = x0 + m1``, ``var = S(q) / n - m1 * m1`` (``var = 0`` if not ``> 0``),
   ``std = sqrt(var)``.
2. Range: ``lo = mean - 6 * std``, ``scale = 256 / (12 * std)``. A constant chunk (``std == 0``) uses
   ``lo = x0``, ``scale = 0``, which puts every value in bucket 0.
3. Code: if ``float_codes(lo, scale)`` (``2^-100 <= scale <= 2^100`` and ``|lo| <= 2^100``, the usual
   case), ``t = (x - float(lo)) * float(scale)`` in fp32, else ``t = (double(x) - lo) * scale`` in
   double; ``t`` is clamped to ``[0, 255]`` and truncated to ``uint8``. fp32 doubles the SIMD width and
   its rounding (about one fp32 ulp of ``x`` and ``lo``) is no coarser than the fp32 data itself; the
   double branch keeps tiny (subnormal) or near-overflow chunks away from the fp32 limits.
4. Codebook (fp32): bucket ``k`` holding values gets ``float(sum / count)`` with the sum taken in double
   (summation order is free, so the two implementations agree to ~1 ulp, not bit for bit); an empty
   bucket gets its midpoint ``lo + (k + 0.5) / scale`` clamped to the fp32 range; a constant chunk gets
   ``float(x0)`` in all 256 entries, so it round-trips exactly.

Payload (little endian): a 24-byte header, then ``n_chunks`` codebooks of 256 fp32, then ``numel`` codes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from p2p_trainer.codec.base import CodecError, as_buffer

MAGIC = b"P2Q8"
VERSION = 1
N_BUCKETS = 256
SIGMAS = 6.0
BLOCK = 64
DEFAULT_CHUNK_SIZE = 1 << 18  # 1 KiB codebook per 256 KiB of codes: 0.4% overhead
MIN_CHUNK_SIZE = BLOCK
MAX_CHUNK_SIZE = 1 << 24
FLT_MAX = float(np.finfo(np.float32).max)

# magic, version, flags (must be 0), reserved u16 (must be 0), numel u64, chunk_size u32, n_chunks u32
_HEADER = struct.Struct("<4sBBHQII")
HEADER_SIZE = _HEADER.size
CODEBOOK_BYTES = 4 * N_BUCKETS
_LE_F32 = np.dtype("<f4")
_FLOAT_CODES_MIN = 2.0**-100
_FLOAT_CODES_MAX = 2.0**100


# Error codes of the C entry points (kernels/int8_codec.c, enum P2PQ_E*). The kernel repeats parse()'s
# checks against the byte lengths it is given, so that it never trusts its caller's arithmetic.
NATIVE_ERRORS = {
    -2: "invalid arguments (null pointer, length < 0 or not whole floats, threads < 1, non-finite weight)",
    -3: f"payload shorter than its {HEADER_SIZE}-byte header",
    -4: "bad magic",
    -5: "unsupported format version",
    -6: "non-zero reserved header fields",
    -7: "header numel differs from the output's size",
    -8: f"chunk size is not a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]",
    -9: "header chunk count differs from ceil(numel / chunk size)",
    -10: "payload length differs from the size its header implies",
    -11: "codebook holds NaN or Inf",
    -12: "an output buffer's length does not match the input",
}


def native_error(code: int, call: str) -> CodecError:
    """The CodecError for a C entry point's error ``code`` (< -1)."""
    return CodecError(f"{call} refused its buffers: {NATIVE_ERRORS.get(code, 'unknown error')} (code {code})")


def check_chunk_size(chunk_size: int) -> int:
    if (
        not isinstance(chunk_size, int)
        or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise ValueError(
            f"chunk_size must be a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {chunk_size!r}"
        )
    return chunk_size


def n_chunks(numel: int, chunk_size: int) -> int:
    return -(-numel // chunk_size)


def payload_size(numel: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    return HEADER_SIZE + CODEBOOK_BYTES * n_chunks(numel, chunk_size) + numel


def pack_header(numel: int, chunk_size: int) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, 0, 0, numel, chunk_size, n_chunks(numel, chunk_size))


def range_of(mean: float, std: float, x0: float) -> tuple[float, float]:
    """``(lo, scale)`` of step 2; plain Python floats are IEEE doubles, like the C kernel's."""
    if std == 0.0:
        return x0, 0.0
    return mean - SIGMAS * std, 256.0 / (2.0 * SIGMAS * std)


def float_codes(lo: float, scale: float) -> bool:
    """Step 3's choice of precision; the kernel evaluates the same comparisons on the same doubles."""
    return _FLOAT_CODES_MIN <= scale <= _FLOAT_CODES_MAX and abs(lo) <= _FLOAT_CODES_MAX


def stats_from_sums(s1: float, s2: float, n: int, x0: float) -> tuple[float, float]:
    """``(mean, std)`` of step 1 from the two tree sums."""
    m1 = s1 / n
    mean = x0 + m1
    var = s2 / n - m1 * m1
    if not var > 0.0:
        var = 0.0
    return mean, math.sqrt(var)


@dataclass(frozen=True)
class Parsed:
    numel: int
    chunk_size: int
    n_chunks: int
    codebooks: np.ndarray  # (n_chunks, 256) little-endian fp32, a view into the payload
    codes_offset: int
    payload: bytes | memoryview


def parse(payload: bytes | bytearray | memoryview, numel: int) -> Parsed:
    """Validate an untrusted payload completely before anything reads its codes."""
    payload = as_buffer(payload)
    if not isinstance(numel, int) or numel < 0:
        raise CodecError(f"numel must be a non-negative int, got {numel!r}")
    if len(payload) < HEADER_SIZE:
        raise CodecError(f"int8 payload truncated: {len(payload)} bytes, header alone is {HEADER_SIZE}")
    magic, version, flags, reserved, h_numel, chunk_size, h_chunks = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"int8 payload has bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"int8 payload version {version} is not supported (expected {VERSION})")
    if flags or reserved:
        raise CodecError(f"int8 payload has non-zero reserved header fields ({flags}, {reserved})")
    if h_numel != numel:
        raise CodecError(f"int8 payload holds {h_numel} values, expected {numel}")
    try:
        check_chunk_size(chunk_size)
    except ValueError as e:
        raise CodecError(f"int8 payload header: {e}") from None
    if h_chunks != n_chunks(numel, chunk_size):
        raise CodecError(
            f"int8 payload header says {h_chunks} chunks, but {numel} values in chunks of {chunk_size} "
            f"need {n_chunks(numel, chunk_size)}"
        )
    expected = payload_size(numel, chunk_size)
    if len(payload) != expected:
        raise CodecError(f"int8 payload has {len(payload)} bytes, expected exactly {expected}")
    codebooks = np.frombuffer(payload, dtype=_LE_F32, count=h_chunks * N_BUCKETS, offset=HEADER_SIZE)
    if not np.isfinite(codebooks).all():
        bad = int(np.flatnonzero(~np.isfinite(codebooks))[0])
        raise CodecError(
            "int8 payload codebook holds non-finite values "
            f"(chunk {bad // N_BUCKETS}, bucket {bad % N_BUCKETS})"
        )
    return Parsed(
        numel=numel,
        chunk_size=chunk_size,
        n_chunks=h_chunks,
        codebooks=codebooks.reshape(h_chunks, N_BUCKETS),
        codes_offset=HEADER_SIZE + h_chunks * CODEBOOK_BYTES,
        payload=payload,
    )
