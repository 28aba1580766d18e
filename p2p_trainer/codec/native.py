"""Build (once, cached) and load the C int8 kernel in ``kernels/int8_codec.c`` through ctypes.

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
from dataclasses import dataclass, field, replace
from pathlib import Path

ABI_VERSION = 1
# `codec/kernels` links to the repo's kernels/ folder and is shipped as package data in wheels
_SOURCE = Path(__file__).parent / "kernels" / "int8_codec.c"
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
    def from_env(cls) -> BuildConfig:
        """``CC`` picks the compiler (default ``cc``); ``P2P_TRAINER_CACHE_DIR`` (else ``XDG_CACHE_HOME``
        or ``~/.cache``, plus ``p2p_trainer``) the cache directory."""
        root = os.environ.get("P2P_TRAINER_CACHE_DIR")
        if root:
            cache = Path(root) / "kernels"
        else:
            xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            cache = Path(xdg) / "p2p_trainer" / "kernels"
        return cls(compiler=os.environ.get("CC") or "cc", cache_dir=cache)


class NativeKernels:
    """Typed wrappers around the loaded library; all pointers are raw addresses of contiguous buffers."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        lib.p2pq_abi_version.restype = i32
        lib.p2pq_abi_version.argtypes = []
        lib.p2pq_quantize.restype = i64
        lib.p2pq_quantize.argtypes = [vp, i64, i64, vp, vp, vp, i32]
        lib.p2pq_dequantize.restype = i32
        lib.p2pq_dequantize.argtypes = [vp, vp, i64, i64, vp, i32]
        lib.p2pq_decode_accumulate.restype = i32
        lib.p2pq_decode_accumulate.argtypes = [vp, vp, i64, i64, f32, vp, i32]
        got = lib.p2pq_abi_version()
        if got != ABI_VERSION:
            raise NativeUnavailable(f"{path} has ABI version {got}, expected {ABI_VERSION}")
        self._lib = lib

    def quantize(
        self, x: int, n: int, chunk: int, codes: int, codebooks: int, stats: int | None, threads: int
    ) -> int:
        """Returns -1 on success, else the first chunk index holding NaN/Inf."""
        rc = self._lib.p2pq_quantize(x, n, chunk, codes, codebooks, stats, threads)
        if rc < -1:
            raise ValueError(f"p2pq_quantize rejected its arguments (n={n}, chunk={chunk})")
        return int(rc)

    def dequantize(self, codes: int, codebooks: int, n: int, chunk: int, out: int, threads: int) -> None:
        if self._lib.p2pq_dequantize(codes, codebooks, n, chunk, out, threads) != 0:
            raise ValueError(f"p2pq_dequantize rejected its arguments (n={n}, chunk={chunk})")

    def decode_accumulate(
        self, codes: int, codebooks: int, n: int, chunk: int, weight: float, out: int, threads: int
    ) -> None:
        if self._lib.p2pq_decode_accumulate(codes, codebooks, n, chunk, weight, out, threads) != 0:
            raise ValueError(f"p2pq_decode_accumulate rejected its arguments (n={n}, chunk={chunk})")


_lock = threading.Lock()
_loaded: dict[BuildConfig, NativeKernels | NativeUnavailable] = {}


def load(config: BuildConfig | None = None) -> NativeKernels:
    """The kernel for ``config`` (default: from the environment), built on first call; raises
    ``NativeUnavailable`` (remembered, so a missing compiler is not retried on every call)."""
    config = config or BuildConfig.from_env()
    with _lock:
        cached = _loaded.get(config)
        if cached is None:
            cached = _build_and_load(config)
            _loaded[config] = cached
    if isinstance(cached, NativeUnavailable):
        raise cached
    return cached


def _build_and_load(config: BuildConfig) -> NativeKernels | NativeUnavailable:
    # A compiler that rejects -march=native still gets a chance to build the portable code path.
    attempts = [config, replace(config, arch_flags=())] if config.arch_flags else [config]
    first_error: NativeUnavailable | None = None
    for attempt in attempts:
        try:
            path = _build(attempt)
            return NativeKernels(ctypes.CDLL(str(path)), path)
        except NativeUnavailable as e:
            first_error = first_error or e
        except OSError as e:
            first_error = first_error or NativeUnavailable(f"cannot load the int8 kernel: {e}")
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


def _library_path(config: BuildConfig) -> tuple[Path, str]:
    """Where the library for ``config`` is cached, and the resolved compiler that builds it."""
    try:
        source = config.source.read_bytes()
    except OSError as e:
        raise NativeUnavailable(f"int8 kernel source not found ({e})") from None
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
    return config.cache_dir / f"int8_codec-{key.hexdigest()[:24]}.so", compiler


def _build(config: BuildConfig) -> Path:
    if sys.byteorder != "little":
        raise NativeUnavailable("the int8 kernel assumes a little-endian host")
    target, compiler = _library_path(config)
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
            raise NativeUnavailable(f"compiling the int8 kernel failed: {e}") from None
        if proc.returncode != 0:
            raise NativeUnavailable(
                f"compiling the int8 kernel failed ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
