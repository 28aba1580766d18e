"""Pseudo-gradient codecs: how a peer's flat fp32 update is put on the wire.

``fp32`` is lossless. ``int8`` is the INTELLECT-1 style quantizer (per chunk: range mean +- 6 std,
256 uniform buckets, codebook = mean of each bucket); see ``p2p_trainer.codec.int8_format`` for the
exact arithmetic and payload layout. ``sparse`` sends the top-k entries of each chunk with low-bit
values (``p2p_trainer.codec.sparse_format``). Nothing here compiles or loads native code at import time.
"""

from __future__ import annotations

from p2p_trainer.codec.base import Codec, CodecError
from p2p_trainer.codec.sparse_format import SparseParams

CODECS: tuple[str, ...] = ("fp32", "int8", "sparse")

__all__ = ["CODECS", "Codec", "CodecError", "SparseParams", "get_codec"]


def get_codec(
    name: str, *, backend: str = "auto", sparse: SparseParams | None = None, threads: int | None = None
) -> Codec:
    """Return the codec called ``name`` (one of ``CODECS``).

    ``backend`` only matters for ``int8`` and ``sparse`` (fp32 has nothing to accelerate): ``"native"``
    (the C kernel; ``NativeUnavailable`` on first use if it cannot be built), ``"reference"`` (pure torch)
    or ``"auto"`` (native if it builds, else the reference after one logged warning). The C kernel is
    compiled lazily on the first encode/decode, never here. ``sparse`` holds the sparse codec's
    parameters (default ``SparseParams()``); the other codecs ignore it, so a caller can always pass
    the ones from its config. ``threads``: the native kernels' threads per call (default: torch's
    intra-op thread count).
    """
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"unknown codec backend {backend!r}; choices: auto, native, reference")
    if name == "fp32":
        from p2p_trainer.codec.fp32 import Fp32Codec

        return Fp32Codec()
    if name == "int8":
        from p2p_trainer.codec.int8 import Int8Codec

        return Int8Codec(backend=backend, threads=threads)
    if name == "sparse":
        from p2p_trainer.codec.sparse import SparseCodec

        return SparseCodec.from_params(sparse or SparseParams(), backend=backend, threads=threads)
    raise ValueError(f"unknown codec {name!r}; choices: {', '.join(CODECS)}")
