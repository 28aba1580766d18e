"""Build (once, cached) and load the C int8 kernel in ``kernels/int8_codec.c`` through ctypes.

The sparse codec's kernel (``kernels/sparse_codec.c``) goes through the same machinery with its own
source and ctypes wrapper: ``load_library(BuildConfig.from_env(SPARSE_SOURCE), wrap, "sparse")``.

Nothing happens at import: the first ``load()`` compiles or finds the cached shared object. The cache
key covers the source, the compiler's identity, the flags and the CPU, because ``-march=native``
code built on one machine may crash on another that shares the cache directory. Builds go to a
unique temporary name and are moved into place with ``os.replace``, so concurrent builders never
see (or leave) a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

ABI_VERSION = 2
# `codec/kernels` links to the repo's kernels/ folder and is shipped as package data in wheels
_SOURCE = Path(__file__).parent / "kernels" / "int8_codec.c"
SPARSE_SOURCE = Path(__file__).parent / "kernels" / "sparse_codec.c"
# -ffp-contract=off: a fused multiply-add would round differently from the torch reference, and so
# would -ffast-math's reassociation; codes must match bit for bit.
BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno")
ARCH_FLAGS = ("-march=native",)
_BUILD_TIMEOUT_S = 120.0


class NativeUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded here; the message says why."""


@dataclass(frozen=True)
class BuildConfig:
    compiler: str
    cache_dir: Path
    source: Path = _SOURCE
    arch_flags: tuple[str, ...] = field(default=ARCH_FLAGS)

    @classmethod
    def from_env(cls, source: Path = _SOURCE) -> BuildConfig:
        """``CC`` picks the compiler (default ``cc``); ``P2P_TRAINER_CACHE_DIR`` (else ``XDG_CACHE_HOME``
        or ``~/.cache``, plus ``p2p_trainer``) the cache directory; ``source`` the kernel (default int8's)."""
        root = os.environ.get("P2P_TRAINER_CACHE_DIR")
        if root:
            cache = Path(root) / "kernels"
        else:
            xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            cache = Path(xdg) / "p2p_trainer" / "kernels"
        return cls(compiler=os.environ.get("CC") or "cc", cache_dir=cache, source=source)


class NativeKernels:
    """Typed wrappers around the loaded library; all pointers are raw addresses of contiguous buffers."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        lib.p2pq_abi_version.restype = i32
        lib.p2pq_abi_version.argtypes = []
        # Every buffer travels with its length in bytes, which the kernel checks (int8_format.NATIVE_ERRORS).
        lib.p2pq_quantize.restype = i64
        lib.p2pq_quantize.argtypes = [vp, i64, i64, vp, i64, vp, i64, vp, i64, i32]
        lib.p2pq_encode.restype = i64
        lib.p2pq_encode.argtypes = [vp, i64, i64, vp, i64, i32]
        lib.p2pq_dequantize.restype = i32
        lib.p2pq_dequantize.argtypes = [vp, i64, vp, i64, i32]
        lib.p2pq_decode_accumulate.restype = i32
        lib.p2pq_decode_accumulate.argtypes = [vp, i64, f32, vp, i64, i32]
        got = lib.p2pq_abi_version()
        if got != ABI_VERSION:
            raise NativeUnavailable(f"{path} has ABI version {got}, expected {ABI_VERSION}")
        self._lib = lib

    # Return values: -1 (encode/quantize) or 0 (decode) on success, a chunk index >= 0 holding NaN/Inf
    # (encode/quantize), or an error code < -1 that int8_format.native_error turns into a message.

    def quantize(
        self,
        x: int,
        x_bytes: int,
        chunk: int,
        codes: int,
        codes_bytes: int,
        codebooks: int,
        codebooks_bytes: int,
        stats: int | None,
        stats_bytes: int,
        threads: int,
    ) -> int:
        return int(
            self._lib.p2pq_quantize(
                x, x_bytes, chunk, codes, codes_bytes, codebooks, codebooks_bytes, stats, stats_bytes, threads
            )
        )

    def encode(self, x: int, x_bytes: int, chunk: int, payload: int, payload_bytes: int, threads: int) -> int:
        return int(self._lib.p2pq_encode(x, x_bytes, chunk, payload, payload_bytes, threads))

    def dequantize(self, payload: int, payload_bytes: int, out: int, out_bytes: int, threads: int) -> int:
        return int(self._lib.p2pq_dequantize(payload, payload_bytes, out, out_bytes, threads))

    def decode_accumulate(
        self, payload: int, payload_bytes: int, weight: float, out: int, out_bytes: int, threads: int
    ) -> int:
        return int(self._lib.p2pq_decode_accumulate(payload, payload_bytes, weight, out, out_bytes, threads))

_lock = threading.Lock()
_loaded: dict[tuple[BuildConfig, str], Any] = {}
_Kernels = TypeVar("_Kernels")


def load(config: BuildConfig | None = None) -> NativeKernels:
    """The kernel for ``config`` (default: from the environment), built on first call; raises
    ``NativeUnavailable`` (remembered, so a missing compiler is not retried on every call)."""
    return load_library(config or BuildConfig.from_env(), NativeKernels, "int8")


def load_library(
    config: BuildConfig, wrap: Callable[[ctypes.CDLL, Path], _Kernels], what: str
) -> _Kernels:
    """``wrap(library, path)`` of ``config.source`` built and loaded once per (config, what); ``what``
    names the kernel in messages and cached file names. Failures are remembered like ``load``'s."""
    with _lock:
        cached = _loaded.get((config, what))
        if cached is None:
            cached = _build_and_load(config, wrap, what)
            _loaded[(config, what)] = cached
    if isinstance(cached, NativeUnavailable):
        raise cached
    return cached


def _build_and_load(
    config: BuildConfig, wrap: Callable[[ctypes.CDLL, Path], _Kernels], what: str
) -> _Kernels | NativeUnavailable:
    # A compiler that rejects -march=native still gets a chance to build the portable code path.
    attempts = [config, replace(config, arch_flags=())] if config.arch_flags else [config]
    first_error: NativeUnavailable | None = None
    for attempt in attempts:
        try:
            path = _build(attempt, what)
            return wrap(ctypes.CDLL(str(path)), path)
        except NativeUnavailable as e:
            first_error = first_error or e
        except (OSError, AttributeError) as e:  # AttributeError: a symbol the wrapper needs is missing
            first_error = first_error or NativeUnavailable(f"cannot load the {what} kernel: {e}")
    assert first_error is not None
    return first_error


def _compiler_identity(compiler: str) -> tuple[str, str]:
    path = shutil.which(compiler)
    if path is None:
        raise NativeUnavailable(f"no C compiler ({compiler!r} not found; set CC)")
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"no working C compiler ({path} --version failed: {e})") from None
    return path, version


def _cpu_identity() -> str:
    # The model name and feature flags decide what -march=native emits.
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def _library_path(config: BuildConfig, what: str) -> tuple[Path, str]:
    """Where the library for ``config`` is cached, and the resolved compiler that builds it."""
    try:
        source = config.source.read_bytes()
    except OSError as e:
        raise NativeUnavailable(f"{what} kernel source not found ({e})") from None
    compiler, version = _compiler_identity(config.compiler)
    key = hashlib.sha256()
    for part in (
        source,
        compiler.encode(),
        version.encode(),
        repr(BASE_FLAGS + config.arch_flags).encode(),
        platform.machine().encode(),
        sys.platform.encode(),
        _cpu_identity().encode(),
    ):
        key.update(hashlib.sha256(part).digest())
    return config.cache_dir / f"{what}_codec-{key.hexdigest()[:24]}.so", compiler


def _build(config: BuildConfig, what: str) -> Path:
    if sys.byteorder != "little":
        raise NativeUnavailable(f"the {what} kernel assumes a little-endian host")
    target, compiler = _library_path(config, what)
    if target.exists():
        return target
    try:
        config.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NativeUnavailable(f"cannot create the kernel cache {config.cache_dir}: {e}") from None
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=config.cache_dir)
    os.close(fd)
    try:
        cmd = [compiler, *BASE_FLAGS, *config.arch_flags, str(config.source), "-o", tmp, "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            raise NativeUnavailable(f"compiling the {what} kernel failed: {e}") from None
        if proc.returncode != 0:
            raise NativeUnavailable(
                f"compiling the {what} kernel failed ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
