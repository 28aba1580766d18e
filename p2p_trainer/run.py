"""One peer's life: build the parts from the config, then loop H inner steps, a round, the outer step."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from p2p_trainer import checkpoint
from p2p_trainer.config import Config
from p2p_trainer.data import TokenStream, build_tokenizer, eval_batches, tokenizer_sha256
from p2p_trainer.diloco import DiLoCo
from p2p_trainer.inner import InnerLoop, init_distributed
from p2p_trainer.metrics import MetricsWriter
from p2p_trainer.model import build_model

logger = logging.getLogger(__name__)


def run_fingerprint(cfg: Config, tokenizer) -> dict:
    """What every peer of one run must share: a peer whose fingerprint differs may not join."""
    return {
        "run_id": cfg.swarm.run_id,
        "model": asdict(cfg.model) | {"vocab_size": cfg.model.vocab_size or len(tokenizer)},
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "codec": cfg.swarm.codec,
        "data_mix": [[s["name"], float(s.get("weight", 1.0))] for s in cfg.data.sources],
        "seq_len": cfg.model.seq_len,
    }


def peer_seed(peer_id: str) -> int:
    return int(hashlib.sha256(peer_id.encode()).hexdigest()[:8], 16)


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop leaves at the next safe point and shuts down cleanly."""

    def __init__(self) -> None:
        self.event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        logger.info("received signal %d: finishing cleanly", signum)
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()


@dataclass
class RoundStats:
    steps: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    started: float = 0.0

    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.started)


class Trainer:
    """The parts of one peer, wired together; `run()` is the loop."""

    def __init__(self, cfg: Config, *, max_outer_steps: int | None = None, swarm_factory=None):
        self.cfg, self.max_outer_steps = cfg, max_outer_steps
        self.stop = StopFlag()
        self.tokenizer = build_tokenizer(cfg.data)
        self.fingerprint = run_fingerprint(cfg, self.tokenizer)
        # the swarm's daemons fork before CUDA is initialised (hivemind needs the fork start method)
        self.peer = None
        if int(os.environ.get("RANK", "0")) == 0:
            from p2p_trainer.swarm.peer import SwarmPeer

            self.peer = (swarm_factory or SwarmPeer)(cfg.swarm, self.fingerprint)
        self.rank, self.world, self.device = init_distributed()
        vocab = len(self.tokenizer)
        model = build_model(cfg.model, vocab, seed=cfg.inner.seed, device=self.device)
        self.inner = InnerLoop(model, cfg.inner, cfg.data.micro_batch_size, rank=self.rank, world=self.world,
                               device=self.device)
        initial = self.inner.export_params()
        self.diloco = DiLoCo(initial, cfg.outer) if self.rank == 0 else None
        seed = self._broadcast_int(peer_seed(self.peer.peer_id) if self.peer else 0)
        self.data = TokenStream(cfg.data, self.tokenizer, cfg.model.seq_len, peer_seed=seed)
        self.eval_data = eval_batches(cfg.data, self.tokenizer, cfg.model.seq_len)
        self.metrics = MetricsWriter(cfg.log.metrics if self.rank == 0 else None)
        self.n_params = initial.numel()
        self.params_sha256 = ""  # hash of θ after the last outer step; "" before the first
        if cfg.checkpoint.resume and cfg.checkpoint.dir:
            self._resume()

    # ---- helpers shared by all local ranks -------------------------------------------------
    def _broadcast_int(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def _round_closed(self, stats: RoundStats, outer_step: int) -> bool:
        if self.cfg.swarm.round_tokens == 0 or self.peer is None:
            closed = stats.steps >= self.cfg.inner.steps_per_round
        else:
            closed = self.peer.round_should_close(
                outer_step=outer_step, local_tokens=stats.tokens, local_tokens_per_s=stats.tokens_per_s()
            )
        return bool(self._broadcast_int(int(closed or bool(self.stop))))

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        outer_step = self.diloco.outer_step if self.diloco else 0
        outer_step = self._broadcast_int(outer_step)
        if self.cfg.log.eval_every:
            self._log_eval(outer_step)
        bar = tqdm(desc="train", unit="step", disable=self.rank != 0 or not self.cfg.log.progress_bar)
        try:
            while not self.stop and (self.max_outer_steps is None or outer_step < self.max_outer_steps):
                stats = self._inner_round(outer_step, bar)
                if self.stop and stats.steps == 0:
                    break
                outer_step = self._outer_round(outer_step, stats)
        finally:
            bar.close()
            self.close()
        return 0

    def _inner_round(self, outer_step: int, bar: tqdm) -> RoundStats:
        stats = RoundStats(started=time.perf_counter())
        while not self._round_closed(stats, outer_step):
            t0 = time.perf_counter()
            step = self.inner.step(self.data.next_batch())
            if self.cfg.inner.slowdown > 1:
                time.sleep((time.perf_counter() - t0) * (self.cfg.inner.slowdown - 1))
            stats.steps += 1
            stats.tokens += step.tokens
            stats.loss_sum += step.loss
            tok_s = step.tokens / (time.perf_counter() - t0)
            self.metrics.write("inner_step", step=self.inner.step_count, loss=step.loss, lr=step.lr,
                               tokens_per_s=tok_s, outer_step=outer_step)
            bar.update()
            bar.set_postfix(loss=f"{step.loss:.3f}", tok_s=f"{tok_s:.0f}", outer=outer_step)
            if self.peer is not None and stats.steps % 5 == 1:
                self.peer.publish_progress(outer_step=outer_step, tokens=stats.tokens,
                                           tokens_per_s=stats.tokens_per_s(), loss=step.loss,
                                           params_sha256=self.params_sha256)
        return stats

    def _outer_round(self, outer_step: int, stats: RoundStats) -> int:
        """Pseudo-gradient, swarm average, outer step. A failed round leaves θ as it was."""
        local = self.inner.export_params()
        new_params, record = None, None
        if self.rank == 0:
            delta = self.diloco.pseudo_gradient(local)
            t0 = time.perf_counter()
            result = self.peer.all_reduce(outer_step=outer_step, vector=delta, weight=float(stats.tokens))
            if result is not None:
                new_params = self.diloco.apply(result.average)
                record = {"group_size": result.group_size, "allreduce_s": result.allreduce_s,
                          "bytes_sent": result.bytes_sent, "bytes_received": result.bytes_received,
                          "wait_s": result.wait_s, "excluded": result.excluded}
            else:
                logger.warning("round %d failed: θ kept as it was; local progress carries into the next round",
                               outer_step)
                record = {"allreduce_s": time.perf_counter() - t0}
        ok = self._broadcast_int(int(new_params is not None))
        if not ok:
            return outer_step
        self.inner.import_params(new_params)
        outer_step += 1
        if self.rank == 0:
            sha = self.params_sha256 = self.diloco.sha256()
            self.metrics.write("outer_step", outer_step=outer_step, loss=stats.loss_sum / max(1, stats.steps),
                               tokens=stats.tokens, inner_steps=stats.steps, params_sha256=sha, **record)
            self.peer.publish_progress(outer_step=outer_step, tokens=0, tokens_per_s=stats.tokens_per_s(),
                                       loss=stats.loss_sum / max(1, stats.steps), params_sha256=sha)
        if self.cfg.log.eval_every and outer_step % self.cfg.log.eval_every == 0:
            self._log_eval(outer_step)
        if self.rank == 0 and self.cfg.checkpoint.dir and outer_step % self.cfg.checkpoint.every == 0:
            self._save(outer_step)
        return outer_step

    def _log_eval(self, outer_step: int) -> None:
        loss = self.inner.evaluate(self.eval_data)
        if self.rank == 0:
            self.metrics.write("eval", outer_step=outer_step, eval_loss=loss)
            logger.info("outer step %d: held-out loss %.4f", outer_step, loss)

    # ---- checkpoints ------------------------------------------------------------------------
    def _save(self, outer_step: int) -> None:
        state = {
            "outer_step": outer_step,
            "diloco": self.diloco.state_dict(),
            "inner": self.inner.state_dict() if self.world == 1 else None,
            "data": self.data.state_dict(),
            "config": self.cfg.to_dict(),
            "fingerprint": self.fingerprint,
        }
        checkpoint.save_checkpoint(self.cfg.checkpoint.dir, outer_step, state, keep=self.cfg.checkpoint.keep)

    def _resume(self) -> None:
        path = checkpoint.latest_checkpoint(self.cfg.checkpoint.dir)
        if path is None:
            logger.info("no checkpoint in %s: starting fresh", self.cfg.checkpoint.dir)
            return
        state = checkpoint.load_checkpoint(path)
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"checkpoint {path} belongs to another run (fingerprint differs)")
        if self.diloco is not None:
            self.diloco.load_state_dict(state["diloco"])
            self.params_sha256 = self.diloco.sha256()
        self.inner.import_params(self.diloco.master.detach() if self.diloco else None)
        if state.get("inner") is not None and self.world == 1:
            self.inner.load_state_dict(state["inner"])
        self.data.load_state_dict(state["data"])
        logger.info("resumed from %s (outer step %d)", path, state["outer_step"])

    def close(self) -> None:
        self.metrics.close()
        if self.peer is not None:
            self.peer.shutdown()
            self.peer = None


def train(cfg: Config, max_outer_steps: int | None = None) -> int:
    logging.basicConfig(level=cfg.log.level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(cfg, max_outer_steps=max_outer_steps)
    if trainer.peer is not None:
        for maddr in trainer.peer.visible_maddrs:
            print(f"peer address: {maddr}", flush=True)
        logger.info("run fingerprint %s", json.dumps(trainer.fingerprint, sort_keys=True)[:200])
    return trainer.run()
