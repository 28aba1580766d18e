"""The codec contract shared by every pseudo-gradient codec, and the input checks they all apply."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np
import torch


class CodecError(ValueError):
    """A payload is malformed or hostile, or a tensor cannot be encoded (e.g. it holds NaN/Inf)."""


@runtime_checkable
class Codec(Protocol):
    """Turns a flat fp32 tensor into bytes for the wire and back.

    Payloads come from other peers, so ``decode`` and ``decode_accumulate`` must treat them as
    untrusted: every length, header field and value is validated before use.
    """

    name: str

    def encode(self, x: torch.Tensor) -> bytes:
        """Encode a 1-D contiguous float32 CPU tensor; raise CodecError if it holds NaN/Inf."""
        ...

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        """Return a new float32 tensor of ``numel`` values; raise CodecError if the payload is malformed."""
        ...

    def decode_accumulate(self, payload: bytes, out: torch.Tensor, weight: float) -> None:
        """``out += weight * decode(payload, out.numel())`` with fp32 accumulation, without a temporary
        where the codec can avoid one."""
        ...

    def decode_into(self, payload: bytes, out: torch.Tensor) -> None:
        """``out[:] = decode(payload, out.numel())``, written straight into ``out`` (for instance a
        slice of a kept buffer: a new tensor per call costs a page fault per 4 KiB); on CodecError
        ``out`` is untouched."""
        ...


def check_input(x: torch.Tensor) -> None:
    """Refuse anything but a 1-D contiguous float32 CPU tensor of finite values."""
    check_layout(x, "input")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise CodecError(non_finite_message(x, bad))


def check_layout(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 1 or not x.is_contiguous():
        raise CodecError(
            f"{what} must be a 1-D contiguous float32 CPU tensor, got dtype={x.dtype} "
            f"device={x.device} shape={tuple(x.shape)} contiguous={x.is_contiguous()}"
        )


def non_finite_message(x: torch.Tensor, bad: torch.Tensor | None = None) -> str:
    """Name the problem precisely: how many values, which kind, and where the first one is."""
    if bad is None:
        bad = ~torch.isfinite(x)
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(bad.sum()) - n_nan
    first = int(bad.nonzero()[0, 0]) if n_nan + n_inf else -1
    return (
        f"cannot encode a tensor with non-finite values: {n_nan} NaN and {n_inf} Inf "
        f"among {x.numel()} values (first at index {first}: {float(x[first]) if first >= 0 else 'n/a'})"
    )


def check_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w):
        raise ValueError(f"weight must be finite, got {weight!r}")
    return w


def check_out(out: torch.Tensor) -> None:
    """``out`` is ours (the caller's accumulator), so a bad one is a programming error, not a hostile peer."""
    try:
        check_layout(out, "out")
    except CodecError as e:
        raise TypeError(str(e)) from None


def as_buffer(payload: bytes | bytearray | memoryview) -> bytes | memoryview:
    """The payload's bytes without copying them: ``bytes`` as they are, a received frame's
    ``bytearray`` or contiguous view as a byte view of the same memory (a copy would cost a chunk's
    size of fresh memory per decode). The caller must not change them while a codec reads them."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray):
        return memoryview(payload)
    if isinstance(payload, memoryview):
        return payload.cast("B") if payload.c_contiguous else bytes(payload)
    raise CodecError(f"payload must be bytes-like, got {type(payload).__name__}")


def buffer_address(buf: bytes | memoryview) -> int:
    """Where ``buf``'s first byte lies in memory, for a native kernel that reads it."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data
