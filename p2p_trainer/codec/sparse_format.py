"""The sparse codec's exact arithmetic and wire format, shared by the C kernel and the torch reference.

A SparseLoCo-style codec (Templar, arXiv 2508.15706): per chunk, only the ``k`` entries of largest
magnitude are sent, each as its index in the chunk and a ``value_bits``-bit code; what is not sent
is the caller's to keep (the trainer's error-feedback buffer). Encoding is a pure function of the
input bits, so the kernel and the reference produce the same bytes, and decoding is a table lookup,
so every replica decodes a payload to the same bits.

Arithmetic, per chunk of ``n`` values ``x`` (``chunk_size`` of them; only the last chunk may be
shorter) with ``kc = min(k, n)`` slots:

1. Selection. ``key[i]`` is the bit pattern of ``x[i]`` with the sign bit cleared (as uint32: for
   non-negative floats integer order is magnitude order, subnormals included, and no floating point
   mode can change it). The kept entries are the ``kc`` largest by ``(key desc, index asc)`` -- ties go
   to the lower index -- minus those with ``key == 0`` (zeros are never sent: they decode to zero
   anyway, and a zero in a magnitude bucket would bias its level). ``m <= kc`` entries remain, taken
   in increasing index order.
2. Magnitudes ``a[j] = double(|x[idx[j]]|)`` (exact); ``lo = min a``, ``hi = max a`` (``0, 0`` if
   ``m == 0``). With ``L = 2^(value_bits - 1)`` magnitude buckets: if ``hi > lo``,
   ``scale = double(L) / (hi - lo)``, ``t = (a - lo) * scale`` and ``q = L - 1 if t >= L - 1 else
   trunc(t)``; else ``q = 0``. All IEEE double, no fused multiply-add.
3. Levels (fp32, one table of ``L`` per chunk): bucket ``j`` holding entries gets
   ``float(s / count)`` where ``s`` sums its ``a`` sequentially in index order in double, starting at
   ``+0.0``; an empty bucket gets ``float(lo + ((hi - lo) * (j + 0.5)) / L)``. So a chunk whose kept
   magnitudes are all equal round-trips exactly, and every level is finite and ``>= 0``.
4. Code: ``code = sign | q << 1`` (``sign`` = the sign bit of ``x[idx]``).
5. Indices, Elias-Fano: with ``low_bits = floor(log2(n / kc))``, each index splits into its low
   ``low_bits`` bits and its high part ``idx >> low_bits``. Kept entry ``j`` (in index order) is the
   slot ``low | code << low_bits`` (``slot_bits = low_bits + value_bits`` bits) and a one at bit
   ``(idx >> low_bits) + j`` of the chunk's high bitmap of ``((n - 1) >> low_bits) + 1 + kc`` bits.
   Slots ``m .. kc-1`` are all-zero padding. Naming a position costs ``low_bits + 2`` bits or less
   (about 6.1 at 4096 / 224), against ``log2(n)`` for a plain index (12).

Decoding: entry ``j``'s index is ``(p_j - j) << low_bits | low_j`` where ``p_j`` is the position of
the ``j``-th one of the bitmap; ``out[chunk_start + idx] = -level[q]`` if ``sign`` else ``level[q]``,
every other entry ``+0.0``; ``decode_accumulate`` adds ``float32(weight) * (+-level[q])`` (one fp32
product, one fp32 add, one write per kept position, so the order of positions does not matter).

Payload (little endian), sections in this order:

- a 32-byte header: magic ``P2SP``, version u8 (2), value_bits u8, reserved u16 (0), numel u64,
  chunk_size u32, k u32, n_chunks u32, reserved u32 (0);
- levels: ``n_chunks`` tables of ``L`` fp32 (finite, ``>= 0``);
- counts: ``n_chunks`` u16, the ``m`` of each chunk (``<= kc``);
- blocks: one per chunk, read as a little-endian bit string (bit ``p`` is bit ``p % 8`` of byte
  ``p // 8``): the ``kc`` slots (slot ``s`` at bits ``[s * slot_bits, (s + 1) * slot_bits)``), then
  the high bitmap, then zero bits up to the byte boundary. A block's size depends only on ``n`` and
  ``kc``, so chunks can be written and read in parallel. Padding slots and the bits after the bitmap
  are zero, the bitmap holds exactly ``m`` ones, and the ``m`` indices of a chunk are strictly
  increasing and below its length. A payload breaking any of these rules is refused.

Defaults: chunks of 4096 values, ``k = 224`` (5.5%), 4-bit values (the sign and one of 8
magnitude levels). A full chunk costs 32 bytes of levels, 2 of count and 224 x 8 bits of slots plus
a 480-bit bitmap (284 bytes): 318 bytes for 16 KiB of fp32, 51.5x smaller (0.62 bits per value).
Both were chosen by paired runs at the outer setting that suits the codec (no momentum, a large
outer lr; bench/notes/paired.md): for about the same bytes, k 224 at 4 bits beat k 272 at 3, 320 at
2 and 384 at 1, and 224 is the most 4-bit entries that keep a 4-peer round 50x below fp32 with some
margin. Version 1 named each position with a plain 12-bit index and fitted only 160 two-bit entries
in about the same bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from p2p_trainer.codec.base import CodecError, as_buffer

MAGIC = b"P2SP"
VERSION = 2
DEFAULT_CHUNK_SIZE = 4096
DEFAULT_K = 224
DEFAULT_VALUE_BITS = 4
MIN_CHUNK_SIZE = 64
MAX_CHUNK_SIZE = 1 << 16  # indices fit 16 bits and counts (<= chunk / 2) a u16
MAX_VALUE_BITS = 8
MAX_NUMEL = 1 << 40  # the kernel refuses larger tensors; far above any slice

# magic, version, value_bits, reserved u16, numel u64, chunk_size u32, k u32, n_chunks u32, reserved u32
_HEADER = struct.Struct("<4sBBHQIIII")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 32
_LE_F32 = np.dtype("<f4")
_LE_U16 = np.dtype("<u2")
# unpacking the slot bits takes ~40 bytes of temporaries per payload byte: bound it per step
_GROUP_BYTES = 1 << 16


@dataclass(frozen=True)
class SparseParams:
    """The codec's three knobs; every peer of a run should use the same (decoders accept any valid)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    k: int = DEFAULT_K
    value_bits: int = DEFAULT_VALUE_BITS

    def __post_init__(self) -> None:
        c = self.chunk_size
        if type(c) is not int or not MIN_CHUNK_SIZE <= c <= MAX_CHUNK_SIZE or c & (c - 1):
            raise ValueError(
                f"sparse chunk_size must be a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {c!r}"
            )
        if type(self.k) is not int or not 1 <= self.k <= c // 2:
            raise ValueError(f"sparse k must be an int in [1, chunk_size / 2 = {c // 2}], got {self.k!r}")
        if type(self.value_bits) is not int or not 1 <= self.value_bits <= MAX_VALUE_BITS:
            raise ValueError(
                f"sparse value_bits must be an int in [1, {MAX_VALUE_BITS}], got {self.value_bits!r}"
            )

    @property
    def n_levels(self) -> int:
        return 1 << (self.value_bits - 1)

    @property
    def density(self) -> float:
        return self.k / self.chunk_size


def low_bits(n: int, kc: int) -> int:
    """Elias-Fano's split for ``kc`` indices below ``n``: ``floor(log2(n / kc))`` low bits each."""
    return (n // kc).bit_length() - 1


@dataclass(frozen=True)
class Block:
    """The bit layout of one chunk's block: a pure function of the chunk's length and slot count."""

    n: int  # values in the chunk
    kc: int  # slots
    low_bits: int
    slot_bits: int
    bitmap_bits: int
    size: int  # bytes

    @classmethod
    def of(cls, n: int, kc: int, value_bits: int) -> Block:
        low = low_bits(n, kc)
        bitmap = ((n - 1) >> low) + 1 + kc
        slot = low + value_bits
        return cls(n, kc, low, slot, bitmap, -(-(kc * slot + bitmap) // 8))


@dataclass(frozen=True)
class Layout:
    """Where each section of a payload for ``numel`` values lies; a pure function of numel and params."""

    numel: int
    params: SparseParams
    n_chunks: int
    block: Block  # every chunk's but the last
    last_block: Block | None  # None when numel == 0
    levels_offset: int
    counts_offset: int
    slots_offset: int
    size: int

    @property
    def last_n(self) -> int:
        """Values in the last chunk (0 when numel == 0)."""
        return self.last_block.n if self.last_block else 0

    @property
    def last_k(self) -> int:
        """Slots of the last chunk."""
        return self.last_block.kc if self.last_block else 0

    def chunk_k(self, c: int) -> int:
        return self.block_of(c).kc

    def block_of(self, c: int) -> Block:
        return self.last_block if c == self.n_chunks - 1 and self.last_block else self.block

    def block_offset(self, c: int) -> int:
        return self.slots_offset + c * self.block.size


def layout(numel: int, params: SparseParams) -> Layout:
    if type(numel) is not int or not 0 <= numel <= MAX_NUMEL:
        raise ValueError(f"numel must be an int in [0, {MAX_NUMEL}], got {numel!r}")
    chunks = -(-numel // params.chunk_size)
    last_n = numel - (chunks - 1) * params.chunk_size if chunks else 0
    block = Block.of(params.chunk_size, params.k, params.value_bits)
    last_block = Block.of(last_n, min(params.k, last_n), params.value_bits) if chunks else None
    levels_at = HEADER_SIZE
    counts_at = levels_at + 4 * params.n_levels * chunks
    slots_at = counts_at + 2 * chunks
    size = slots_at + (block.size * (chunks - 1) + last_block.size if last_block else 0)
    return Layout(numel, params, chunks, block, last_block, levels_at, counts_at, slots_at, size)


def payload_size(numel: int, params: SparseParams | None = None) -> int:
    return layout(numel, params or SparseParams()).size


def pack_header(numel: int, params: SparseParams) -> bytes:
    chunks = -(-numel // params.chunk_size)
    return _HEADER.pack(MAGIC, VERSION, params.value_bits, 0, numel, params.chunk_size, params.k, chunks, 0)


@dataclass(frozen=True)
class Parsed:
    """A payload whose header, length, levels and counts are valid (slots: see ``unpack_slots``)."""

    layout: Layout
    levels: np.ndarray  # (n_chunks, L) little-endian fp32, a view into the payload
    counts: np.ndarray  # (n_chunks,) int64
    payload: bytes | memoryview

    @property
    def params(self) -> SparseParams:
        return self.layout.params


def parse(payload: bytes | bytearray | memoryview, numel: int) -> Parsed:
    """Check everything but the slot bits of an untrusted payload, in O(n_chunks), reading nothing
    beyond what the header and the length already proved to be there."""
    payload = as_buffer(payload)
    if type(numel) is not int or not 0 <= numel <= MAX_NUMEL:
        raise CodecError(f"numel must be an int in [0, {MAX_NUMEL}], got {numel!r}")
    if len(payload) < HEADER_SIZE:
        raise CodecError(f"sparse payload truncated: {len(payload)} bytes, header alone is {HEADER_SIZE}")
    magic, version, bits, reserved, h_numel, chunk_size, k, h_chunks, reserved2 = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"sparse payload has bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"sparse payload version {version} is not supported (expected {VERSION})")
    if reserved or reserved2:
        raise CodecError(f"sparse payload has non-zero reserved header fields ({reserved}, {reserved2})")
    if h_numel != numel:
        raise CodecError(f"sparse payload holds {h_numel} values, expected {numel}")
    try:
        params = SparseParams(chunk_size, k, bits)
    except ValueError as e:
        raise CodecError(f"sparse payload header: {e}") from None
    lay = layout(numel, params)
    if h_chunks != lay.n_chunks:
        raise CodecError(
            f"sparse payload header says {h_chunks} chunks, but {numel} values in chunks of {chunk_size} "
            f"need {lay.n_chunks}"
        )
    if len(payload) != lay.size:
        raise CodecError(f"sparse payload has {len(payload)} bytes, expected exactly {lay.size}")
    levels = np.frombuffer(payload, _LE_F32, count=lay.n_chunks * params.n_levels, offset=lay.levels_offset)
    # `>= 0` is False for NaN, so one test covers NaN, -Inf and negatives; +Inf is the other
    bad = ~(np.isfinite(levels) & (levels >= 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CodecError(
            f"sparse payload level {i % params.n_levels} of chunk {i // params.n_levels} is "
            f"{float(levels[i])!r}; levels must be finite and >= 0"
        )
    counts = np.frombuffer(payload, _LE_U16, count=lay.n_chunks, offset=lay.counts_offset).astype(np.int64)
    if lay.n_chunks:
        limit = np.full(lay.n_chunks, params.k, dtype=np.int64)
        limit[-1] = lay.last_k
        over = counts > limit
        if over.any():
            c = int(np.flatnonzero(over)[0])
            raise CodecError(
                f"sparse payload chunk {c} claims {int(counts[c])} entries, at most {int(limit[c])}"
            )
    return Parsed(lay, levels.reshape(lay.n_chunks, params.n_levels), counts, payload)


@dataclass(frozen=True)
class Slots:
    """The decoded slots of some consecutive chunks: the kept entries, as flat arrays."""

    positions: np.ndarray  # int64, index into the whole tensor, increasing
    signs: np.ndarray  # bool, True = negative
    levels: np.ndarray  # float32, the magnitude each entry decodes to


def _unpack_slots(bits: np.ndarray, kc: int, slot_bits: int) -> np.ndarray:
    """(rows, kc) slot values from the first ``kc * slot_bits`` bits of each row."""
    rows = bits.shape[0]
    # regroup each slot's bits into a zero-padded little-endian u32
    padded = np.zeros((rows, kc, 32), dtype=np.uint8)
    padded[:, :, :slot_bits] = bits[:, : kc * slot_bits].reshape(rows, kc, slot_bits)
    return np.packbits(padded, axis=2, bitorder="little").view("<u4")[:, :, 0].astype(np.int64)


def _decode_blocks(
    blob: np.ndarray, rows: int, b: Block, counts: np.ndarray, first: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check ``rows`` consecutive blocks of layout ``b`` and return their kept entries as flat arrays,
    row by row in index order: the row, the index in the chunk and the code of each."""
    bits = np.unpackbits(blob.reshape(rows, -1), axis=1, bitorder="little")
    slot_end = b.kc * b.slot_bits
    end = slot_end + b.bitmap_bits

    def refuse(bad_rows: np.ndarray, what: str) -> None:
        if bad_rows.any():
            raise CodecError(f"sparse payload chunk {first + int(np.flatnonzero(bad_rows)[0])} {what}")

    refuse(bits[:, end:].any(axis=1), "has non-zero padding bits after its bitmap")
    slots = _unpack_slots(bits, b.kc, b.slot_bits)
    used = np.arange(b.kc)[None, :] < counts[:, None]
    refuse(((slots != 0) & ~used).any(axis=1), "has non-zero padding slots")
    bitmap = bits[:, slot_end:end]
    refuse(np.count_nonzero(bitmap, axis=1) != counts, "has a high bitmap whose ones do not match its count")
    row, at = np.nonzero(bitmap)  # row-major: each row's ones in increasing position
    j = np.arange(row.size) - (np.cumsum(counts) - counts)[row]  # which entry of its row each one is
    slot = slots[row, j]
    index = (at - j) << b.low_bits | (slot & ((1 << b.low_bits) - 1))
    refuse(np.bincount(row[index >= b.n], minlength=rows) > 0, f"has an index past its {b.n} values")
    same_row = row[1:] == row[:-1]
    repeated = row[1:][same_row & (index[1:] <= index[:-1])]
    refuse(np.bincount(repeated, minlength=rows) > 0, "has indices that are not strictly increasing")
    return row, index, slot >> b.low_bits


def unpack_slots(parsed: Parsed) -> Slots:
    """Validate the blocks of every chunk and return the kept entries (pure numpy, bounded memory)."""
    lay, p = parsed.layout, parsed.params
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    full = lay.n_chunks - 1 if lay.n_chunks else 0  # the last chunk goes alone: its k and length differ
    step = max(1, _GROUP_BYTES // lay.block.size)
    groups = [(c, min(full, c + step), lay.block) for c in range(0, full, step)]
    if lay.last_block:
        groups.append((full, full + 1, lay.last_block))
    for first, last, b in groups:
        rows = last - first
        blob = np.frombuffer(parsed.payload, np.uint8, count=rows * b.size, offset=lay.block_offset(first))
        row, index, code = _decode_blocks(blob, rows, b, parsed.counts[first:last], first)
        chunk = first + row
        levels = parsed.levels[first:last].astype(np.float32)
        parts.append((chunk * p.chunk_size + index, (code & 1).astype(bool), levels[row, code >> 1]))
    if not parts:
        return Slots(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.float32))
    return Slots(*(np.concatenate(column) for column in zip(*parts, strict=True)))


def validate(payload: bytes | bytearray | memoryview, numel: int) -> Parsed:
    """The complete check of an untrusted payload in pure numpy: ``parse`` plus every slot."""
    parsed = parse(payload, numel)
    unpack_slots(parsed)
    return parsed


def bits_per_value(numel: int, params: SparseParams | None = None) -> float:
    """Payload bits per input value (fp32 is 32)."""
    return 8 * payload_size(numel, params) / numel if numel else math.inf
