"""Staying with the swarm: when this peer is behind it or holds another θ at its step, download the
swarm's state and make it ours on every local rank; and serve our own state to peers that need it.
"""

from __future__ import annotations

import logging
import time

from p2p_trainer.metrics import MetricsWriter
from p2p_trainer.outer_sync import OuterSync
from p2p_trainer.swarm import Download, SwarmError, SwarmPeer
from p2p_trainer.swarm.records import StepHorizon, out_of_sync

logger = logging.getLogger(__name__)


class CatchUp:
    """``swarm`` exists on the leader only (None on the other ranks)."""

    def __init__(
        self,
        outer: OuterSync,
        swarm: SwarmPeer | None,
        metrics: MetricsWriter,
        *,
        with_inner: bool,
        progress_bar: bool,
    ) -> None:
        self.outer, self.swarm, self.metrics = outer, swarm, metrics
        self.ranks = outer.ranks
        self.with_inner = with_inner  # the inner AdamW moments travel with θ (laid out like θ)
        self.progress_bar = progress_bar
        self.resumed_step: int | None = None  # set after a resume: the first check says how it went
        self.avoid: set[str] = set()  # θ hashes this peer found unusable (see ``guard``): never downloaded
        self.horizon = StepHorizon()  # how far ahead the swarm can plausibly be

    def check(self, outer_step: int) -> int | None:
        """On every rank: the outer step of the swarm's state once it is ours, or None when we are in
        sync (or nothing could be downloaded: then this peer goes on with its own θ)."""
        download = self._download_if_needed(outer_step) if self.ranks.leader else None
        if not self.ranks.share(download is not None):
            return None
        new_step, inner_step = self.outer.adopt(
            download.state if download is not None else None, with_inner=self.with_inner
        )
        if self.ranks.leader:
            download.state.discard()
            self.horizon.reached(new_step, time.monotonic(), by_round=False)
            self.metrics.write(
                "state_download",
                outer_step=new_step,
                donor=download.donor,
                params_sha256=self.outer.committed_sha256,
                bytes=download.nbytes,
                seconds=download.seconds,
                inner_step=inner_step,
                inner_optimizer=self.with_inner and download.state.has_inner,
                failures=download.failures,
            )
            self.serve()
            self.swarm.publish_progress(
                outer_step=new_step, tokens=0, tokens_per_s=0.0, loss=None, **self.outer.commitments()
            )
        return new_step

    def _download_if_needed(self, outer_step: int) -> Download | None:
        """Leader only: a verified download of the swarm's state when we need one, else None."""
        reason = None
        if self.horizon.step is None:
            self.horizon.reached(outer_step, time.monotonic(), by_round=False)
        max_step = self.horizon.max_step(time.monotonic())
        try:
            records = self.swarm.swarm_records()
            sha = self.outer.committed_sha256
            reason = out_of_sync(
                records, self.swarm.peer_id, outer_step, sha, check_hash=True, max_step=max_step
            )
        except (SwarmError, TimeoutError) as e:
            logger.warning("could not read the swarm's progress: %s", e)
        if self.resumed_step is not None:
            where = f"{reason}: downloading the swarm's state" if reason else "the swarm is not ahead"
            logger.info("resumed from the local checkpoint of outer step %d; %s", self.resumed_step, where)
            self.resumed_step = None
        elif reason:
            logger.warning("out of sync with the swarm: %s; downloading its state", reason)
        if reason is None:
            return None
        download = self.swarm.download_state(
            numel=self.outer.state.numel,
            want_inner=self.with_inner,
            progress=self.progress_bar,
            avoid=self.avoid,
            max_step=max_step,
        )
        if download is None:
            logger.warning("no state downloaded: this peer trains on its own θ and tries again later")
        return download

    def advanced(self, outer_step: int) -> None:
        """Leader: a round of ours took us to ``outer_step`` (how fast rounds go bounds what we believe)."""
        self.horizon.reached(outer_step, time.monotonic(), by_round=True)

    def serve(self) -> None:
        """Leader only: serve θ as of our last outer step to peers that join or catch up (read live
        while training goes on). Nothing before the first outer step or download: a fresh θ is no
        state."""
        if self.swarm is None or not self.outer.committed_sha256:
            return
        self.swarm.publish_state(self.outer.source(with_inner=self.with_inner))
