"""The commit phase of a round, member side: our seals and re-check findings go to every full
member (the witnesses), theirs come back, and the round fails unless every member holds the same
averages. What the messages prove is ``verify``; the witness side is ``ReducerService``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from hivemind.p2p import P2P, PeerID

from p2p_trainer.codec import Codec
from p2p_trainer.swarm import wire
from p2p_trainer.swarm.errors import RoundFailed
from p2p_trainer.swarm.messages import Accusation, CommitPost, CommitReply, Seal
from p2p_trainer.swarm.reducer import ReducerService, expected_commits
from p2p_trainer.swarm.takeover import RoundState
from p2p_trainer.swarm.verify import Signer, verdict

logger = logging.getLogger(__name__)


class CommitPhase:
    def __init__(
        self,
        p2p: P2P,
        service: ReducerService,
        signer: Signer,
        *,
        peer_id: str,
        commit_timeout: float,
        check: tuple[Codec, str, float],
        ban: Callable[[str, str], None],
        read_keys: Callable[[], Awaitable[object]] | None,
    ) -> None:
        self._p2p, self.service, self.signer, self.peer_id = p2p, service, signer, peer_id
        self.commit_timeout = commit_timeout
        self._check = check  # (codec, aggregation, tau): how a re-check recomputes a slice
        self._ban, self._read_keys = ban, read_keys

    async def run(self, state: RoundState, failure: BaseException | None) -> None:
        """Post our seals (and findings) to every full member, read theirs back, and raise
        RoundFailed unless every member holds the same averages (see ``verify``)."""
        group, step = state.group, state.group.outer_step
        seals = []
        for index, answer in state.final.items():
            if answer.complete and answer.trailer.signature:
                seals.append(
                    Seal(
                        slice=index,
                        reducer=answer.server,
                        digest=answer.trailer.digest,
                        signature=answer.trailer.signature,
                    )
                )
        accusations = await self._rechecks(state) if failure is None else []
        post = CommitPost(group_id=group.group_id, seals=seals, accusations=accusations)
        witnesses = [r for r in group.reducers if r not in state.lost]
        replies = await asyncio.gather(
            *(self._post(state, w, post) for w in witnesses), return_exceptions=True
        )
        if failure is not None:
            raise failure if isinstance(failure, RoundFailed) else RoundFailed(repr(failure))
        await self.know(*group.reducers)
        why, liars = verdict(group, self.signer, seals, [r for r in replies if isinstance(r, CommitReply)])
        for liar in liars:
            self._ban(liar, f"it sent different averages of one slice to different members in round {step}")
        if why:
            raise RoundFailed(f"round {step}: {why}")

    async def know(self, *peer_ids: str) -> None:
        """Read the records again when a signer's key is not known yet, before judging its seal."""
        if self._read_keys is not None and not all(self.signer.knows(p) for p in peer_ids):
            await self._read_keys()

    async def _post(self, state: RoundState, witness: str, post: CommitPost) -> CommitReply:
        if witness == self.peer_id:
            state.pool.add(self.peer_id, post)
            await state.pool.wait(expected_commits(state), time.monotonic() + self.commit_timeout)
            return state.pool.reply()
        _, reader, writer = await self._p2p.call_binary_stream_handler(
            PeerID.from_base58(witness), self.service.commit_handler
        )
        try:
            await wire.send_message(writer, post, state.traffic)
            wait = self.commit_timeout + 5.0
            return await asyncio.wait_for(wire.recv_message(reader, (CommitReply,), state.traffic), wait)
        finally:
            await wire.close(writer)

    async def _rechecks(self, state: RoundState) -> list[Accusation]:
        """Our findings on the slices we re-check: the reducer's average against its parts."""
        found = []
        for index, buffer in state.checks.items():
            answer = state.answer(index).result()
            reducer = state.group.reducers[index]
            if not answer.complete or answer.server != reducer:
                continue  # taken over or failed: nothing to hold the reducer to
            used = [m.peer_id for m in state.group.members if m.peer_id not in answer.trailer.excluded]
            await buffer.settle(used, time.monotonic() + self.commit_timeout)
            why = await asyncio.get_running_loop().run_in_executor(
                None, buffer.mismatch, *self._check, answer.trailer, answer.chunks
            )
            if why:
                logger.warning(f"round {state.group.outer_step}: reducer {reducer} of slice {index}: {why}")
                found.append(self.signer.accuse(state.group.group_id, index, reducer, why))
        return found
