"""Group formation for one round: every member must end up with the same ordered member list.

The leader of outer step ``s`` is the full (non-client) peer with the smallest peer id among the
live progress records at step ``s`` (and ourselves). Members send it a join request over a
stream they open; it waits until every live peer at step ``s`` has joined (or the group reached
``target_group_size``, or ``matchmaking_timeout`` passed), freezes the group and sends every member
the same list. A leader that learns of a smaller full peer redirects its joiners there; redirects
only ever go to smaller ids, so they cannot loop. An unreachable leader is skipped (the joiner
tells the next candidate whom it skipped, so both agree on who leads).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from hivemind.p2p import P2P, PeerID

from p2p_trainer.swarm import wire
from p2p_trainer.swarm.errors import RoundFailed
from p2p_trainer.swarm.progress import ProgressBoard
from p2p_trainer.swarm.records import ProgressRecord

logger = logging.getLogger(__name__)

_POLL_S = 0.25
_GRACE_S = 2.0  # a member waits this much longer than the leader, so the leader's answer is never late
_MAX_REDIRECTS = 8


@dataclass(frozen=True)
class Member:
    peer_id: str
    weight: float
    client_mode: bool


@dataclass(frozen=True)
class Group:
    group_id: str
    outer_step: int
    numel: int
    members: tuple[Member, ...]  # the agreed order: full peers by id, then client peers by id

    @property
    def reducers(self) -> tuple[str, ...]:
        return tuple(m.peer_id for m in self.members if not m.client_mode)

    def member(self, peer_id: str) -> Member | None:
        return next((m for m in self.members if m.peer_id == peer_id), None)

    @property
    def digest(self) -> str:
        """Members compare this, so a leader that sent conflicting lists is caught."""
        return hashlib.sha256(json.dumps(self.to_wire(), sort_keys=True).encode()).hexdigest()[:32]

    def to_wire(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id,
            "outer_step": self.outer_step,
            "numel": self.numel,
            "members": [[m.peer_id, m.weight, m.client_mode] for m in self.members],
        }

    @classmethod
    def from_wire(cls, value: Any) -> Group:
        try:
            members = tuple(Member(str(p), float(w), bool(c)) for p, w, c in value["members"])
            return cls(str(value["group_id"]), int(value["outer_step"]), int(value["numel"]), members)
        except (KeyError, TypeError, ValueError) as e:
            raise RoundFailed(f"the leader sent a malformed group: {e!r}") from None


def check_weight(weight: Any, max_weight: float) -> str | None:
    """Why a claimed token weight is unacceptable, or None if it is fine."""
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        return f"weight {weight!r} is not a number"
    if not math.isfinite(weight) or weight <= 0:
        return f"weight {weight!r} is not a positive finite number"
    if weight > max_weight:
        return f"weight {weight:g} exceeds max_weight={max_weight:g}"
    return None


class _Lobby:
    """The leader's state for one outer step."""

    def __init__(self, step: int, numel: int, timeout: float) -> None:
        self.step, self.numel = step, numel
        self.opened = time.monotonic()
        self.deadline = self.opened + timeout
        self.joined: dict[str, Member] = {}
        self.skipped: set[str] = set()
        self.changed = asyncio.Event()
        self.outcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.frozen_at = math.inf


class Matchmaker:
    def __init__(
        self,
        p2p: P2P,
        board: ProgressBoard,
        *,
        run_id: str,
        peer_id: str,
        client_mode: bool,
        timeout: float,
        target_group_size: int,
        min_group_size: int,
        max_weight: float,
    ) -> None:
        self._p2p, self._board = p2p, board
        self._handler = f"p2p_trainer.{run_id}.join"
        self.peer_id, self.client_mode = peer_id, client_mode
        self.timeout, self.max_weight = timeout, max_weight
        self.target_group_size, self.min_group_size = target_group_size, min_group_size
        self._lobbies: dict[int, _Lobby] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        if not self.client_mode:  # client peers never lead, so they accept no join requests
            await self._p2p.add_binary_stream_handler(self._handler, self._handle_join)

    # ---- member side ----
    async def form_group(self, step: int, weight: float, numel: int) -> Group:
        """Join this step's group; raise RoundFailed with the reason when there is none for us."""
        deadline = time.monotonic() + self.timeout + _GRACE_S
        me = Member(self.peer_id, float(weight), self.client_mode)
        skipped: set[str] = set()
        hint: str | None = None
        for attempt in range(_MAX_REDIRECTS + 8):
            records = await self._board.read(max_age=0.5 if attempt else 0.0)
            leader = hint or self._choose_leader(records, step, skipped)
            hint = None
            if leader is None:
                raise RoundFailed(f"no full (non-client) peer is at outer step {step}: nobody can reduce")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if leader == self.peer_id:
                try:
                    reply = await asyncio.wait_for(self._admit(me, step, numel, skipped), left)
                except asyncio.TimeoutError:
                    break
            else:
                try:
                    reply = await asyncio.wait_for(self._ask(leader, me, step, numel, skipped), left)
                except asyncio.TimeoutError:
                    raise RoundFailed(
                        f"leader {leader} did not answer within {self.timeout + _GRACE_S:.0f}s"
                    ) from None
                except Exception as e:  # unreachable, refused, reset: try the next candidate
                    logger.warning(
                        f"round {step}: leader {leader} is unreachable ({e!r}); trying the next candidate"
                    )
                    skipped.add(leader)
                    continue
            if "group" in reply:
                group = Group.from_wire(reply["group"])
                if group.outer_step != step or group.numel != numel or group.member(self.peer_id) != me:
                    raise RoundFailed(f"leader {leader} sent a group that does not match our request")
                return group
            if "redirect" in reply:
                hint = str(reply["redirect"])
                if hint in skipped or hint == leader:
                    raise RoundFailed(f"leader {leader} redirected us to {hint}, which is unreachable")
                logger.info(f"round {step}: {leader} redirects us to leader {hint}")
                continue
            raise RoundFailed(str(reply.get("error", f"leader {leader} sent an unreadable answer")))
        raise RoundFailed(
            f"could not find a group for outer step {step} within {self.timeout + _GRACE_S:.0f}s"
        )

    def _choose_leader(self, records: dict[str, ProgressRecord], step: int, skipped: set[str]) -> str | None:
        candidates = {pid for pid, r in records.items() if r.outer_step == step and not r.client_mode}
        if not self.client_mode:
            candidates.add(self.peer_id)
        candidates -= skipped
        return min(candidates) if candidates else None

    async def _ask(self, leader: str, me: Member, step: int, numel: int, skipped: set[str]) -> dict[str, Any]:
        traffic = wire.Traffic()
        _, reader, writer = await self._p2p.call_binary_stream_handler(
            PeerID.from_base58(leader), self._handler
        )
        try:
            request = {"step": step, "weight": me.weight, "client_mode": me.client_mode, "numel": numel}
            await wire.send_json(writer, {**request, "skipped": sorted(skipped)}, traffic)
            return await wire.recv_json(reader, traffic)
        finally:
            await wire.close(writer)

    # ---- leader side ----
    async def _handle_join(
        self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        traffic, sender = wire.Traffic(), info.peer_id.to_base58()
        try:
            req = await asyncio.wait_for(wire.recv_json(reader, traffic), timeout=5.0)
            try:
                step, numel = int(req["step"]), int(req["numel"])
                member = Member(sender, req["weight"], bool(req["client_mode"]))
                skipped = {str(p) for p in req.get("skipped", [])}
            except (KeyError, TypeError, ValueError):
                await wire.send_json(writer, {"error": "malformed join request"}, traffic)
                return
            reply = await self._admit(member, step, numel, skipped)
            await wire.send_json(writer, reply, traffic)
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            logger.info(f"join request from {sender} broke off: {e!r}")
        except asyncio.CancelledError:  # we are shutting down; the joiner sees the stream close
            return
        finally:
            await wire.close(writer)

    async def _admit(self, member: Member, step: int, numel: int, skipped: set[str]) -> dict[str, Any]:
        bad = check_weight(member.weight, self.max_weight)
        if bad:
            logger.warning(f"round {step}: refusing {member.peer_id} in the group: {bad}")
            return {"error": f"the leader refused this peer: {bad}"}
        lobby = self._reusable_lobby(step, member)
        if lobby is None:
            mine = self._board.mine
            if mine is not None and mine.outer_step > step:
                return {"error": f"leader {self.peer_id} is already at outer step {mine.outer_step} > {step}"}
            leader = self._choose_leader(await self._board.read(max_age=0.5), step, skipped)
            if leader != self.peer_id:
                return {"redirect": leader}
            lobby = self._reusable_lobby(step, member) or self._open_lobby(step, numel)
        if lobby.outcome.done():
            return self._late_reply(lobby, member)
        if numel != lobby.numel:
            return {"error": f"vector of {numel} values, the group's has {lobby.numel} (another model?)"}
        lobby.joined[member.peer_id] = member
        lobby.skipped |= skipped
        lobby.changed.set()
        return self._late_reply(lobby, member, await asyncio.shield(lobby.outcome))

    def _reusable_lobby(self, step: int, member: Member) -> _Lobby | None:
        """This step's lobby, unless it is closed and ``member`` was in it: then the round failed for
        that member (a partner vanished, too few joined, ...) and it asks again, so a new lobby opens
        (answering with the old group would repeat the failed round forever)."""
        lobby = self._lobbies.get(step)
        if lobby is not None and lobby.outcome.done() and member.peer_id in lobby.joined:
            return None
        return lobby

    def _late_reply(
        self, lobby: _Lobby, member: Member, outcome: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        outcome = outcome or lobby.outcome.result()
        if "group" in outcome and lobby.joined.get(member.peer_id) != member:
            late = time.monotonic() - lobby.frozen_at
            why = f"the group for outer step {lobby.step} was formed {late:.1f}s before this peer asked"
            return {"error": why}
        return outcome

    def _open_lobby(self, step: int, numel: int) -> _Lobby:
        for old in [s for s, lob in self._lobbies.items() if s < step - 2 and lob.outcome.done()]:
            del self._lobbies[old]
        lobby = self._lobbies[step] = _Lobby(step, numel, self.timeout)
        task = asyncio.create_task(self._run_lobby(lobby))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return lobby

    async def _run_lobby(self, lobby: _Lobby) -> None:
        step, max_age = lobby.step, 0.0  # the first look at the records must be newer than the lobby
        try:
            while True:
                records = await self._board.read(max_age=max_age)
                max_age = _POLL_S
                leader = self._choose_leader(records, step, lobby.skipped)
                if leader != self.peer_id:
                    logger.info(f"round {step}: handing the group over to {leader}, a smaller full peer")
                    lobby.outcome.set_result({"redirect": leader})
                    return
                expected = {pid for pid, r in records.items() if r.outer_step == step}
                missing = sorted(expected - set(lobby.joined))
                enough = len(lobby.joined) >= self.min_group_size
                if enough and not missing:
                    return self._freeze(lobby, "every live peer at this step joined")
                if len(lobby.joined) >= self.target_group_size:
                    return self._freeze(lobby, f"target_group_size={self.target_group_size} reached")
                if time.monotonic() >= lobby.deadline:
                    why = f"matchmaking_timeout={self.timeout:g}s passed; " + _absentees(
                        records, step, missing
                    )
                    if enough:
                        return self._freeze(lobby, why)
                    msg = f"only {len(lobby.joined)} peer(s) joined outer step {step}, min_group_size is "
                    logger.warning(f"round {step}: no group: {msg}{self.min_group_size} ({why})")
                    lobby.outcome.set_result({"error": msg + f"{self.min_group_size} ({why})"})
                    return
                lobby.changed.clear()
                try:
                    await asyncio.wait_for(
                        lobby.changed.wait(), min(_POLL_S, max(lobby.deadline - time.monotonic(), 0))
                    )
                except asyncio.TimeoutError:
                    pass
        except Exception as e:
            if not lobby.outcome.done():
                lobby.outcome.set_result({"error": f"the leader failed: {e!r}"})
            raise

    def _freeze(self, lobby: _Lobby, why: str) -> None:
        order = sorted(lobby.joined.values(), key=lambda m: (m.client_mode, m.peer_id))
        group = Group(secrets.token_hex(8), lobby.step, lobby.numel, tuple(order))
        lobby.frozen_at = time.monotonic()
        logger.info(
            f"round {lobby.step}: group {group.group_id} of {len(order)} formed after "
            f"{lobby.frozen_at - lobby.opened:.2f}s ({why})"
        )
        lobby.outcome.set_result({"group": group.to_wire()})


def _absentees(records: dict[str, ProgressRecord], step: int, missing: list[str]) -> str:
    """Who we waited for in vain, and who is elsewhere: the hint a failed matchmaking needs."""
    parts = [f"did not join: {', '.join(missing)}"] if missing else []
    elsewhere = sorted(f"{pid} (step {r.outer_step})" for pid, r in records.items() if r.outer_step != step)
    if elsewhere:
        parts.append(f"live peers at other outer steps: {', '.join(elsewhere)}")
    return "; ".join(parts) or "no other live peer has published progress for this run"
