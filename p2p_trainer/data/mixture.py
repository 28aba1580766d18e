"""Packing a weighted mixture of document sources into fixed-length training sequences.

Each next document comes from source i with probability weight_i / sum(weights) (a numpy Generator
seeded from (cfg.seed, peer_seed)); each source walks its own per-peer order. Documents are tokenized
when drawn, joined with EOS and cut into rows of seq_len + 1 tokens. The position (generator state,
per-source (epoch, documents consumed) cursors, the partial token buffer) is a JSON-serializable dict.
"""

from __future__ import annotations

import bisect
import json
import logging

import numpy as np
import torch

from p2p_trainer.config import DataConfig
from p2p_trainer.data.sources import derive_seed, open_source, parse_sources
from p2p_trainer.data.tokenizer import DataError, eos_id, make_encoder, tokenizer_sha256

logger = logging.getLogger(__name__)

STATE_VERSION = 1
EVAL_SEED = "p2p-trainer-eval"  # the held-out batches do not depend on cfg.seed: comparable across runs


class _Packer:
    """Draws documents from weighted sources and cuts the token stream into [rows, seq_len + 1]."""

    def __init__(self, sources, weights, tokenizer, seq_len: int, rng: np.random.Generator):
        self.sources, self.seq_len, self.rng = sources, seq_len, rng
        total = float(sum(weights))
        self.cum = list(np.cumsum(np.asarray(weights, dtype=np.float64) / total))
        self.cum[-1] = 1.0
        self.encode = make_encoder(tokenizer)
        self.eos = np.asarray([eos_id(tokenizer)], dtype=np.int64)
        self.buf: list[np.ndarray] = []
        self.buf_len = 0

    def pick(self) -> int:
        return bisect.bisect_right(self.cum, self.rng.random()) if len(self.cum) > 1 else 0

    def next_text(self, i: int) -> str:  # overridden
        raise NotImplementedError

    def rows(self, n: int) -> torch.Tensor:
        need = n * (self.seq_len + 1)
        while self.buf_len < need:
            ids = self.encode(self.next_text(self.pick()))
            self.buf += [ids, self.eos]
            self.buf_len += len(ids) + 1
        flat = np.concatenate(self.buf).astype(np.int64, copy=False)
        rest = flat[need:]
        self.buf, self.buf_len = ([rest] if len(rest) else []), len(rest)
        return torch.from_numpy(flat[:need].copy()).view(n, self.seq_len + 1)

    def buffer_list(self) -> list[int]:
        return np.concatenate(self.buf).astype(np.int64).tolist() if self.buf else []


class TokenStream(_Packer):
    """One peer's training data: `next_batch()` -> LongTensor [cfg.batch_size, seq_len + 1].

    The same (cfg, tokenizer, seq_len, peer_seed) give the same batches on every machine; another
    peer_seed gives another order. `state_dict()` / `load_state_dict()` resume at the exact next batch.
    """

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int, peer_seed: int = 0):
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len} must be > 0")
        self.cfg, self.specs = cfg, parse_sources(cfg)
        self.labels = [s.label for s in self.specs]
        self.tokenizer_sha256 = tokenizer_sha256(tokenizer)
        self.vocab_size, self.eos_id = len(tokenizer), eos_id(tokenizer)
        self.base_seed = derive_seed("stream", cfg.seed, peer_seed)
        rng = np.random.Generator(np.random.PCG64(self.base_seed))
        super().__init__([open_source(s, cfg) for s in self.specs], [s.weight for s in self.specs],
                         tokenizer, seq_len, rng)
        self.cursors = [[0, 0] for _ in self.specs]  # (epoch, documents consumed in the epoch)
        self._iters: list = [None] * len(self.specs)
        self.source_counts: dict[str, int] = dict.fromkeys(self.labels, 0)

    def next_batch(self) -> torch.Tensor:
        return self.rows(self.cfg.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def next_text(self, i: int) -> str:
        cur, empty_run = self.cursors[i], 0
        while True:
            if self._iters[i] is None:
                self._iters[i] = self.sources[i].train_iter(self.base_seed, cur[0], cur[1])
            text = next(self._iters[i], None)
            if text is None:  # end of this epoch of the source
                if cur[1] == 0:
                    raise DataError(f"data source {self.labels[i]!r} has no training documents")
                cur[0], cur[1], self._iters[i] = cur[0] + 1, 0, None
                continue
            cur[1] += 1
            if text:
                self.source_counts[self.labels[i]] += 1
                return text
            empty_run += 1
            if empty_run > 1_000_000:
                raise DataError(f"data source {self.labels[i]!r} yields only empty documents")

    def state_dict(self) -> dict:
        """The exact position: plain ints, lists and strings (JSON- and torch.save-safe)."""
        return {
            "version": STATE_VERSION,
            "sources": list(self.labels),
            "tokenizer_sha256": self.tokenizer_sha256,
            "base_seed": self.base_seed,
            "rng": self.rng.bit_generator.state,
            "cursors": [list(c) for c in self.cursors],
            "buffer": self.buffer_list(),
            "source_counts": dict(self.source_counts),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}, this code reads {STATE_VERSION}")
        if list(state["sources"]) != self.labels:
            raise ValueError(f"data state is for sources {state['sources']}, the config has {self.labels}")
        if state["tokenizer_sha256"] != self.tokenizer_sha256:
            raise ValueError("data state was written with another tokenizer (tokenizer_sha256 differs)")
        self.base_seed = int(state["base_seed"])
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = json.loads(json.dumps(state["rng"]))  # a private copy
        self.cursors = [[int(e), int(p)] for e, p in state["cursors"]]
        self._iters = [None] * len(self.specs)
        buf = np.asarray(state["buffer"], dtype=np.int64)
        self.buf, self.buf_len = ([buf] if len(buf) else []), len(buf)
        self.source_counts = {k: int(v) for k, v in state["source_counts"].items()}


class _EvalPacker(_Packer):
    """Held-out documents of every source in a fixed order, cycled; the same on every peer."""

    def __init__(self, sources, labels, weights, tokenizer, seq_len):
        super().__init__(sources, weights, tokenizer, seq_len, np.random.Generator(np.random.PCG64(
            derive_seed(EVAL_SEED))))
        self.labels = labels
        self.iters = [src.eval_iter() for src in sources]

    def next_text(self, i: int) -> str:
        for _ in range(2):
            for text in self.iters[i]:
                if text:
                    return text
            self.iters[i] = self.sources[i].eval_iter()  # cycle
        raise DataError(f"data source {self.labels[i]!r} has no held-out documents")


_EVAL_MEMO: dict[str, list[torch.Tensor]] = {}


def eval_batches(cfg: DataConfig, tokenizer, seq_len: int) -> list[torch.Tensor]:
    """`cfg.eval_batches` held-out batches [cfg.batch_size, seq_len + 1], identical on every peer.

    A source with no held-out document (a tiny local set) is left out of the evaluation mixture with a
    warning; none at all is an error."""
    specs = parse_sources(cfg)
    sha = tokenizer_sha256(tokenizer)
    key = json.dumps([cfg.sources, cfg.eval_fraction, cfg.eval_batches, cfg.batch_size, cfg.cache_dir,
                      cfg.streaming, sha, seq_len], sort_keys=True, default=str)
    if key not in _EVAL_MEMO:
        keep = []
        for spec in specs:
            src = open_source(spec, cfg)
            if any(t for t in src.eval_iter()):
                keep.append((spec, src))
            else:
                logger.warning("data source %s has no held-out documents: left out of evaluation", spec.label)
        if not keep:
            raise DataError(f"no data source has held-out documents (eval_fraction={cfg.eval_fraction})")
        packer = _EvalPacker([s for _, s in keep], [p.label for p, _ in keep], [p.weight for p, _ in keep],
                             tokenizer, seq_len)
        _EVAL_MEMO[key] = [packer.rows(cfg.batch_size) for _ in range(cfg.eval_batches)]
    return [b.clone() for b in _EVAL_MEMO[key]]
