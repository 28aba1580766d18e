"""One peer's life: build the parts from the config, then loop: an inner round, the outer sync, log
and checkpoint. Each part is built here, in one place, and handed what it needs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist
from hivemind.utils import get_dht_time
from tqdm import tqdm

from p2p_trainer import checkpoint
from p2p_trainer.catch_up import CatchUp
from p2p_trainer.config import SPARSE_EF_DECAY, SPARSE_OUTER, Config, ConfigError
from p2p_trainer.contracts import run_fingerprint
from p2p_trainer.data import TokenStream, build_tokenizer, eval_batches, tokenizer_sha256
from p2p_trainer.guard import FiniteGuard, Outcome
from p2p_trainer.inner import InnerLoop, StepStats, init_distributed
from p2p_trainer.metrics import MetricsWriter
from p2p_trainer.model import build_model
from p2p_trainer.outer_sync import OuterSync, RoundReport
from p2p_trainer.ranks import LocalRanks, follow_agent
from p2p_trainer.swarm import SwarmPeer
from p2p_trainer.swarm.records import round_is_late, round_should_close
from p2p_trainer.swarm.state_format import StateFormatError

logger = logging.getLogger(__name__)

SwarmFactory = Callable[..., SwarmPeer]  # (SwarmConfig, fingerprint) -> a started peer
InnerFactory = Callable[..., InnerLoop]  # InnerLoop's signature


def peer_seed(peer_id: str) -> int:
    return int(hashlib.sha256(peer_id.encode()).hexdigest()[:8], 16)


_ECHO_S = 1.0  # a second stop signal within this long is the first one again


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop leaves at the next safe point and shuts down cleanly.
    Callbacks registered with ``on_stop`` (the swarm peer's ``interrupt``) run in the handler, so a
    blocking swarm call in progress gives up instead of waiting out its timeout."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.abort_now = False  # set while joining the swarm (which retries for up to join_timeout)
        self._first = 0.0
        self._callbacks: list = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handle)

    def on_stop(self, callback) -> None:
        self._callbacks.append(callback)
        if self.event.is_set():  # the signal came first (e.g. while the swarm node was starting)
            callback()

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() and time.monotonic() - self._first < _ECHO_S:
            return  # the same stop twice (Ctrl+C reaches a torchrun worker, which its agent forwards)
        if self.event.is_set() or self.abort_now:
            raise KeyboardInterrupt  # the CLI exits 0; the swarm peer being built cleans up after itself
        logger.info("received signal %d: finishing cleanly", signum)
        self._first = time.monotonic()
        self.set()

    def set(self) -> None:
        self.event.set()
        for callback in self._callbacks:
            callback()

    def __bool__(self) -> bool:
        return self.event.is_set()


@dataclass
class RoundStats:
    started: float
    steps: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    rolled_back: int | None = None  # the outer step we went back to (see ``guard``)

    def add(self, step: StepStats) -> None:
        self.steps += 1
        self.tokens += step.tokens
        self.loss_sum += step.loss

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.steps)

    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.started)


class Trainer:
    """The parts of one peer, wired together; ``run()`` is the loop.

    Test seams: ``swarm_factory`` builds the swarm peer (e.g. one with a fault hook), ``inner_factory``
    the inner loop (e.g. a slower one)."""

    def __init__(
        self,
        cfg: Config,
        *,
        max_outer_steps: int | None = None,
        swarm_factory: SwarmFactory | None = None,
        inner_factory: InnerFactory | None = None,
    ):
        self.cfg, self.max_outer_steps = cfg, max_outer_steps
        self.stop = StopFlag()
        tokenizer = build_tokenizer(cfg.data)
        self.fingerprint = run_fingerprint(cfg, tokenizer_sha256(tokenizer), len(tokenizer))
        # the swarm's daemons fork before CUDA is initialised (hivemind needs the fork start method)
        self.swarm = self._join(swarm_factory or SwarmPeer) if int(os.environ.get("RANK", "0")) == 0 else None
        try:
            self._build(cfg, tokenizer, inner_factory or InnerLoop)
        except BaseException:  # a bad checkpoint, Ctrl+C, ...: our swarm node must not outlive us
            if self.swarm is not None:
                self.swarm.shutdown()
            raise

    def _join(self, factory: SwarmFactory) -> SwarmPeer:
        if self.stop:
            raise KeyboardInterrupt  # asked to stop before we even joined
        self.stop.abort_now = True
        try:
            swarm = factory(self.cfg.swarm, self.fingerprint)
        finally:
            self.stop.abort_now = False
        self.stop.on_stop(swarm.interrupt)
        return swarm

    def _build(self, cfg: Config, tokenizer, inner_factory: InnerFactory) -> None:
        """Everything but the swarm node (which must fork before CUDA starts)."""
        self.ranks = ranks = LocalRanks(*init_distributed())
        if ranks.world > 1:
            follow_agent(self.stop.set)
        model = build_model(cfg.model, len(tokenizer), seed=cfg.inner.seed, device=ranks.device)
        self.inner = inner_factory(
            model,
            cfg.inner,
            cfg.data.micro_batch_size,
            rank=ranks.rank,
            world=ranks.world,
            device=ranks.device,
        )
        seed = ranks.share(peer_seed(self.swarm.peer_id) if self.swarm else None)
        self.data = TokenStream(cfg.data, tokenizer, cfg.model.seq_len, peer_seed=seed)
        self.eval_data = eval_batches(cfg.data, tokenizer, cfg.model.seq_len)
        self.metrics = MetricsWriter(cfg.log.metrics if ranks.leader else None)
        error_feedback = cfg.outer.error_feedback == "on" or (
            cfg.outer.error_feedback == "auto" and cfg.swarm.codec == "sparse"
        )
        chosen = (*SPARSE_OUTER, SPARSE_EF_DECAY)
        if cfg.swarm.codec == "sparse" and (cfg.outer.lr, cfg.outer.momentum, cfg.outer.ef_decay) != chosen:
            logger.info(
                "sparse codec with outer lr %g, momentum %g, ef_decay %g: it did best with --outer.lr %g "
                "--outer.momentum %g --outer.ef_decay %g (bench/notes/paired.md)",
                cfg.outer.lr, cfg.outer.momentum, cfg.outer.ef_decay, *chosen,
            )  # fmt: skip
        self.outer = OuterSync(ranks, self.inner, self.swarm, cfg.outer, error_feedback=error_feedback)
        self.catch_up = CatchUp(
            self.outer,
            self.swarm,
            self.metrics,
            with_inner=cfg.swarm.download_inner_state,
            progress_bar=cfg.log.progress_bar,
        )
        self.guard = FiniteGuard(self.outer, self.catch_up)
        if cfg.checkpoint.resume and cfg.checkpoint.dir:
            self._resume()

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        bar = tqdm(desc="train", unit="step", disable=not self.ranks.leader or not self.cfg.log.progress_bar)
        try:
            step = self.outer.outer_step
            # a late joiner (or a peer resuming behind the swarm) starts from the swarm's state
            caught_up = self.catch_up.check(step) if not self._stopping() else None
            catching_up = caught_up is not None
            step = caught_up if catching_up else step
            if self.ranks.leader:
                self.catch_up.serve()
            if self.cfg.log.eval_every and not self._stopping():
                self._log_eval(step)
            while not self._stopping() and (self.max_outer_steps is None or step < self.max_outer_steps):
                stats = self._inner_round(step, catching_up, bar)
                if self._stopping():
                    break  # leaving: a round now would make the others wait for us in matchmaking
                if stats.rolled_back is not None:  # θ did not train: we went back to one that did
                    step, catching_up = stats.rolled_back, False
                    self._announce(step, 0, 0.0, None)
                    continue
                caught_up = self.catch_up.check(step)
                if caught_up is not None:  # we were behind or diverged: this round's work is dropped
                    step, catching_up = caught_up, True
                    continue
                last = self.max_outer_steps is not None and step + 1 >= self.max_outer_steps
                report = self.outer.sync(step, float(stats.tokens), last=last)
                catching_up = False
                if report.advanced:
                    step += 1
                self._log_round(step, stats, report)
                if report.advanced:
                    self._after_outer_step(step, stats)
            self._report_memory()
            self.outer.close()  # every rank is here: the pump's threads end
        finally:
            bar.close()
            self.close()
        return 0

    def _report_memory(self) -> None:
        """Every rank: its share of the outer state and its peak resident memory (``make bench``'s
        memory benchmark reads these lines)."""
        state, rank, world = self.outer.state, self.ranks.rank, self.ranks.world
        share = state.layout.share_numel[rank]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        logger.info(f"memory: rank {rank} of {world} holds {share} of {state.numel} values, outer state "
                    f"{state.nbytes()} bytes, peak RSS {peak} bytes")  # fmt: skip

    def _stopping(self) -> bool:
        """Whether to leave now: the leader's answer on every rank (each rank gets the signal at its
        own moment; they must leave the loop at the same point)."""
        return self.ranks.on_leader(lambda: bool(self.stop))

    def _inner_round(self, step: int, catching_up: bool, bar: tqdm) -> RoundStats:
        stats = RoundStats(started=time.perf_counter())
        while not self._round_closed(stats, step, catching_up):
            t0 = time.perf_counter()
            out = self.inner.step(self.data.next_batch())
            outcome = self.guard.after_step(out.loss, step)
            if outcome is Outcome.RESTARTED:
                stats = RoundStats(started=stats.started)  # the steps so far are not in θ any more
                continue
            if outcome is Outcome.ROLLED_BACK:
                stats.rolled_back = self.outer.outer_step
                return stats
            stats.add(out)
            tok_s = out.tokens / (time.perf_counter() - t0)
            self.metrics.write(
                "inner_step",
                step=self.inner.step_count,
                loss=out.loss,
                lr=out.lr,
                tokens_per_s=tok_s,
                outer_step=step,
            )
            bar.update()
            bar.set_postfix(loss=f"{out.loss:.3f}", tok_s=f"{tok_s:.0f}", outer=step)
            if stats.steps % 5 == 1:
                self._announce(step, stats.tokens, stats.tokens_per_s(), out.loss)
        return stats

    def _round_closed(self, stats: RoundStats, step: int, catching_up: bool) -> bool:
        """The leader decides from the swarm's records (see ``swarm.records``); every rank follows."""

        def closed() -> bool:
            if self.stop:
                return True
            swarm = self.cfg.swarm
            rest = self.swarm.recent_records()
            if swarm.round_tokens:
                return round_should_close(
                    rest,
                    step,
                    local_tokens=stats.tokens,
                    target=swarm.round_tokens,
                    now=get_dht_time(),
                    ttl=self.swarm.record_ttl,
                )
            if stats.steps >= self.cfg.inner.steps_per_round:
                return True
            # the swarm moved on without us, or (catching up) everyone else waits for us
            return stats.steps > 0 and round_is_late(rest, step, catching_up=catching_up)

        return self.ranks.on_leader(closed)

    def _announce(self, step: int, tokens: int, tokens_per_s: float, loss: float | None) -> None:
        """Leader only (a no-op elsewhere): our progress record."""
        if self.swarm is not None:
            ours = self.outer.commitments()  # our θ and state hashes, our schedule position
            self.swarm.publish_progress(outer_step=step, tokens=tokens, tokens_per_s=tokens_per_s, loss=loss,
                                        **ours)  # fmt: skip

    def _log_round(self, step: int, stats: RoundStats, report: RoundReport) -> None:
        if report.applied:
            self.metrics.write(
                "outer_step",
                outer_step=step,
                loss=stats.loss,
                tokens=stats.tokens,
                inner_steps=stats.steps,
                params_sha256=report.params_sha256,
                params_finite=report.params_finite,
                **report.metrics,
            )
        elif report.error:
            carries = "into the next round" if not report.advanced else "nowhere: that round is lost"
            logger.warning("round %d failed: θ kept as it was; local progress carries %s", step, carries)
            self.metrics.write("round_failed", outer_step=step, reason=report.error, **report.metrics)

    def _after_outer_step(self, step: int, stats: RoundStats) -> None:
        if self.ranks.leader:
            self.catch_up.advanced(step)
            self.catch_up.serve()
            self._announce(step, 0, stats.tokens_per_s(), stats.loss)
        if self.cfg.log.eval_every and step % self.cfg.log.eval_every == 0:
            self._log_eval(step)
        if self.ranks.leader and self.cfg.checkpoint.dir and step % self.cfg.checkpoint.every == 0:
            self._save(step)

    def _log_eval(self, step: int) -> None:
        loss = self.inner.evaluate(self.eval_data)  # a collective
        if self.ranks.leader:
            self.metrics.write("eval", outer_step=step, eval_loss=loss)
            logger.info("outer step %d: held-out loss %.4f", step, loss)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _save(self, step: int) -> None:
        """Leader: a checkpoint of this outer step (the other ranks' values stream through the pump)."""
        extra = checkpoint.run_metadata(self.data.state_dict(), self.cfg.to_dict(), self.fingerprint)
        keep = self.cfg.checkpoint.keep
        checkpoint.save_checkpoint(
            self.cfg.checkpoint.dir, step, lambda f: self.outer.write_checkpoint(f, extra), keep=keep
        )

    def _resume(self) -> None:
        """On every rank: continue from the latest checkpoint, whatever number of ranks wrote it."""
        path = checkpoint.latest_checkpoint(self.cfg.checkpoint.dir)
        if path is None:
            logger.info("no checkpoint in %s: starting fresh", self.cfg.checkpoint.dir)
            return
        try:
            file = checkpoint.open_checkpoint(path, self.outer.state.numel)
            if self.ranks.leader:
                file.verify()  # every value finite; its hashes are what we publish
        except StateFormatError as e:
            raise ConfigError(f"checkpoint {path} is unreadable: {e}") from None
        try:
            if checkpoint.extra(file, "fingerprint") != json.loads(json.dumps(self.fingerprint)):
                raise ConfigError(f"checkpoint {path} belongs to another run (its run fingerprint differs)")
            theta = self.outer.restore(file if self.ranks.leader else None)
            self.data.load_state_dict(checkpoint.extra(file, "data"))
        except StateFormatError as e:
            raise ConfigError(f"checkpoint {path} is unreadable: {e}") from None
        finally:
            file.close()
        self.catch_up.resumed_step = file.outer_step
        if self.ranks.leader:
            where = f"outer step {file.outer_step}, θ {theta[:12]}, on {self.ranks.world} rank(s)"
            logger.info("resumed from %s (%s)", path, where)

    def close(self) -> None:
        self.metrics.close()
        if self.swarm is not None:
            self.swarm.shutdown()
            self.swarm = None
        if dist.is_initialized():
            dist.destroy_process_group()


def train(
    cfg: Config,
    max_outer_steps: int | None = None,
    *,
    swarm_factory: SwarmFactory | None = None,
    inner_factory: InnerFactory | None = None,
) -> int:
    logging.basicConfig(level=cfg.log.level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(
        cfg, max_outer_steps=max_outer_steps, swarm_factory=swarm_factory, inner_factory=inner_factory
    )
    if trainer.swarm is not None:
        for maddr in trainer.swarm.visible_maddrs:
            print(f"peer address: {maddr}", flush=True)
        logger.info("run fingerprint %s", json.dumps(trainer.fingerprint, sort_keys=True)[:200])
    return trainer.run()
