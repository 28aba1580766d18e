"""The sparse codec: the C kernel when it builds, else the torch reference, same payload bytes either way.

See ``sparse_format`` for the arithmetic and layout. What a chunk does not send is lost to this
codec; the trainer keeps it in its error-feedback buffer and adds it to the next round's input.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Literal

import torch

from p2p_trainer.codec import native
from p2p_trainer.codec import sparse_format as fmt
from p2p_trainer.codec import sparse_reference as reference
from p2p_trainer.codec.base import (
    CodecError,
    buffer_address,
    check_input,
    check_layout,
    check_out,
    check_weight,
    non_finite_message,
)

log = logging.getLogger(__name__)

Backend = Literal["auto", "native", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "native", "reference")
ABI_VERSION = 2
_ERR_ARGS, _ERR_MEMORY = -2, -3

_warned: set[native.BuildConfig] = set()
_warned_lock = threading.Lock()

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def _uninitialized_bytes(size: int) -> tuple[bytes, int]:
    """A fresh ``bytes`` for the kernel to fill (``PyBytes_FromStringAndSize(NULL, n)``), saving a copy
    of the payload; ``size`` >= the header size, so never a shared empty/one-byte singleton."""
    assert size >= fmt.HEADER_SIZE
    buf = _new_bytes(None, size)
    return buf, buffer_address(buf)


class SparseKernels:
    """Typed wrappers around ``kernels/sparse_codec.c``; pointers are raw addresses, lengths are checked
    by the kernel against the parameters."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        lib.p2ps_abi_version.restype = i32
        lib.p2ps_abi_version.argtypes = []
        lib.p2ps_encode.restype = i64
        lib.p2ps_encode.argtypes = [vp, i64, i64, i64, i32, vp, i64, i32]
        lib.p2ps_decode.restype = i64
        lib.p2ps_decode.argtypes = [vp, i64, i64, i64, i64, i32, vp, i64, f32, i32, i32]
        got = lib.p2ps_abi_version()
        if got != ABI_VERSION:
            raise native.NativeUnavailable(f"{path} has ABI version {got}, expected {ABI_VERSION}")
        self._lib = lib

    def encode(self, x: int, n: int, p: fmt.SparseParams, payload: int, size: int, threads: int) -> int:
        """Fills ``payload`` after its header; -1 on success, else the first chunk holding NaN/Inf."""
        rc = self._lib.p2ps_encode(x, n, p.chunk_size, p.k, p.value_bits, payload, size, threads)
        _raise_on(rc, "p2ps_encode", n, p)
        return int(rc)

    def decode(
        self,
        payload: int,
        size: int,
        n: int,
        p: fmt.SparseParams,
        out: int,
        weight: float,
        accumulate: bool,
        threads: int,
    ) -> int:
        """-1 on success, else the first invalid chunk (then ``out`` is untouched)."""
        rc = self._lib.p2ps_decode(
            payload, size, n, p.chunk_size, p.k, p.value_bits, out, n, weight, int(accumulate), threads
        )
        _raise_on(rc, "p2ps_decode", n, p)
        return int(rc)


def _raise_on(rc: int, fn: str, n: int, p: fmt.SparseParams) -> None:
    if rc == _ERR_MEMORY:
        raise MemoryError(f"{fn}: no memory for its per-thread scratch (chunk_size={p.chunk_size})")
    if rc < -1:
        raise ValueError(f"{fn} rejected its arguments (n={n}, {p})")


def default_threads() -> int:
    # torch's intra-op thread count is the process's stated CPU budget (1 if the user pinned it so).
    return max(1, torch.get_num_threads())


class SparseCodec:
    """Top-k per chunk, low-bit values, compact indices; see ``sparse_format``.

    ``chunk_size`` (default 4096, a power of two in [64, 65536]): values per chunk;
    ``k`` (default 224): entries sent per chunk, at most ``chunk_size / 2``;
    ``value_bits`` (default 4, in [1, 8]): bits per sent value, one of them the sign.
    ``backend`` is ``"native"`` (the C kernel; ``NativeUnavailable`` on first use if it cannot be
    built), ``"reference"`` (pure torch) or ``"auto"`` (native, else the reference after one warning).
    Decoding accepts any valid parameters found in a payload's header, not only this codec's.
    """

    name = "sparse"

    def __init__(
        self,
        backend: Backend | str = "auto",
        *,
        chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
        k: int = fmt.DEFAULT_K,
        value_bits: int = fmt.DEFAULT_VALUE_BITS,
        threads: int | None = None,
        build: native.BuildConfig | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown sparse backend {backend!r}; choices: {', '.join(BACKENDS)}")
        self.params = fmt.SparseParams(chunk_size, k, value_bits)
        self.requested_backend = backend
        self.threads = threads
        self._build = build
        self._resolved = False
        self._kernels: SparseKernels | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_params(
        cls, params: fmt.SparseParams, backend: Backend | str = "auto", threads: int | None = None
    ) -> SparseCodec:
        return cls(
            backend, chunk_size=params.chunk_size, k=params.k, value_bits=params.value_bits, threads=threads
        )

    @property
    def backend(self) -> str:
        """The backend actually in use, ``"native"`` or ``"reference"`` (may build the kernel)."""
        return "native" if self._native() is not None else "reference"

    def payload_size(self, numel: int) -> int:
        return fmt.payload_size(numel, self.params)

    def _native(self) -> SparseKernels | None:
        if self._resolved:
            return self._kernels
        with self._lock:
            if not self._resolved:
                self._kernels = self._resolve()
                self._resolved = True
        return self._kernels

    def _resolve(self) -> SparseKernels | None:
        if self.requested_backend == "reference":
            return None
        config = self._build or native.BuildConfig.from_env(native.SPARSE_SOURCE)
        try:
            return native.load_library(config, SparseKernels, "sparse")
        except native.NativeUnavailable as e:
            if self.requested_backend == "native":
                raise
            with _warned_lock:
                first = config not in _warned
                _warned.add(config)
            if first:
                reason = str(e).splitlines()[0]
                log.warning("sparse codec: %s, using the pure-torch reference (slower)", reason)
            return None

    def _threads(self) -> int:
        return self.threads if self.threads is not None else default_threads()

    def encode(self, x: torch.Tensor) -> bytes:
        check_layout(x, "input")
        kernels = self._native()
        if kernels is None:
            check_input(x)
            return reference.encode(x.detach(), self.params)
        n = x.numel()
        size = fmt.payload_size(n, self.params)
        payload, address = _uninitialized_bytes(size)
        ctypes.memmove(address, fmt.pack_header(n, self.params), fmt.HEADER_SIZE)
        if kernels.encode(x.data_ptr(), n, self.params, address, size, self._threads()) >= 0:
            raise CodecError(non_finite_message(x))
        return payload

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        parsed = fmt.parse(payload, numel)
        kernels = self._native()
        if kernels is None:
            return reference.decode(parsed)
        out = torch.empty(numel, dtype=torch.float32)
        self._run_decode(kernels, parsed, out, 1.0, accumulate=False)
        return out

    def decode_into(self, payload: bytes, out: torch.Tensor) -> None:
        check_out(out)
        parsed = fmt.parse(payload, out.numel())
        kernels = self._native()
        if kernels is None:
            out.detach().copy_(reference.decode(parsed))
            return
        self._run_decode(kernels, parsed, out, 1.0, accumulate=False)

    def decode_accumulate(self, payload: bytes, out: torch.Tensor, weight: float) -> None:
        check_out(out)
        w = check_weight(weight)
        parsed = fmt.parse(payload, out.numel())
        kernels = self._native()
        if kernels is None:
            reference.decode_accumulate(parsed, out.detach(), w)
            return
        self._run_decode(kernels, parsed, out, w, accumulate=True)

    def _run_decode(
        self, kernels: SparseKernels, parsed: fmt.Parsed, out: torch.Tensor, w: float, accumulate: bool
    ) -> None:
        lay = parsed.layout
        bad = kernels.decode(
            buffer_address(parsed.payload),
            lay.size,
            lay.numel,
            parsed.params,
            out.data_ptr(),
            w,
            accumulate,
            self._threads(),
        )
        if bad >= 0:
            # The kernel only says which chunk; the format module says what is wrong with it.
            fmt.unpack_slots(parsed)
            raise CodecError(f"sparse payload chunk {bad} is malformed")
