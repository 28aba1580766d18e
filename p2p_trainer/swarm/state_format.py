"""The training state on the wire: a safetensors file, read as untrusted input.

Tensors: ``master`` (θ, fp32 [numel]), ``momentum`` (the outer momentum, same shape, absent before
the first outer step) and, when the donor sends its inner AdamW state, ``inner.{i}.exp_avg``,
``inner.{i}.exp_avg_sq``, ``inner.{i}.step`` per parameter ``i``. Metadata (strings): ``format``,
``outer_step``, ``inner_step``, ``params_sha256``.

Why safetensors and not ``torch.save``: its layout is a JSON header of names, dtypes, shapes and
byte offsets, then raw bytes, with no compression, so a reader can check every size against what it
expects before it allocates anything (a zip can expand a thousandfold), and loading runs no code.
``parse_header`` checks the header within bounds; ``deserialize`` then loads, checks values
(finite, second moments >= 0) and rebuilds the state.
"""

from __future__ import annotations

import re
from typing import Any

import safetensors.torch
import torch

from p2p_trainer.swarm.messages import ProtocolError, load_json

FORMAT = "p2p-trainer-state/1"
MAX_HEADER = 1 << 20
_DTYPES = {"F32": (torch.float32, 4)}
_INNER = re.compile(r"^inner\.(\d{1,6})\.(exp_avg|exp_avg_sq|step)$")
_META_INT = re.compile(r"^\d{1,15}$")


class StateFormatError(ValueError):
    """A donor's state is malformed or does not fit; the text names what is wrong."""


def serialize(
    *,
    master: torch.Tensor,
    momentum: torch.Tensor | None,
    outer_step: int,
    inner_step: int,
    params_sha256: str,
    inner_optimizer: dict | None,
) -> bytes:
    tensors = {"master": master.detach().float().contiguous()}
    if momentum is not None:
        tensors["momentum"] = momentum.detach().float().contiguous()
    for i, per_param in (inner_optimizer or {}).get("state", {}).items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            value = per_param.get(key)
            if isinstance(value, torch.Tensor):
                tensors[f"inner.{i}.{key}"] = value.detach().float().contiguous()
    metadata = {
        "format": FORMAT,
        "outer_step": str(outer_step),
        "inner_step": str(inner_step),
        "params_sha256": params_sha256,
    }
    return safetensors.torch.save(tensors, metadata=metadata)


def parse_header(blob: bytes | bytearray, numel: int) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, shape per tensor) after checking the header against ``blob`` and ``numel``:
    every tensor fp32, θ and momentum of exactly ``numel`` values, the inner state no larger than
    two moments per value, offsets that tile the data with nothing left over."""
    if len(blob) < 8:
        raise StateFormatError("shorter than a safetensors header")
    size = int.from_bytes(blob[:8], "little")
    if size > MAX_HEADER or 8 + size > len(blob):
        raise StateFormatError(f"header of {size} bytes does not fit (limit {MAX_HEADER}, blob {len(blob)})")
    try:
        header = load_json(bytes(blob[8 : 8 + size]), max_bytes=MAX_HEADER, max_depth=3)
    except ProtocolError as e:
        raise StateFormatError(f"header: {e}") from None
    if not isinstance(header, dict):
        raise StateFormatError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StateFormatError("no metadata")
    if metadata.get("format") != FORMAT:
        raise StateFormatError(f"format {str(metadata.get('format'))[:40]!r}, not {FORMAT!r}")
    shapes, spans, inner_values = {}, [], 0
    for name, entry in header.items():
        shape = _check_entry(name, entry)
        count = _prod(shape)
        if name in ("master", "momentum"):
            if shape != (numel,):
                raise StateFormatError(f"{name} has shape {list(shape)}, θ has {numel} values")
        elif _INNER.match(name):
            inner_values += count
        else:
            raise StateFormatError(f"unexpected tensor {name[:40]!r}")
        begin, end = entry["data_offsets"]
        if end - begin != 4 * count:
            raise StateFormatError(f"{name}: {end - begin} bytes for {count} fp32 values")
        shapes[name] = shape
        spans.append((begin, end))
    if "master" not in shapes:
        raise StateFormatError("no θ (master)")
    if inner_values > 2 * numel + 65536:
        raise StateFormatError(f"{inner_values} inner optimizer values for {numel} parameters")
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise StateFormatError("tensor data overlaps or leaves gaps")
        position = end
    if 8 + size + position != len(blob):
        raise StateFormatError(f"data of {len(blob) - 8 - size} bytes, the header describes {position}")
    return metadata, shapes


def _check_entry(name: Any, entry: Any) -> tuple[int, ...]:
    if (
        not isinstance(name, str)
        or not isinstance(entry, dict)
        or set(entry) != {"dtype", "shape", "data_offsets"}
    ):
        raise StateFormatError(f"malformed tensor entry {str(name)[:40]!r}")
    if entry["dtype"] not in _DTYPES:
        raise StateFormatError(f"{name}: dtype {str(entry['dtype'])[:10]!r}, only F32 is accepted")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= 4 and all(_small_int(d) for d in shape)):
        raise StateFormatError(f"{name}: bad shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_small_int(o) for o in offsets)):
        raise StateFormatError(f"{name}: bad data offsets")
    return tuple(shape)


def _small_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 42


def _prod(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def deserialize(blob: bytes | bytearray, numel: int) -> dict[str, Any]:
    """The state's parts: master, momentum (or None), outer_step, inner_step, params_sha256 and
    inner_state (per-parameter AdamW state, or None). StateFormatError names what is wrong."""
    metadata, shapes = parse_header(blob, numel)
    for key in ("outer_step", "inner_step"):
        if not _META_INT.match(metadata.get(key, "")):
            raise StateFormatError(f"{key} {metadata.get(key, '')[:20]!r} is not a step")
    tensors = safetensors.torch.load(bytes(blob))
    for name, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            raise StateFormatError(f"{name} holds non-finite values")
    inner: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        match = _INNER.match(name)
        if match:
            inner.setdefault(int(match.group(1)), {})[match.group(2)] = value
    for i, per_param in inner.items():
        if set(per_param) != {"exp_avg", "exp_avg_sq", "step"}:
            raise StateFormatError(f"inner state of parameter {i} is incomplete")
        if per_param["exp_avg"].shape != per_param["exp_avg_sq"].shape or per_param["step"].numel() != 1:
            raise StateFormatError(f"inner state of parameter {i} has mismatched shapes")
        if bool((per_param["exp_avg_sq"] < 0).any()) or float(per_param["step"]) < 0:
            raise StateFormatError(f"inner state of parameter {i} has negative second moments or steps")
        per_param["step"] = per_param["step"].reshape(())
    return {
        "master": tensors["master"],
        "momentum": tensors.get("momentum"),
        "outer_step": int(metadata["outer_step"]),
        "inner_step": int(metadata["inner_step"]),
        "params_sha256": metadata.get("params_sha256", ""),
        "inner_state": inner or None,
    }
