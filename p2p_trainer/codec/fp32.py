"""Lossless codec: the payload is the raw little-endian float32 bytes of the tensor, nothing else."""

from __future__ import annotations

import numpy as np
import torch

from p2p_trainer.codec.base import CodecError, as_buffer, check_input, check_out, check_weight

_LE_F32 = np.dtype("<f4")


class Fp32Codec:
    name = "fp32"

    def encode(self, x: torch.Tensor) -> bytes:
        check_input(x)
        return x.detach().numpy().astype(_LE_F32, copy=False).tobytes()

    def payload_view(self, decoded: torch.Tensor) -> memoryview:
        """The payload that decoded to ``decoded``, without a copy: a lossless codec's payload is its
        values' bytes (so a receiver need not keep both)."""
        check_out(decoded)
        return memoryview(decoded.detach().numpy().astype(_LE_F32, copy=False)).cast("B")

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        values = self._parse(payload, numel)
        out = torch.empty(numel, dtype=torch.float32)
        out.numpy()[:] = values
        return out

    def decode_into(self, payload: bytes, out: torch.Tensor) -> None:
        check_out(out)
        np.copyto(out.detach().numpy(), self._parse(payload, out.numel()))

    def decode_accumulate(self, payload: bytes, out: torch.Tensor, weight: float) -> None:
        check_out(out)
        w = check_weight(weight)
        values = self._parse(payload, out.numel())
        # The payload is read-only; numpy's in-place ops accept it as a source without a copy.
        acc = out.detach().numpy()
        if w == 1.0:
            np.add(acc, values, out=acc)
        else:
            acc += np.float32(w) * values

    @staticmethod
    def _parse(payload: bytes, numel: int) -> np.ndarray:
        payload = as_buffer(payload)
        if not isinstance(numel, int) or numel < 0:
            raise CodecError(f"numel must be a non-negative int, got {numel!r}")
        if len(payload) != 4 * numel:
            raise CodecError(
                f"fp32 payload has {len(payload)} bytes, expected {4 * numel} for {numel} values"
            )
        values = np.frombuffer(payload, dtype=_LE_F32)
        # A peer's NaN/Inf would silently poison the average, so it is rejected like a malformed payload.
        if not np.isfinite(values).all():
            raise CodecError("fp32 payload holds non-finite values")
        return values
