"""One peer's life: build the parts from the config, then loop H inner steps, a round, the outer step."""

from __future__ import annotations

import copy
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
from p2p_trainer.config import Config, ConfigError
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
        "round_tokens": cfg.swarm.round_tokens,  # how a round closes (0: fixed H); `status` needs it for ETAs
    }


def peer_seed(peer_id: str) -> int:
    return int(hashlib.sha256(peer_id.encode()).hexdigest()[:8], 16)


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop leaves at the next safe point and shuts down cleanly.
    Callbacks registered with ``on_stop`` (the swarm peer's ``interrupt``) run in the handler, so a
    blocking swarm call in progress gives up instead of waiting out its timeout."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.abort_now = False  # set while joining the swarm (which retries for up to join_timeout)
        self._callbacks: list = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handle)

    def on_stop(self, callback) -> None:
        self._callbacks.append(callback)
        if self.event.is_set():  # the signal came first (e.g. while the swarm node was starting)
            callback()

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() or self.abort_now:
            raise KeyboardInterrupt  # the CLI exits 0; the swarm peer being built cleans up after itself
        logger.info("received signal %d: finishing cleanly", signum)
        self.event.set()
        for callback in self._callbacks:
            callback()

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

            if self.stop:
                raise KeyboardInterrupt  # asked to stop before we even joined
            self.stop.abort_now = True
            try:
                self.peer = (swarm_factory or SwarmPeer)(cfg.swarm, self.fingerprint)
            finally:
                self.stop.abort_now = False
            self.stop.on_stop(self.peer.interrupt)
        try:
            self._build(cfg)
        except BaseException:  # a bad checkpoint, Ctrl+C, ...: our swarm node must not outlive us
            if self.peer is not None:
                self.peer.shutdown()
            raise

    def _build(self, cfg: Config) -> None:
        """Everything but the swarm node (which must fork before CUDA starts)."""
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
        self.resumed_step: int | None = None
        self.catching_up = False  # this round started from a downloaded state, later than the others'
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
            if not closed and self.peer is not None and stats.steps > 0:
                # the swarm moved on without us, or (catching up) everyone else waits for us
                closed = self.peer.round_is_late(outer_step=outer_step, catching_up=self.catching_up)
        else:
            closed = self.peer.round_should_close(
                outer_step=outer_step, local_tokens=stats.tokens, local_tokens_per_s=stats.tokens_per_s()
            )
        return bool(self._broadcast_int(int(closed or bool(self.stop))))

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        outer_step = self.diloco.outer_step if self.diloco else 0
        outer_step = self._broadcast_int(outer_step)
        bar = tqdm(desc="train", unit="step", disable=self.rank != 0 or not self.cfg.log.progress_bar)
        try:
            # a late joiner (or a peer resuming behind the swarm) starts from the swarm's state
            outer_step = self._sync(outer_step) or outer_step
            self._publish_state(outer_step)
            if self.cfg.log.eval_every and not self.stop:
                self._log_eval(outer_step)
            while not self.stop and (self.max_outer_steps is None or outer_step < self.max_outer_steps):
                stats = self._inner_round(outer_step, bar)
                if self.stop:
                    break  # leaving: a round now would make the others wait for us in matchmaking
                synced = self._sync(outer_step)
                if synced is not None:  # we were behind or diverged: this round's work is dropped
                    outer_step = synced
                    continue
                outer_step = self._outer_round(outer_step, stats)
        finally:
            bar.close()
            self.close()
        return 0

    # ---- staying in sync with the swarm --------------------------------------------------------
    def _sync(self, outer_step: int) -> int | None:
        """Download the swarm's state when this peer is behind it or holds another θ at its step
        (see ``swarm.state.out_of_sync``); the new outer step, or None when nothing changed."""
        reason = None
        if self.rank == 0 and self.peer is not None and not self.stop:
            from p2p_trainer.swarm import SwarmError
            from p2p_trainer.swarm.state import out_of_sync

            try:
                records = self.peer.swarm_records()
                reason = out_of_sync(records, self.peer.peer_id, outer_step, self.params_sha256,
                                     check_hash=True)
            except (SwarmError, TimeoutError) as e:
                logger.warning("could not read the swarm's progress: %s", e)
            if self.resumed_step is not None:
                where = f"{reason}: downloading the swarm's state" if reason else "the swarm is not ahead"
                logger.info("resumed from the local checkpoint of outer step %d; %s", self.resumed_step,
                            where)
                self.resumed_step = None
            elif reason:
                logger.warning("out of sync with the swarm: %s; downloading its state", reason)
        if not self._broadcast_int(int(reason is not None)):
            return None
        download = None
        if self.rank == 0:
            download = self.peer.download_state(
                numel=self.n_params, want_inner=self.cfg.swarm.download_inner_state and self.world == 1,
                progress=self.cfg.log.progress_bar,
            )
            if download is None:
                logger.warning("no state downloaded: this peer trains on its own θ and tries again later")
        if not self._broadcast_int(int(download is not None)):
            return None
        return self._adopt(download)

    def _adopt(self, download) -> int:
        """Make a downloaded state ours (all ranks): θ, outer momentum and step, schedule position."""
        state = download.state if download is not None else None
        if self.rank == 0:
            self.diloco.load_state_dict(
                {"master": state.master, "momentum": state.momentum, "outer_step": state.outer_step}
            )
            self.params_sha256 = self.diloco.sha256()
        self.inner.import_params(self.diloco.master.detach() if self.diloco else None)
        outer_step = self._broadcast_int(state.outer_step if state else 0)
        inner_step = self._broadcast_int(state.inner_step if state else 0)
        self.inner.step_count = inner_step
        if state is not None and state.inner_optimizer is not None and self.world == 1:
            try:
                self.inner.load_state_dict({"optimizer": state.inner_optimizer, "step": inner_step})
            except (ValueError, KeyError, RuntimeError) as e:
                logger.warning("the donor's inner optimizer state does not fit (%s): keeping ours", e)
        self.catching_up = True
        if self.rank == 0:
            self.metrics.write("state_download", outer_step=outer_step, donor=download.donor,
                               params_sha256=self.params_sha256, bytes=download.nbytes,
                               seconds=download.seconds, inner_step=inner_step,
                               inner_optimizer=state.inner_optimizer is not None, failures=download.failures)
            self._publish_state(outer_step)
            self.peer.publish_progress(outer_step=outer_step, tokens=0, tokens_per_s=0.0, loss=None,
                                       params_sha256=self.params_sha256)
        return outer_step

    def _publish_state(self, outer_step: int) -> None:
        """Serve θ as of this outer step to peers that join or catch up (a snapshot: training goes on)."""
        if self.rank != 0 or self.peer is None or not self.params_sha256:
            return
        from p2p_trainer.swarm.state import TrainingState

        diloco = self.diloco.state_dict()  # copies
        inner = None
        if self.cfg.swarm.download_inner_state and self.world == 1:
            inner = copy.deepcopy(self.inner.optimizer.state_dict())
        self.peer.publish_state(TrainingState(outer_step, self.params_sha256, diloco["master"],
                                              diloco["momentum"], self.inner.step_count, inner))

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
                          "wait_s": result.wait_s, "excluded": result.excluded,
                          "total_weight": result.total_weight, "members": result.members,
                          "group_id": result.group_id}
            else:
                logger.warning("round %d failed: θ kept as it was; local progress carries into the next "
                               "round", outer_step)
                self.metrics.write("round_failed", outer_step=outer_step, reason=self.peer.last_error,
                                   allreduce_s=time.perf_counter() - t0)
        self.catching_up = False
        ok = self._broadcast_int(int(new_params is not None))
        if not ok:
            return outer_step
        self.inner.import_params(new_params)
        outer_step += 1
        if self.rank == 0:
            sha = self.params_sha256 = self.diloco.sha256()
            finite = bool(torch.isfinite(self.diloco.master).all())
            self.metrics.write("outer_step", outer_step=outer_step, loss=stats.loss_sum / max(1, stats.steps),
                               tokens=stats.tokens, inner_steps=stats.steps, params_sha256=sha,
                               params_finite=finite, **record)
            self._publish_state(outer_step)
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
            raise ConfigError(f"checkpoint {path} belongs to another run (its run fingerprint differs)")
        if self.diloco is not None:
            self.diloco.load_state_dict(state["diloco"])
            self.params_sha256 = self.diloco.sha256()
        self.inner.import_params(self.diloco.master.detach() if self.diloco else None)
        if state.get("inner") is not None and self.world == 1:
            self.inner.load_state_dict(state["inner"])
        self.data.load_state_dict(state["data"])
        self.resumed_step = int(state["outer_step"])
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
