"""The training state as bytes: a safetensors file, written and read window by window, and read
as untrusted input.

Tensors, all fp32 and laid out like θ (the canonical flat vector, see ``shards``): ``master`` (θ),
``momentum`` (the outer momentum; absent before the first outer step), ``residual`` (error
feedback; local checkpoints only), ``inner.exp_avg`` and ``inner.exp_avg_sq`` (the inner AdamW
moments, when sent), and ``inner.step`` (AdamW's step count, one per parameter tensor). Metadata
(strings): ``format``, ``outer_step``, ``inner_step``, ``params_sha256``, and whatever a checkpoint
adds (``extra.*``: the data position, the config).

Why safetensors and not ``torch.save``: a JSON header of names, dtypes, shapes and byte offsets,
then raw bytes, with no compression and no code, so a reader checks every size against what it
expects before it reads any data (a zip can expand a thousandfold), and both writer and reader can
stream: no side ever holds more than one window of a vector (``WINDOW`` values), which is what lets
a peer whose state is spread over its local ranks serve and load it (see ``pump``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from p2p_trainer.contracts import outer_state_sha256_from
from p2p_trainer.swarm.messages import ProtocolError, load_json

FORMAT = "p2p-trainer-state/2"
MAX_HEADER = 1 << 20  # from a donor
MAX_LOCAL_HEADER = 1 << 28  # a checkpoint's metadata holds the data position (a token buffer)
MAX_PARAMS = 1 << 16  # parameter tensors (``inner.step`` entries)
WINDOW = 1 << 20  # values per read or write
VECTORS = ("master", "momentum", "residual", "inner.exp_avg", "inner.exp_avg_sq")
STEPS = "inner.step"
INNER = ("inner.exp_avg", "inner.exp_avg_sq", STEPS)
_META_INT = re.compile(r"^\d{1,15}$")

Read = Callable[[str, int, int], torch.Tensor]  # (name, lo, hi) -> fp32 values


class StateFormatError(ValueError):
    """A state is malformed or does not fit; the text names what is wrong."""


# ---- writing ---------------------------------------------------------------------------------------
def header_bytes(entries: list[tuple[str, int]], metadata: dict[str, str]) -> bytes:
    """The safetensors header for fp32 vectors ``entries`` (name, length), stored in that order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, n in entries:
        header[name] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def stream(
    entries: list[tuple[str, int]], metadata: dict[str, str], read: Read, window: int = WINDOW
) -> Iterator[bytes]:
    """The file's bytes, the header first, then each vector ``window`` values at a time."""
    yield header_bytes(entries, metadata)
    for name, n in entries:
        for lo in range(0, n, window):
            values = read(name, lo, min(lo + window, n))
            yield values.detach().float().contiguous().numpy().astype("<f4", copy=False).tobytes()


def size(entries: list[tuple[str, int]], metadata: dict[str, str]) -> int:
    return len(header_bytes(entries, metadata)) + 4 * sum(n for _, n in entries)


def write(f: BinaryIO, entries: list[tuple[str, int]], metadata: dict[str, str], read: Read) -> str:
    """Stream the file into ``f``; the sha256 of its bytes."""
    digest = hashlib.sha256()
    for block in stream(entries, metadata, read):
        digest.update(block)
        f.write(block)
    return digest.hexdigest()


# ---- reading ---------------------------------------------------------------------------------------
class StateFile:
    """A state file (or bytes), its header checked against ``numel`` on opening; ``read`` gives
    windows of its vectors, ``verify`` checks all values and hashes θ and the outer state."""

    def __init__(
        self, source: str | Path | bytes | bytearray, numel: int | None, *, max_header: int = MAX_HEADER
    ) -> None:
        """``numel``: how many values θ must have (None: as many as the file says, for local files)."""
        self.path = None if isinstance(source, (bytes, bytearray)) else Path(source)
        self._f: BinaryIO = io.BytesIO(source) if self.path is None else open(self.path, "rb")  # noqa: SIM115
        try:
            self.metadata, self._spans, self._data = _parse_header(self._f, numel, max_header)
            self.numel = self._spans["master"][1]
        except BaseException:
            self._f.close()
            raise
        for key in ("outer_step", "inner_step"):
            if not _META_INT.match(self.metadata.get(key, "")):
                raise StateFormatError(f"{key} {self.metadata.get(key, '')[:20]!r} is not a step")
        self.outer_step = int(self.metadata["outer_step"])
        self.inner_step = int(self.metadata["inner_step"])
        self.params_sha256 = self.metadata.get("params_sha256", "")
        self.hashes: dict[str, str] = {}  # of each vector, once ``verify`` has read them

    def has(self, name: str) -> bool:
        return name in self._spans

    @property
    def has_inner(self) -> bool:
        return all(self.has(name) for name in INNER)

    def length(self, name: str) -> int:
        return self._spans[name][1]

    def read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        offset, n = self._spans[name]
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"[{lo}, {hi}) outside {name} of {n} values")
        self._f.seek(self._data + offset + 4 * lo)
        raw = self._f.read(4 * (hi - lo))
        if len(raw) != 4 * (hi - lo):
            raise StateFormatError(f"{name} is cut short")
        return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))

    def verify(self) -> tuple[str, str]:
        """Check every value (finite; second moments and steps >= 0); (θ hash, outer state hash)."""
        hashes: dict[str, str] = {}
        for name in self._spans:
            n, digest = self.length(name), hashlib.sha256()
            for lo in range(0, n, WINDOW):
                values = self.read(name, lo, min(lo + WINDOW, n))
                if not bool(torch.isfinite(values).all()):
                    raise StateFormatError(f"{name} holds non-finite values")
                if name in ("inner.exp_avg_sq", STEPS) and bool((values < 0).any()):
                    raise StateFormatError(f"{name} holds negative values")
                digest.update(values.numpy().tobytes())
            hashes[name] = digest.hexdigest()
        self.hashes = hashes
        momentum = hashes.get("momentum")
        return hashes["master"], outer_state_sha256_from(hashes["master"], momentum, self.outer_step)

    def close(self) -> None:
        self._f.close()

    def discard(self) -> None:
        """Close, and delete the file."""
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _parse_header(
    f: BinaryIO, numel: int | None, max_header: int
) -> tuple[dict[str, str], dict[str, tuple[int, int]], int]:
    """(metadata, (byte offset, values) per vector, where the data starts) after checking the header
    against the file's size and ``numel``: every tensor a known fp32 vector of the right length, and
    offsets that tile the data with nothing left over."""
    f.seek(0, os.SEEK_END)
    total = f.tell()
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise StateFormatError("shorter than a safetensors header")
    hsize = int.from_bytes(head, "little")
    if hsize > max_header or 8 + hsize > total:
        raise StateFormatError(f"header of {hsize} bytes does not fit (limit {max_header}, file {total})")
    try:
        header = load_json(f.read(hsize), max_bytes=max_header, max_depth=3)
    except ProtocolError as e:
        raise StateFormatError(f"header: {e}") from None
    if not isinstance(header, dict):
        raise StateFormatError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StateFormatError("no metadata")
    if metadata.get("format") != FORMAT:
        raise StateFormatError(f"format {str(metadata.get('format'))[:40]!r}, not {FORMAT!r}")
    if numel is None:  # a local file: θ is as long as it says
        shape = header.get("master", {}).get("shape") if isinstance(header.get("master"), dict) else None
        numel = shape[0] if isinstance(shape, list) and shape and _small_int(shape[0]) else -1
    spans, tiles = {}, []
    for name, entry in header.items():
        n = _check_entry(name, entry, numel)
        begin, end = entry["data_offsets"]
        if end - begin != 4 * n:
            raise StateFormatError(f"{name}: {end - begin} bytes for {n} fp32 values")
        spans[name] = (begin, n)
        tiles.append((begin, end))
    if "master" not in spans:
        raise StateFormatError("no θ (master)")
    inner = [name for name in INNER if name in spans]
    if inner and len(inner) != len(INNER):
        raise StateFormatError(f"the inner state is incomplete ({', '.join(inner)})")
    position = 0
    for begin, end in sorted(tiles):
        if begin != position:
            raise StateFormatError("tensor data overlaps or leaves gaps")
        position = end
    if 8 + hsize + position != total:
        raise StateFormatError(f"data of {total - 8 - hsize} bytes, the header describes {position}")
    return metadata, spans, 8 + hsize


def _check_entry(name: Any, entry: Any, numel: int) -> int:
    if (
        not isinstance(name, str)
        or not isinstance(entry, dict)
        or set(entry) != {"dtype", "shape", "data_offsets"}
    ):
        raise StateFormatError(f"malformed tensor entry {str(name)[:40]!r}")
    if entry["dtype"] != "F32":
        raise StateFormatError(f"{name}: dtype {str(entry['dtype'])[:10]!r}, only F32 is accepted")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and len(shape) == 1 and _small_int(shape[0])):
        raise StateFormatError(f"{name}: bad shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_small_int(o) for o in offsets)):
        raise StateFormatError(f"{name}: bad data offsets")
    if name in VECTORS:
        if shape[0] != numel:
            raise StateFormatError(f"{name} has {shape[0]} values, θ has {numel}")
    elif name == STEPS:
        if shape[0] > MAX_PARAMS:
            raise StateFormatError(f"{STEPS} has {shape[0]} entries (at most {MAX_PARAMS})")
    else:
        raise StateFormatError(f"unexpected tensor {name[:40]!r}")
    return shape[0]


def _small_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 42
