"""One peer's outer state spread over its local ranks, and rank 0's view of it whole.

Each rank holds its share (see ``shards``) of θ's fp32 master copy and of the outer momentum: 8
bytes per value it holds, on the CPU (pinned with CUDA), and nothing of the other ranks'. Only what
a mode needs comes on top: error feedback's residual and what the codec sent (4 + 4 bytes), and an
overlapped round's snapshot of the pseudo-gradient (4 bytes). Rank 0 sees the
canonical vector one window at a time through the ``pump``: the all-reduce reads our part of a
window (computed where it lives, θ minus the model's own rows), the averaged pseudo-gradient goes
back window by window and every rank takes the outer step on its values, hashes and the states
served, downloaded and checkpointed stream the same way. So the swarm, the hashes and the files see
one vector however many ranks a peer has, and no rank ever holds all of it.

Every change to θ or the momentum happens while rank 0 holds ``lock`` (rank 0 drives every change:
through the pump, or with the other ranks in step with it), so what rank 0 reads under the lock is
one consistent state; ``version`` tells a reader that started earlier that the state moved on.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

import torch

from p2p_trainer.config import OuterConfig
from p2p_trainer.contracts import stream_sha256
from p2p_trainer.diloco import DiLoCo
from p2p_trainer.inner import InnerLoop
from p2p_trainer.pump import Pump
from p2p_trainer.ranks import LocalRanks
from p2p_trainer.shards import Layout, gather_share, local_views, read_views, scatter_share
from p2p_trainer.swarm import StateFile, StateMoved
from p2p_trainer.swarm.state_format import STEPS, WINDOW
from p2p_trainer.swarm.state_format import write as write_state

logger = logging.getLogger(__name__)

MOMENTS = ("inner.exp_avg", "inner.exp_avg_sq")


class OuterState:
    def __init__(
        self, ranks: LocalRanks, inner: InnerLoop, cfg: OuterConfig, *, error_feedback: bool
    ) -> None:
        self.ranks, self.inner, self.error_feedback = ranks, inner, error_feedback
        self.ef_decay = cfg.ef_decay  # the share of the residual that joins the next part
        params = list(inner.model.parameters())
        self.layout = Layout.of(params, ranks.world)
        self.numel = self.layout.numel
        mine = torch.empty(self.layout.share_numel[ranks.rank])
        self.diloco = DiLoCo(gather_share(self.layout, ranks.rank, local_views(params), mine), cfg,
                             pin=ranks.device.type == "cuda")  # fmt: skip
        self.residual: torch.Tensor | None = None  # what the codec has not sent yet (error feedback)
        self.sent: torch.Tensor | None = None  # what our part of the round in progress decodes to
        self.returning: torch.Tensor | None = None  # ``sent`` of the round whose average is being applied
        self.part: torch.Tensor | None = None  # an overlapped round's part (None: computed when read)
        self.delta: torch.Tensor | None = None  # our latest pseudo-gradient (overlap)
        self.carried = 0.0  # eager: the share of ``delta`` the model started this phase with
        self.lock = threading.RLock()
        self.version = 0
        self.pump = self._pump()
        self._good: Path | None = None  # where this rank keeps the last outer state that trained

    def _pump(self) -> Pump:
        pump = Pump(self.layout, self.ranks.rank, self.ranks.world)
        d = self.diloco
        pump.provide("master", read=lambda a, b: d.master[a:b].clone(), write=self._write_master)
        pump.provide("momentum", read=lambda a, b: d.momentum[a:b].clone(), write=self._write_momentum)
        pump.provide("residual", read=lambda a, b: self._residual(a, b), write=self._write_residual)
        pump.provide("part", read=self._read_part)
        pump.provide("sent", write=self._write_sent)
        pump.provide("apply", write=self._apply_window)
        for name in MOMENTS:
            pump.provide(name, read=self._moment_reader(name), write=self._moment_writer(name))
        pump.provide("end_step", call=lambda _: self._end_step(d.end_step))
        pump.provide("skip", call=lambda _: self._end_step(d.skip))
        pump.provide("ef_blocking", call=lambda _: self._ef_blocking())
        pump.provide("ef_overlap", call=lambda ok: self._ef_overlap(bool(ok)))
        pump.provide("snapshot", call=lambda _: self._snapshot())
        return pump.start()

    def nbytes(self) -> int:
        """Bytes of outer state this rank holds now (its shares of θ, the momentum and whatever
        the mode keeps beside them)."""
        d = self.diloco
        held = (d.master, d.momentum, self.residual, self.sent, self.returning, self.part, self.delta)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def close(self) -> None:
        self.pump.close()
        if self._good is not None:
            self._good.unlink(missing_ok=True)

    # ---- every rank's own values ----
    def _model_views(self) -> list[torch.Tensor]:
        return local_views(self.inner.model.parameters())

    def _pseudo_gradient(self) -> torch.Tensor:
        mine = torch.empty_like(self.diloco.master)
        return self.diloco.master - gather_share(self.layout, self.ranks.rank, self._model_views(), mine)

    def _read_part(self, a: int, b: int) -> torch.Tensor:
        if self.part is not None:
            return self.part[a:b].clone()
        part = self.diloco.master[a:b] - read_views(self.layout, self.ranks.rank, self._model_views(), a, b)
        return part.add_(self.residual[a:b], alpha=self.ef_decay) if self.residual is not None else part

    def _residual(self, a: int, b: int) -> torch.Tensor:
        return self.residual[a:b].clone() if self.residual is not None else torch.zeros(b - a)

    def _write_master(self, a: int, b: int, values: torch.Tensor) -> None:
        self.diloco.master[a:b] = values

    def _write_momentum(self, a: int, b: int, values: torch.Tensor) -> None:
        if self.diloco.momentum is None:
            self.diloco.momentum = torch.zeros_like(self.diloco.master)
        self.diloco.momentum[a:b] = values

    def _write_residual(self, a: int, b: int, values: torch.Tensor) -> None:
        if self.residual is None:
            self.residual = torch.zeros_like(self.diloco.master)
        self.residual[a:b] = values

    def _write_sent(self, a: int, b: int, values: torch.Tensor) -> None:
        if self.sent is None:
            self.sent = torch.zeros_like(self.diloco.master)
        self.sent[a:b] = values

    def _ef_blocking(self) -> None:
        """A blocking round went through: what our part did not send is the new residual (our part
        is read again: nothing has moved since the round read it)."""
        self.residual = self._read_part(0, self.diloco.master.numel()) - self.sent
        self.returning, self.sent = self.sent, None

    def _ef_overlap(self, ok: bool) -> None:
        """An overlapped round ended: its part's unsent rest, or (failed) all of it, carries over
        (beside what the last applied average gave back, see ``_apply_window``)."""
        rest = self.part - self.sent if ok and self.sent is not None else self.part
        self.residual = rest if self.residual is None else self.residual.add_(rest)
        self.returning, self.sent = (self.sent if ok else None), None

    def _apply_window(self, a: int, b: int, averaged: torch.Tensor) -> None:
        """The outer step on ``[a, b)``; with error feedback, what we sent where the average is zero
        comes back into the residual. The reducer of a sparse slice keeps the top-k of the average,
        so what it drops would otherwise leave the model: each member takes back its own share of
        it (the members' residuals hold all of it, weighted as the average is)."""
        self.diloco.apply_window(a, b, averaged)
        if self.returning is not None:
            back = torch.where(averaged == 0, self.returning[a:b], 0.0)
            if self.residual is None:
                self.residual = torch.zeros_like(self.diloco.master)
            self.residual[a:b] += back

    def _end_step(self, step) -> None:
        step()
        self.returning = None

    def _snapshot(self) -> None:
        """An overlapped round starts: our pseudo-gradient (and the residual) as its part. It is
        this phase's own progress, from where the phase started: with eager updates that was θ
        minus a share of the last pseudo-gradient (``to_model``), which is not sent twice."""
        delta = self._pseudo_gradient()
        if self.carried and self.delta is not None:
            delta.sub_(self.delta, alpha=self.carried)
        self.delta, self.carried = delta, 0.0
        if self.error_feedback and self.residual is not None:
            self.part, self.residual = torch.add(self.delta, self.residual, alpha=self.ef_decay), None
        else:
            self.part = self.delta

    # ---- the inner AdamW moments, laid out like θ ----
    def _moment_views(self, name: str, create: bool) -> list[torch.Tensor]:
        key = name.removeprefix("inner.")
        views = []
        for p in self.inner.model.parameters():
            state = self.inner.optimizer.state[p]
            if key not in state:
                if not create:
                    views.append(None)
                    continue
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            views.extend(local_views([state[key]]))
        return views

    def _moment_reader(self, name: str):
        def read(a: int, b: int) -> torch.Tensor:
            views = self._moment_views(name, create=False)
            model = self._model_views()
            views = [v if v is not None else torch.zeros_like(m) for v, m in zip(views, model, strict=True)]
            return read_views(self.layout, self.ranks.rank, views, a, b)

        return read

    def _moment_writer(self, name: str):
        def write(a: int, b: int, values: torch.Tensor) -> None:
            views = self._moment_views(name, create=True)
            for piece in self.layout.own(self.ranks.rank):
                start, end = max(a, piece.share), min(b, piece.share + piece.length)
                if start < end:
                    target = views[piece.param][start - piece.share : end - piece.share]
                    target.copy_(values[start - a : end - a])

        return write

    def has_moments(self) -> bool:
        return any(len(self.inner.optimizer.state.get(p, {})) for p in self.inner.model.parameters())

    def moment_steps(self) -> torch.Tensor:
        """AdamW's step count of every parameter tensor (the same on every rank)."""
        steps = []
        for p in self.inner.model.parameters():
            step = self.inner.optimizer.state.get(p, {}).get("step")
            steps.append(float(step) if step is not None else 0.0)
        return torch.tensor(steps, dtype=torch.float32)

    def _load_steps(self, steps: torch.Tensor) -> None:
        for p, value in zip(self.inner.model.parameters(), steps.tolist(), strict=True):
            state = self.inner.optimizer.state[p]
            if "step" in state:
                state["step"].fill_(value)
            else:
                fused = any(g.get("fused") or g.get("capturable") for g in self.inner.optimizer.param_groups)
                state["step"] = torch.tensor(value, dtype=torch.float32, device=p.device if fused else None)

    # ---- rank 0: the whole vector, window by window ----
    def commit(self) -> bool:
        """Rank 0: hash θ and the momentum as they are now (a stream over all ranks); whether θ is
        finite."""
        d = self.diloco
        if self.ranks.world == 1:
            d.commit()
            return bool(torch.isfinite(d.master).all())
        finite = [True]

        def checked(windows):
            for window in windows:
                finite[0] = finite[0] and bool(torch.isfinite(window).all())
                yield window

        params = stream_sha256(checked(self._windows("master")))
        momentum = stream_sha256(self._windows("momentum")) if self._started() else None
        d.commit(params, momentum)
        return finite[0]

    def _started(self) -> bool:
        return self.diloco.started  # every rank's flag moves in step (``end_step``)

    def _windows(self, name: str):
        for lo in range(0, self.numel, WINDOW):
            yield self.pump.read(name, lo, min(lo + WINDOW, self.numel))

    def entries(self, *, with_inner: bool, with_residual: bool = False) -> list[tuple[str, int]]:
        names = ["master"] + (["momentum"] if self._started() else [])
        names += ["residual"] if with_residual and self.error_feedback else []
        names += list(MOMENTS) if with_inner and self.has_moments() else []
        found = [(name, self.numel) for name in names]
        return found + ([(STEPS, len(self.layout.shapes))] if with_inner and self.has_moments() else [])

    def read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        if name == STEPS:
            return self.moment_steps()[lo:hi]
        return self.pump.read(name, lo, hi)

    def write_file(self, f: BinaryIO, metadata: dict[str, str], *, with_inner: bool) -> str:
        """Rank 0: the whole outer state (and residual, and moments) as a state file into ``f``."""
        with self.lock:
            entries = self.entries(with_inner=with_inner, with_residual=True)
            return write_state(f, entries, metadata, self.read)

    def source(self, inner_step: int, *, with_inner: bool) -> LiveState:
        return LiveState(self, inner_step, with_inner)

    # ---- every rank, in step ----
    def load(self, file: StateFile | None, *, inner: bool, residual: bool) -> None:
        """Every rank (rank 0 holding ``lock``): our values of θ, the momentum and, if asked for
        and present, the residual and the inner moments, from ``file`` (each rank reads its own)."""
        d, rank = self.diloco, self.ranks.rank
        self._read_own(file, "master", self._write_master)
        d.momentum = None
        if file.has("momentum"):
            self._read_own(file, "momentum", self._write_momentum)
        d.started, d.outer_step = file.has("momentum"), file.outer_step
        # an overlapped round still in flight keeps reading its part; it is never applied
        self.residual = self.delta = self.sent = self.returning = None
        if residual and self.error_feedback and file.has("residual"):
            self._read_own(file, "residual", self._write_residual)
        if inner and file.has_inner:
            for name in MOMENTS:
                self._read_own(file, name, self._moment_writer(name))
            self._load_steps(file.read(STEPS, 0, file.length(STEPS)))
        if rank == 0:
            self.version += 1

    def _read_own(self, file: StateFile, name: str, write) -> None:
        for piece in self.layout.own(self.ranks.rank):
            for off in range(0, piece.length, WINDOW):
                n = min(WINDOW, piece.length - off)
                write(
                    piece.share + off,
                    piece.share + off + n,
                    file.read(name, piece.canon + off, piece.canon + off + n),
                )

    def to_model(self, eager: float = 0.0) -> None:
        """Every rank: θ into this rank's rows of the model; with ``eager``, θ moved on by that
        share of our pseudo-gradient in flight (the next snapshot measures from there)."""
        source = self.diloco.master
        self.carried = eager if self.delta is not None else 0.0
        if self.carried:
            source = source - self.carried * self.delta
        scatter_share(self.layout, self.ranks.rank, source, self._model_views())

    # ---- the last outer state that trained (see ``guard``): on disk, not in memory ----
    def keep_good(self) -> None:
        """Every rank: keep a copy of our values of θ and the momentum, to go back to."""
        if self._good is None:
            self._good = Path(tempfile.mkstemp(prefix=f"p2p-trainer-good-r{self.ranks.rank}-")[1])
        torch.save(self.diloco.state_dict(), self._good)

    def back_to_good(self) -> int | None:
        """Every rank: back to the kept copy; its outer step (None when there is none)."""
        if self._good is None:
            return None
        self.diloco.load_state_dict(torch.load(self._good, weights_only=True))
        self.residual = self.part = self.delta = self.sent = self.returning = None
        if self.ranks.leader:
            self.version += 1
        return self.diloco.outer_step


class LiveState:
    """Rank 0: what a donor serves, read from the live outer state (see ``swarm.state``); it stops
    (StateMoved) once the state changes. The inner moments are read as they are at that moment
    (a warm start for the downloader, not part of the state the swarm agreed on)."""

    def __init__(self, state: OuterState, inner_step: int, with_inner: bool) -> None:
        self._state, self._version = state, state.version
        self.outer_step = state.diloco.outer_step
        self.params_sha256 = state.diloco.committed_sha256
        self.inner_step, self._with_inner = inner_step, with_inner

    def entries(self, with_inner: bool) -> list[tuple[str, int]]:
        return self._state.entries(with_inner=with_inner and self._with_inner)

    def read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        with self._state.lock:
            if self._state.version != self._version:
                raise StateMoved(f"the state of outer step {self.outer_step} changed")
            return self._state.read(name, lo, hi)
