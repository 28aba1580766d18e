"""Our trainer's tokens/s against a plain PyTorch loop of the same model, batch and data, in one run.

The plain loop is what a user would write by hand: forward, cross-entropy, backward, clip, AdamW.
Ours is the real `Trainer` (a lone peer with its DHT up: metrics, progress records, outer steps
and all), timed from the first inner step to the last outer step.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from p2p_trainer.config_file import load_config
from p2p_trainer.data import TokenStream, build_tokenizer
from p2p_trainer.metrics import read_metrics
from p2p_trainer.model import build_model
from p2p_trainer.run import Trainer


def _plain_loop(cfg, batches: list[torch.Tensor]) -> float:
    model = build_model(cfg.model, len(build_tokenizer(cfg.data)), seed=cfg.inner.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.inner.lr, betas=tuple(cfg.inner.betas), weight_decay=cfg.inner.weight_decay
    )
    t0 = time.perf_counter()
    for tokens in batches:
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.inner.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the trainer reads the loss every step too
    return sum(b[:, 1:].numel() for b in batches) / (time.perf_counter() - t0)


def _ours(cfg, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg.log.metrics = f"{tmp}/m.jsonl"
        cfg.log.progress_bar = False
        cfg.log.eval_every = 0
        trainer = Trainer(cfg, max_outer_steps=steps // cfg.inner.steps_per_round)
        t0 = time.time()
        trainer.run()
        outer = read_metrics(cfg.log.metrics, "outer_step")
    # up to the last outer step's record: the peer's shutdown afterwards is not training time
    return sum(r["tokens"] for r in outer) / (outer[-1]["time"] - t0)


def run(steps: int = 60, repeats: int = 3) -> list[dict]:
    cfg = load_config(
        "configs/debug.toml",
        {"swarm.host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "inner.steps_per_round": 20, "log.level": "WARNING"},
    )
    stream = TokenStream(cfg.data, build_tokenizer(cfg.data), cfg.model.seq_len)
    batches = [stream.next_batch() for _ in range(steps)]
    plain, ours = [], []
    for _ in range(repeats):  # interleaved so that drift in machine speed hits both alike
        plain.append(_plain_loop(cfg, batches))
        ours.append(_ours(copy.deepcopy(cfg), steps))
    p, o = statistics.median(plain), statistics.median(ours)
    return [
        {"bench": "trainer", "what": "plain PyTorch loop", "tokens_per_s": round(p), "steps": steps},
        {
            "bench": "trainer",
            "what": "p2p-trainer (lone peer, 3 outer steps)",
            "tokens_per_s": round(o),
            "steps": steps,
            "overhead_pct": round(100 * (p / o - 1), 2),
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
