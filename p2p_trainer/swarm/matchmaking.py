"""Group formation for one round: every member must end up with the same ordered member list.

The leader of outer step ``s`` is the full (non-client) peer with the smallest peer id among the
live progress records at step ``s`` (and ourselves). Members send it a join request over a stream
they open; it waits until every live peer at step ``s`` has joined (or the group reached
``target_group_size``, or the stragglers' deadline passed), freezes the group and sends every member
the same list. The stragglers' deadline follows the swarm (see ``deadlines``): a little longer than
the last joiners of recent lobbies took, never longer than ``matchmaking_timeout``, which alone
bounds the wait for ``min_group_size`` and for the swarm to reach the step. A leader that learns of a
smaller full peer redirects its joiners there; redirects only ever go to smaller ids, so they cannot
loop.

Joiners are untrusted. A leader leads only a step it is at itself, admits only peers whose live,
signed progress record says they are at that step and in that mode, keeps one lobby per (step,
vector size) for joiners of its own run (the fingerprint hash must match), freezes a group only
once the swarm (the median record) has reached that step, and believes a claim that another
leader was skipped only when it saw that leader fail too. A leader that does not answer within
the matchmaking timeout is remembered and skipped for ``_SKIP_ROUNDS`` rounds, so a stalling or
squatting peer costs the others at most one round.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from hivemind.p2p import P2P, PeerID

from p2p_trainer.swarm import deadlines, messages, wire
from p2p_trainer.swarm.errors import RoundFailed
from p2p_trainer.swarm.group import Group, Member, check_weight
from p2p_trainer.swarm.lobby import Lobby, absentees
from p2p_trainer.swarm.messages import JoinReply, JoinRequest, ProtocolError
from p2p_trainer.swarm.progress import ProgressBoard
from p2p_trainer.swarm.records import ProgressRecord, Records, swarm_outer_step

logger = logging.getLogger(__name__)

_POLL_S = 0.25
_GRACE_S = 2.0  # a member waits this much longer than the leader, so the leader's answer is never late
_MAX_REDIRECTS = 8
_SKIP_ROUNDS = 10  # rounds a leader that stalled or was unreachable is skipped
_MAX_LOBBIES = 4
_FRESH_S = 0.05  # a read of the records started this recently counts as a fresh one
_JOIN_LINGER_S = 5.0  # the longest a leader waits for a joiner to close the stream it answered


class Matchmaker:
    def __init__(
        self,
        p2p: P2P,
        board: ProgressBoard,
        *,
        run_id: str,
        peer_id: str,
        client_mode: bool,
        fingerprint_sha256: str,
        timeout: float,
        target_group_size: int,
        min_group_size: int,
        max_weight: float,
        chunk: int,
        admitted: Callable[[str], bool] = lambda peer_id: True,
        wait_for_slower: float = 2.0,
        deadline_floor: float = 2.0,
    ) -> None:
        self._p2p, self._board, self._admitted = p2p, board, admitted
        # how long after a lobby opened its last member joined, in recent lobbies we led
        self.join_delays = deadlines.Recent(deadlines.Policy(deadline_floor, timeout, wait_for_slower))
        self._handler = f"p2p_trainer.{run_id}.join"
        self.peer_id, self.client_mode, self.fingerprint = peer_id, client_mode, fingerprint_sha256
        self.timeout, self.max_weight, self.chunk = timeout, max_weight, chunk
        self.target_group_size, self.min_group_size = target_group_size, min_group_size
        self._lobbies: dict[tuple[int, int], Lobby] = {}
        self._tasks: set[asyncio.Task] = set()
        self._skip_until: dict[str, int] = {}  # leader -> first outer step at which we ask it again
        self._banned: dict[str, str] = {}  # peers proven to cheat -> how; never admitted, never asked
        self._refused: dict[int, set[str]] = {}  # step -> peers we refused there: no lobby waits for them

    async def start(self) -> None:
        if not self.client_mode:  # client peers never lead, so they accept no join requests
            await self._p2p.add_binary_stream_handler(self._handler, self._handle_join)

    # ---- member side ----
    def _skipped_at(self, step: int) -> set[str]:
        return {pid for pid, until in self._skip_until.items() if step < until} | set(self._banned)

    def ban(self, peer_id: str, why: str) -> None:
        """``peer_id`` cheated provably (see ``verify``): we never group with it again."""
        if peer_id not in self._banned and peer_id != self.peer_id:
            logger.warning(f"banning {peer_id}: {why}")
            self._banned[peer_id] = why[:200]

    def _skip(self, leader: str, step: int, why: str) -> None:
        logger.warning(f"round {step}: skipping leader {leader} for {_SKIP_ROUNDS} rounds: {why}")
        self._skip_until[leader] = step + _SKIP_ROUNDS

    async def form_group(self, step: int, weight: float, numel: int) -> Group:
        """Join this step's group; raise RoundFailed with the reason when there is none for us."""
        deadline = time.monotonic() + self.timeout + _GRACE_S
        me = Member(self.peer_id, float(weight), self.client_mode)
        hint: str | None = None
        for attempt in range(_MAX_REDIRECTS + 8):
            records = await self._board.read(max_age=0.5 if attempt else 0.0)
            skipped = self._skipped_at(step)
            leader = hint or self._choose_leader(records, step, skipped)
            hint = None
            if leader is None:
                raise RoundFailed(f"no full (non-client) peer is at outer step {step}: nobody can reduce")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            request = JoinRequest(
                step=step,
                weight=me.weight,
                client_mode=me.client_mode,
                numel=numel,
                fingerprint=self.fingerprint,
                skipped=sorted(skipped)[:64],
            )
            if leader == self.peer_id:
                try:
                    reply = await asyncio.wait_for(self._admit(me, request), left)
                except asyncio.TimeoutError:
                    break
            else:
                try:
                    reply = await asyncio.wait_for(self._ask(leader, request), left)
                except asyncio.TimeoutError:
                    self._skip(leader, step, f"no answer within {self.timeout + _GRACE_S:.0f}s")
                    raise RoundFailed(
                        f"leader {leader} did not answer within {self.timeout + _GRACE_S:.0f}s"
                    ) from None
                except ProtocolError as e:
                    self._skip(leader, step, f"it answered outside the protocol ({e})")
                    continue
                except Exception as e:  # unreachable, refused, reset: try the next candidate
                    self._skip(leader, step, f"unreachable ({e!r})")
                    continue
            if reply.group is not None:
                try:
                    group = Group.from_info(reply.group)
                except ProtocolError as e:
                    self._skip(leader, step, f"it sent a malformed group ({e})")
                    raise RoundFailed(f"leader {leader} sent a malformed group: {e}") from None
                if group.outer_step != step or group.numel != numel or group.member(self.peer_id) != me:
                    self._skip(leader, step, "it sent a group that does not match our request")
                    raise RoundFailed(f"leader {leader} sent a group that does not match our request")
                return group
            if reply.redirect is not None:
                hint = reply.redirect
                bad = self._bad_redirect(records, step, leader, hint)
                if bad:
                    if hint in skipped and leader != self.peer_id:
                        await asyncio.sleep(min(_POLL_S * 4, max(deadline - time.monotonic(), 0)))
                        hint = None  # the leader has not seen ours fail (yet): ask again
                        continue
                    raise RoundFailed(f"leader {leader} redirected us to {reply.redirect}: {bad}")
                logger.info(f"round {step}: {leader} redirects us to leader {hint}")
                continue
            raise RoundFailed(reply.error)
        raise RoundFailed(
            f"could not find a group for outer step {step} within {self.timeout + _GRACE_S:.0f}s"
        )

    def _bad_redirect(self, records: Records, step: int, leader: str, to: str) -> str | None:
        """A redirect goes to a smaller full peer at this step that we have not skipped; else why not."""
        if to in self._skipped_at(step) or to == leader:
            return "a peer we skipped" if to != leader else "itself"
        record = records.get(to)
        if to != self.peer_id and (record is None or record.outer_step != step or record.client_mode):
            return "not a full peer at this outer step"
        if to > leader:
            return "not a smaller peer id"
        return None

    def _choose_leader(self, records: Records, step: int, skipped: set[str]) -> str | None:
        candidates = {pid for pid, r in records.items() if r.outer_step == step and not r.client_mode}
        if not self.client_mode:
            candidates.add(self.peer_id)
        candidates -= skipped
        return min(candidates) if candidates else None

    async def _ask(self, leader: str, request: JoinRequest) -> JoinReply:
        traffic = wire.Traffic()
        _, reader, writer = await self._p2p.call_binary_stream_handler(
            PeerID.from_base58(leader), self._handler
        )
        try:
            await wire.send_message(writer, request, traffic)
            return messages.parse(
                JoinReply, await wire.recv_frame(reader, messages.MAX_HEADER_BYTES, traffic)
            )
        finally:
            # the leader closes its end once ours is closed (``_handle_join``); we need not wait for that
            writer.close()

    # ---- leader side ----
    async def _handle_join(
        self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        traffic, sender = wire.Traffic(), info.peer_id.to_base58()
        if not self._admitted(sender):
            return await wire.close(writer)  # a private run does not talk to peers outside it
        try:
            raw = await asyncio.wait_for(
                wire.recv_frame(reader, messages.MAX_HEADER_BYTES, traffic), timeout=5.0
            )
            try:
                request = messages.parse(JoinRequest, raw)
            except ProtocolError as e:
                logger.warning(f"refusing a join request from {sender}: {e}")
                return await wire.send_message(
                    writer, JoinReply(error=f"malformed join request: {e}"), traffic
                )
            member = Member(sender, request.weight, request.client_mode)
            await wire.send_message(writer, await self._admit(member, request), traffic)
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            logger.info(f"join request from {sender} broke off: {e!r}")
        except asyncio.CancelledError:  # we are shutting down; the joiner sees the stream close
            return
        except Exception:
            logger.exception(f"failed to answer a join request from {sender}")
        finally:
            # closing at once could cut our reply short (see ``wire.finish``): under load a joiner
            # once read a reply's length and then the end of the stream, took us for unreachable and
            # skipped us for _SKIP_ROUNDS rounds, which failed the round. The joiner closes as soon
            # as it has read the reply, without waiting for our close, so this costs it nothing.
            await wire.finish(reader, writer, _JOIN_LINGER_S)

    async def _refusal(self, member: Member, request: JoinRequest) -> str | None:
        """Why ``member`` may not join our lobby for ``request.step``, or None."""
        step = request.step
        bad = check_weight(member.weight, self.max_weight)
        if bad:
            return bad
        if member.peer_id in self._banned:
            return f"it is banned ({self._banned[member.peer_id]})"
        if request.fingerprint != self.fingerprint:
            return "its run fingerprint differs from the leader's"
        mine = self._board.mine
        if mine is None or mine.outer_step != step:
            return f"leader {self.peer_id} is at outer step {mine.outer_step if mine else '-'}, not {step}"
        if member.peer_id != self.peer_id:
            record = await self._record_of(member.peer_id, step)
            if record is None or record.outer_step != step:
                seen = (
                    "no live progress record"
                    if record is None
                    else f"a record at outer step {record.outer_step}"
                )
                return f"it has {seen}, not at outer step {step}"
            if record.client_mode != member.client_mode:
                return "its join request and its progress record disagree on client mode"
        return None

    async def _record_of(self, peer_id: str, step: int) -> ProgressRecord | None:
        record = (await self._board.read(max_age=0.5)).get(peer_id)
        if record is None or record.outer_step != step:
            record = (await self._board.read(max_age=0.0)).get(peer_id)  # it may have just published
        return record

    def _believed_skips(self, step: int, claimed: list[str], records: Records) -> set[str]:
        """The joiner's skipped leaders that we too skipped, or that are not full peers at this step."""
        at_step = {pid for pid, r in records.items() if r.outer_step == step and not r.client_mode}
        return {pid for pid in claimed if pid in self._skipped_at(step) or pid not in at_step}

    async def _admit(self, member: Member, request: JoinRequest) -> JoinReply:
        step, numel = request.step, request.numel
        refusal = await self._refusal(member, request)
        if refusal:
            logger.warning(f"round {step}: refusing {member.peer_id} in the group: {refusal}")
            for old in [s for s in self._refused if s < step - 2]:
                del self._refused[old]
            self._refused.setdefault(step, set()).add(member.peer_id)
            return JoinReply(error=f"the leader refused this peer: {refusal}")
        records = await self._board.read(max_age=0.5)
        skipped = self._believed_skips(step, request.skipped, records) | self._skipped_at(step)
        lobby = self._reusable_lobby(step, numel, member)
        if lobby is None:
            leader = self._choose_leader(records, step, skipped)
            if leader != self.peer_id:
                return JoinReply(redirect=leader) if leader else JoinReply(error="no leader for this step")
            lobby = self._open_lobby(step, numel)
        if lobby.outcome.done():
            return self._late_reply(lobby, member)
        if len(lobby.joined) >= messages.MAX_MEMBERS:
            return JoinReply(error="the group is full")
        lobby.joined[member.peer_id] = member
        lobby.joined_after.setdefault(member.peer_id, time.monotonic() - lobby.opened)
        lobby.skipped |= skipped
        lobby.changed.set()
        return self._late_reply(lobby, member, await asyncio.shield(lobby.outcome))

    def _reusable_lobby(self, step: int, numel: int, member: Member) -> Lobby | None:
        """This step's lobby, unless it is closed and ``member`` was in it: then the round failed for
        that member (a partner vanished, too few joined, ...) and it asks again, so a new lobby opens
        (answering with the old group would repeat the failed round forever)."""
        lobby = self._lobbies.get((step, numel))
        if lobby is not None and lobby.outcome.done() and member.peer_id in lobby.joined:
            return None
        return lobby

    def _late_reply(self, lobby: Lobby, member: Member, outcome: JoinReply | None = None) -> JoinReply:
        outcome = outcome or lobby.outcome.result()
        if outcome.group is not None and lobby.joined.get(member.peer_id) != member:
            late = time.monotonic() - lobby.frozen_at
            if member.peer_id not in lobby.joined_after:  # alive, only slow: the next lobby waits for it
                lobby.joined_after[member.peer_id] = time.monotonic() - lobby.opened
                self.join_delays.observe(lobby.joined_after[member.peer_id])
            return JoinReply(
                error=f"the group for outer step {lobby.step} was formed {late:.1f}s before this peer asked"
            )
        return outcome

    def _open_lobby(self, step: int, numel: int) -> Lobby:
        for key in [k for k, lob in self._lobbies.items() if k[0] != step or lob.outcome.done()]:
            if self._lobbies[key].outcome.done() or key[0] < step:
                del self._lobbies[key]
        while len(self._lobbies) >= _MAX_LOBBIES:  # vector sizes nobody else uses: keep the newest
            del self._lobbies[next(iter(self._lobbies))]
        lobby = self._lobbies[(step, numel)] = Lobby(step, numel, self.timeout, self.join_delays.wait())
        task = asyncio.create_task(self._run_lobby(lobby))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return lobby

    async def _run_lobby(self, lobby: Lobby) -> None:
        step = lobby.step
        # the first look at the records is about as new as the lobby: a read started just before it
        # opened (ours, when we joined our own lobby) will do
        max_age = time.monotonic() - lobby.opened + _FRESH_S
        try:
            while True:
                records = await self._board.read(max_age=max_age)
                max_age = _POLL_S
                leader = self._choose_leader(records, step, lobby.skipped | self._skipped_at(step))
                if leader != self.peer_id:
                    logger.info(f"round {step}: handing the group over to {leader}, a smaller full peer")
                    lobby.outcome.set_result(JoinReply(redirect=leader))
                    return
                expected = {pid for pid, r in records.items() if r.outer_step == step}
                expected -= set(self._banned) | self._refused.get(step, set())
                missing = sorted(expected - set(lobby.joined))
                enough = len(lobby.joined) >= self.min_group_size
                swarm_step = swarm_outer_step(records)
                arrived = swarm_step is not None and swarm_step >= step
                if enough and not missing and arrived:
                    return self._freeze(lobby, "every live peer at this step joined")
                if len(lobby.joined) >= self.target_group_size and arrived:
                    return self._freeze(lobby, f"target_group_size={self.target_group_size} reached")
                now = time.monotonic()
                if now >= lobby.deadline and enough and arrived:
                    return self._freeze(lobby, lobby.waited() + absentees(records, step, missing))
                if now >= lobby.ceiling:
                    why = f"matchmaking_timeout={self.timeout:g}s passed; "
                    why += absentees(records, step, missing)
                    if enough:
                        msg = f"the swarm is still at outer step {swarm_step}: no group for step {step} yet"
                    else:
                        msg = f"only {len(lobby.joined)} peer(s) joined outer step {step}, min_group_size is "
                        msg += str(self.min_group_size)
                    logger.warning(f"round {step}: no group: {msg} ({why})")
                    lobby.outcome.set_result(JoinReply(error=f"{msg} ({why})"[:500]))
                    return
                lobby.changed.clear()
                until = lobby.deadline if now < lobby.deadline else lobby.ceiling
                try:
                    await asyncio.wait_for(lobby.changed.wait(), min(_POLL_S, max(until - now, 0)))
                except asyncio.TimeoutError:
                    pass
        except Exception as e:
            if not lobby.outcome.done():
                lobby.outcome.set_result(JoinReply(error=f"the leader failed: {e!r}"[:500]))
            raise

    def _freeze(self, lobby: Lobby, why: str) -> None:
        order = sorted(lobby.joined.values(), key=lambda m: (m.client_mode, m.peer_id))
        if all(m.client_mode for m in order):
            lobby.outcome.set_result(JoinReply(error="no full peer joined: nobody can reduce"))
            return
        group = Group(secrets.token_hex(8), lobby.step, lobby.numel, self.chunk, tuple(order))
        lobby.frozen_at = time.monotonic()
        self.join_delays.observe(max(lobby.joined_after.values(), default=0.0))
        logger.info(
            f"round {lobby.step}: group {group.group_id} of {len(order)} formed after "
            f"{lobby.frozen_at - lobby.opened:.2f}s ({why})"
        )
        lobby.outcome.set_result(JoinReply(group=group.to_info()))
