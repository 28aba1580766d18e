"""Tokenizers: the byte-level one that is the same on every machine, or any Hugging Face tokenizer.

`tokenizer = "bytes"` builds, with the `tokenizers` library, a BPE model whose vocabulary is the 256
byte-level symbols (id = byte value) with no merges, a ByteLevel pre-tokenizer without regex or prefix
space, a ByteLevel decoder and `<|endoftext|>` as id 256. It is wrapped as a `PreTrainedTokenizerFast`,
so `save_pretrained` / `AutoTokenizer.from_pretrained` carry it into an exported model folder.

Because id = byte value, encoding a text is `text.encode("utf-8")`: `make_encoder` takes that fast path
for a tokenizer whose hash is the byte tokenizer's (tests prove both paths give the same ids).
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from p2p_trainer.config import ConfigError, DataConfig

EOS_TOKEN = "<|endoftext|>"
BYTE_VOCAB_SIZE = 257  # 256 bytes + EOS


class DataError(ConfigError):
    """A data source or tokenizer could not be fetched or loaded; the message is one line naming it."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _byte_backend():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab[EOS_TOKEN] = 256
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOS_TOKEN])  # already id 256 in the vocab: marks it special, adds no id
    return tk


def build_byte_tokenizer():
    """The byte-level tokenizer as a `PreTrainedTokenizerFast` (ids 0..255 = bytes, 256 = EOS)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_byte_backend(), eos_token=EOS_TOKEN)
    if len(tok) != BYTE_VOCAB_SIZE or tok.eos_token_id != 256:  # a transformers change would show here
        raise DataError(f"byte tokenizer came out with {len(tok)} ids and eos id {tok.eos_token_id}")
    return tok


def build_tokenizer(cfg: DataConfig):
    """`cfg.tokenizer`: 'bytes', or a hub id / local folder loaded with `AutoTokenizer.from_pretrained`."""
    if cfg.tokenizer == "bytes":
        return build_byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as e:  # one line for the user, whatever the loader raised
        raise DataError(f"data.tokenizer={cfg.tokenizer!r}: could not load it: {_one_line(e)}") from e
    eos_id(tok)  # fail now, not at the first batch
    return tok


def tokenizer_sha256(tok) -> str:
    """Hash of the tokenizer's canonical tokenizer.json (sorted keys, no whitespace): equal tokenizers,
    equal hash, across builds and machines with the same `tokenizers` serialization format."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return _json_sha256(backend.to_str())
    # a tokenizer without a `tokenizers` backend: hash what save_pretrained writes
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        for p in sorted(Path(tmp).rglob("*")):
            if p.is_file():
                h.update(p.relative_to(tmp).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _json_sha256(text: str) -> str:
    canon = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def byte_tokenizer_sha256() -> str:
    return tokenizer_sha256(build_byte_tokenizer())


def vocab_size(tok) -> int:
    """Ids the model's embedding needs: `len(tok)` (base vocabulary plus added tokens)."""
    return len(tok)


def eos_id(tok) -> int:
    """The document separator id: the tokenizer's EOS token."""
    eid = getattr(tok, "eos_token_id", None)
    if eid is None:
        name = getattr(tok, "name_or_path", "?")
        raise DataError(f"tokenizer {name!r} has no eos token to separate documents")
    return int(eid)


def is_byte_tokenizer(tok) -> bool:
    return tokenizer_sha256(tok) == byte_tokenizer_sha256()


def make_encoder(tok) -> Callable[[str], np.ndarray]:
    """document text -> token ids as a 1-D integer array; the fast byte path where it applies.

    A special token's text inside a document (a literal "<|endoftext|>" in a code file) is encoded as
    plain text, so only the packer puts EOS between documents."""
    if is_byte_tokenizer(tok):
        return encode_bytes
    return backend_encoder(tok)


def backend_encoder(tok) -> Callable[[str], np.ndarray]:
    """The `tokenizers` path of `make_encoder` (a private copy of the backend that does not match
    special-token text); tests compare the byte fast path with it."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return lambda text: np.asarray(
            tok.encode(text, add_special_tokens=False, split_special_tokens=True), dtype=np.int64
        )
    from tokenizers import Tokenizer

    private = Tokenizer.from_str(backend.to_str())
    private.encode_special_tokens = True
    private.no_truncation()  # whole documents; the packer cuts them
    private.no_padding()
    return lambda text: np.asarray(private.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def encode_bytes(text: str) -> np.ndarray:
    """Byte-tokenizer ids of `text` without `tokenizers`: its utf-8 bytes (uint8)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
