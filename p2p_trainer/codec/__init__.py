"""Pseudo-gradient codecs: how a peer's flat fp32 update is put on the wire.

``fp32`` is lossless. ``int8`` is the INTELLECT-1 style quantizer (per chunk: range mean +- 6 std,
256 uniform buckets, codebook = mean of each bucket); see ``p2p_trainer.codec.int8_format`` for the
exact arithmetic and payload layout. Nothing here compiles or loads native code at import time.
"""

from __future__ import annotations

from p2p_trainer.codec.base import Codec, CodecError

CODECS: tuple[str, ...] = ("fp32", "int8")

__all__ = ["CODECS", "Codec", "CodecError", "get_codec"]


def get_codec(name: str, *, backend: str = "auto") -> Codec:
    """Return the codec called ``name`` (one of ``CODECS``).

    ``backend`` only matters for ``int8`` (fp32 has nothing to accelerate): ``"native"`` (the C kernel;
    ``NativeUnavailable`` on first use if it cannot be built), ``"reference"`` (pure torch) or ``"auto"``
    (native if it builds, else the reference after one logged warning). The C kernel is compiled
    lazily on the first encode/decode, never here.
    """
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"unknown int8 backend {backend!r}; choices: auto, native, reference")
    if name == "fp32":
        from p2p_trainer.codec.fp32 import Fp32Codec

        return Fp32Codec()
    if name == "int8":
        from p2p_trainer.codec.int8 import Int8Codec

        return Int8Codec(backend=backend)
    raise ValueError(f"unknown codec {name!r}; choices: {', '.join(CODECS)}")
