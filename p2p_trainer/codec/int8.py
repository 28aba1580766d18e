"""The int8 codec: the C kernel when it builds, else the torch reference, same payload either way."""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
from typing import Literal

import numpy as np
import torch

from p2p_trainer.codec import int8_format as fmt
from p2p_trainer.codec import native, reference
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

_warned: set[native.BuildConfig] = set()
_warned_lock = threading.Lock()

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def _uninitialized_bytes(size: int) -> tuple[bytes, int]:
    """A fresh ``bytes`` of ``size`` and the address of its buffer, for the kernel to fill.

    This is the C-API idiom ``PyBytes_FromStringAndSize(NULL, n)``: the object is filled before any
    other code sees it, which saves copying the whole payload once more (about a quarter of the
    encode time otherwise). ``size`` is always >= the header size, so this is never a shared singleton.
    """
    assert size >= fmt.HEADER_SIZE
    buf = _new_bytes(None, size)
    return buf, buffer_address(buf)


def default_threads() -> int:
    # torch's intra-op thread count is the process's stated CPU budget (1 if the user pinned it so).
    return max(1, torch.get_num_threads())


class Int8Codec:
    """INTELLECT-1 style 8-bit codec; see ``int8_format`` for the arithmetic and payload layout."""

    name = "int8"

    def __init__(
        self,
        backend: Backend | str = "auto",
        *,
        chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
        threads: int | None = None,
        build: native.BuildConfig | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown int8 backend {backend!r}; choices: {', '.join(BACKENDS)}")
        self.requested_backend = backend
        self.chunk_size = fmt.check_chunk_size(chunk_size)
        self.threads = threads
        self._build = build
        self._resolved = False
        self._kernels: native.NativeKernels | None = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        """The backend actually in use, ``"native"`` or ``"reference"`` (may build the kernel)."""
        return "native" if self._native() is not None else "reference"

    def _native(self) -> native.NativeKernels | None:
        if self._resolved:
            return self._kernels
        with self._lock:
            if not self._resolved:
                self._kernels = self._resolve()
                self._resolved = True
        return self._kernels

    def _resolve(self) -> native.NativeKernels | None:
        if self.requested_backend == "reference":
            return None
        config = self._build or native.BuildConfig.from_env()
        try:
            return native.load(config)
        except native.NativeUnavailable as e:
            if self.requested_backend == "native":
                raise
            with _warned_lock:
                first = config not in _warned
                _warned.add(config)
            if first:
                reason = str(e).splitlines()[0]
                log.warning("int8 codec: %s, using the pure-torch reference (slower)", reason)
            return None

    def _threads(self) -> int:
        return self.threads if self.threads is not None else default_threads()

    # -- encode ------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> bytes:
        check_layout(x, "input")
        kernels = self._native()
        if kernels is None:
            check_input(x)
            codes, codebooks, _ = reference.quantize(x.detach(), self.chunk_size)
            return b"".join(
                (
                    fmt.pack_header(x.numel(), self.chunk_size),
                    codebooks.numpy().astype("<f4", copy=False).tobytes(),
                    codes.numpy().tobytes(),
                )
            )
        n = x.numel()
        size = fmt.payload_size(n, self.chunk_size)
        payload, address = _uninitialized_bytes(size)
        # The kernel writes header, codebooks and codes, checking that they fill exactly `size` bytes.
        rc = kernels.encode(x.data_ptr(), 4 * n, self.chunk_size, address, size, self._threads())
        _check_rc(rc, x, "p2pq_encode")
        return payload

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[float, ...]]]:
        """Codes, codebooks (n_chunks x 256) and per-chunk ``(mean, std, lo, scale)``, for tests and tools."""
        check_input(x)
        kernels = self._native()
        if kernels is None:
            return reference.quantize(x.detach(), self.chunk_size)
        n = x.numel()
        codes = torch.empty(n, dtype=torch.uint8)
        codebooks = torch.empty(fmt.n_chunks(n, self.chunk_size), fmt.N_BUCKETS, dtype=torch.float32)
        stats = torch.empty(codebooks.shape[0], 4, dtype=torch.float64)
        rc = kernels.quantize(
            x.data_ptr(),
            4 * n,
            self.chunk_size,
            codes.data_ptr(),
            n,
            codebooks.data_ptr(),
            4 * codebooks.numel(),
            stats.data_ptr() if stats.numel() else None,
            8 * stats.numel(),
            self._threads(),
        )
        _check_rc(rc, x, "p2pq_quantize")
        return codes, codebooks, [tuple(row) for row in stats.tolist()]

    # -- decode ------------------------------------------------------------------------------------

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        parsed = fmt.parse(payload, numel)
        kernels = self._native()
        if kernels is None:
            codes, codebooks = _reference_inputs(parsed)
            return reference.dequantize(codes, codebooks, parsed.chunk_size)
        out = torch.empty(numel, dtype=torch.float32)
        payload = parsed.payload
        address = buffer_address(payload)
        rc = kernels.dequantize(address, len(payload), out.data_ptr(), 4 * numel, self._threads())
        if rc != 0:
            raise fmt.native_error(rc, "p2pq_dequantize")
        return out

    def decode_into(self, payload: bytes, out: torch.Tensor) -> None:
        check_out(out)
        parsed = fmt.parse(payload, out.numel())
        kernels = self._native()
        if kernels is None:
            codes, codebooks = _reference_inputs(parsed)
            out.detach().copy_(reference.dequantize(codes, codebooks, parsed.chunk_size))
            return
        payload = parsed.payload
        rc = kernels.dequantize(
            buffer_address(payload), len(payload), out.data_ptr(), 4 * out.numel(), self._threads()
        )
        if rc != 0:
            raise fmt.native_error(rc, "p2pq_dequantize")

    def decode_accumulate(self, payload: bytes, out: torch.Tensor, weight: float) -> None:
        check_out(out)
        w = _float32_weight(weight)
        parsed = fmt.parse(payload, out.numel())
        kernels = self._native()
        if kernels is None:
            codes, codebooks = _reference_inputs(parsed)
            reference.decode_accumulate(codes, codebooks, parsed.chunk_size, out.detach(), w)
            return
        payload = parsed.payload
        rc = kernels.decode_accumulate(
            buffer_address(payload), len(payload), w, out.data_ptr(), 4 * out.numel(), self._threads()
        )
        if rc != 0:
            raise fmt.native_error(rc, "p2pq_decode_accumulate")


def _float32_weight(weight: float) -> float:
    # Both backends scale the codebook by float32(weight); one that overflows float32 is a caller's bug.
    w = check_weight(weight)
    try:
        struct.pack("<f", w)
    except OverflowError:
        raise ValueError(f"weight must fit in float32, got {weight!r}") from None
    return w


def _check_rc(rc: int, x: torch.Tensor, call: str) -> None:
    """An encode-side return value: -1 is success, a chunk index means NaN/Inf in ``x``."""
    if rc >= 0:
        raise CodecError(non_finite_message(x))
    if rc < -1:
        raise fmt.native_error(rc, call)


def _reference_inputs(parsed: fmt.Parsed) -> tuple[torch.Tensor, torch.Tensor]:
    # Copies: torch warns about (and must never write to) tensors over a read-only bytes buffer.
    codes = np.frombuffer(parsed.payload, dtype=np.uint8, count=parsed.numel, offset=parsed.codes_offset)
    return torch.from_numpy(codes.copy()), torch.from_numpy(parsed.codebooks.astype(np.float32))
