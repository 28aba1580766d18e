"""The progress board: our view of the run's progress records and fingerprint on the DHT.

Both live under run-scoped keys (``{run_id}_progress``, ``{run_id}_fingerprint``) as dictionaries
whose subkeys are the owners' signed public keys: hivemind's RSASignatureValidator lets only the
owner change its entry, and SchemaValidator (a pydantic.v1 model, which works under pydantic 2)
rejects malformed values on every DHT node that has it. Nodes without our validators (a stock
`hivemind-dht` bootstrap) store anything, so readers check again: schema, and that the peer id a
record claims is the one its signing key derives to.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Optional

import hivemind
import pydantic.v1 as pv1
from hivemind.dht.schema import BytesWithPublicKey, RSASignatureValidator, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from p2p_trainer.contracts import canonical_fingerprint, first_difference
from p2p_trainer.swarm.errors import SwarmError
from p2p_trainer.swarm.identity import peer_id_of_public_key
from p2p_trainer.swarm.records import ProgressRecord, Records, _ProgressModel

logger = logging.getLogger(__name__)

_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")
_MAX_CACHED = 4096  # entries of the owner and complaint caches


class _RunSchema(pv1.BaseModel):
    progress: dict[BytesWithPublicKey, Optional[_ProgressModel]]
    fingerprint: dict[BytesWithPublicKey, Optional[pv1.StrictStr]]


class _Verdicts:
    """Verdicts already reached on DHT records, by a digest of the record (bounded).

    A DHT node validates every entry of a dictionary value each time another node returns it: one
    read of ``{run_id}_progress`` in a swarm of N peers checks N signatures (and N schemas) per node
    it asks. At 32 peers on 2 cores that was 70% of each DHT process's time (py-spy), enough to make
    reads time out and peers see only part of the swarm. A verdict is a pure function of the record's
    bytes, so each record is checked once per node."""

    def __init__(self, size: int = _MAX_CACHED) -> None:
        self._size, self._seen = size, {}

    def get(self, record: DHTRecord, check: Callable[[DHTRecord], bool]) -> bool:
        h = hashlib.blake2b(digest_size=16)
        for part in (record.key, record.subkey or b"", record.value):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        h.update(repr(float(record.expiration_time)).encode())
        digest = h.digest()
        if digest not in self._seen:
            if len(self._seen) >= self._size:
                self._seen.clear()
            self._seen[digest] = check(record)
        return self._seen[digest]


class _SignatureValidator(RSASignatureValidator):
    def __init__(self, private_key: RSAPrivateKey) -> None:
        super().__init__(private_key)
        self._verdicts = _Verdicts()

    def validate(self, record: DHTRecord) -> bool:
        return self._verdicts.get(record, super().validate)


class _SchemaValidator(SchemaValidator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._verdicts = _Verdicts()

    def validate(self, record: DHTRecord) -> bool:
        return self._verdicts.get(record, super().validate)


def make_validators(run_id: str, private_key: RSAPrivateKey) -> list[RecordValidatorBase]:
    """hivemind's signature and schema validators, each remembering its verdicts (see ``_Verdicts``)."""
    return [_SignatureValidator(private_key), _SchemaValidator(_RunSchema, prefix=run_id)]


DHT_CALL_S = 30.0  # the longest we wait for hivemind's DHT to answer one store or read


class ProgressBoard:
    """Our view of the run's records; all methods run on the swarm's event loop thread. A DHT store
    or read without an answer in ``call_timeout`` seconds fails like any other (logged; a store is
    tried again at the next publish or heartbeat, a read keeps the last good view), so a DHT process
    that hangs shows up in the log instead of holding every later store behind it."""

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        signer: RSASignatureValidator,
        peer_id: str,
        ttl: float,
        *,
        client_mode: bool = False,
        admitted: Callable[[str], bool] = lambda peer_id: True,
        call_timeout: float = DHT_CALL_S,
    ):
        self._dht, self._peer_id, self.ttl, self.client_mode = dht, peer_id, ttl, client_mode
        self.call_timeout = call_timeout
        self._admitted = admitted  # a private run reads nothing of peers outside it
        self._loop = asyncio.get_running_loop()
        self._progress_key, self._fingerprint_key = f"{run_id}_progress", f"{run_id}_fingerprint"
        self._subkey = signer.local_public_key
        self._mine: ProgressRecord | None = None
        self._fingerprint: str | None = None
        self._last_store = -math.inf
        self._stored: ProgressRecord | None = None  # the last record of ours a DHT peer took
        self._publisher: asyncio.Task | None = None
        self._store_lock = asyncio.Lock()
        self._dirty = False
        self._records: Records = {}
        self._read_at = -math.inf  # monotonic time the cached read started
        self._reader: asyncio.Task | None = None
        self._reader_started = -math.inf
        self._owners: dict[bytes, str | None] = {}
        self._keys: dict[str, bytes] = {}  # peer id -> its signing key, for checking its signatures
        self._complained: set[tuple[str, str]] = set()
        self._refresh_asked = -math.inf

    @property
    def mine(self) -> ProgressRecord | None:
        return self._mine

    def stored_at(self, outer_step: int) -> bool:
        """Whether the DHT already holds a record of ours at ``outer_step`` (a leader admits us on it)."""
        return self._stored is not None and self._stored.outer_step == outer_step

    def record(
        self,
        *,
        outer_step: int,
        tokens: int,
        tokens_per_s: float,
        loss: float | None,
        params_sha256: str,
        state_sha256: str = "",
        inner_step: int = 0,
    ) -> ProgressRecord:
        """A record of ours, stamped now: the one place that fills in who we are."""
        return ProgressRecord(
            peer_id=self._peer_id,
            outer_step=int(outer_step),
            tokens=max(0, int(tokens)),
            tokens_per_s=float(tokens_per_s),
            loss=None if loss is None else float(loss),
            params_sha256=params_sha256,
            client_mode=self.client_mode,
            time=get_dht_time(),
            state_sha256=state_sha256,
            inner_step=max(0, int(inner_step)),
        )

    # ---- writing ----
    async def _store(self, key: str, value: Any) -> bool:
        expiration = get_dht_time() + self.ttl
        call = self._dht.store(key, value, expiration, subkey=self._subkey, return_future=True)
        return bool(await self._answer(call))

    async def _answer(self, call: Any) -> Any:
        """What a DHT call (hivemind's future) returns, or TimeoutError after ``call_timeout``."""
        try:
            return await asyncio.wait_for(call, self.call_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer from the DHT within {self.call_timeout:g}s") from None

    def _with_last_round(self, record: ProgressRecord) -> ProgressRecord:
        """Carry how our last completed round ended: our previous record's tokens and loss once the
        outer step advances by one, the values carried so far while it stays (a jump, as after a
        state download, leaves nothing to carry)."""
        prev = self._mine
        if prev is None or record.outer_step > prev.outer_step + 1:
            return record
        if record.outer_step == prev.outer_step + 1:
            return replace(record, last_round_tokens=prev.tokens, last_round_loss=prev.loss)
        return replace(record, last_round_tokens=prev.last_round_tokens, last_round_loss=prev.last_round_loss)

    def publish_soon(self, record: ProgressRecord) -> None:
        """Non-blocking: the newest record wins; at most one store is in flight."""
        self._mine, self._dirty = self._with_last_round(record), True
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_pending())

    async def publish_now(self, record: ProgressRecord) -> None:
        self._mine, self._dirty = self._with_last_round(record), False
        await self._store_mine()

    async def _publish_pending(self) -> None:
        while self._dirty:
            self._dirty = False
            await self._store_mine()

    async def _store_mine(self) -> None:
        async with self._store_lock:  # in order, so an older record never lands after a newer one
            record = self._mine
            if record is None:
                return
            self._last_store = time.monotonic()
            try:
                stored = await self._store(self._progress_key, record.to_wire())
                if stored:
                    self._stored = record
                else:  # also seen when a replica already holds a newer copy: not an error by itself
                    logger.debug(f"a DHT peer refused our progress record for outer step {record.outer_step}")
            except Exception as e:
                logger.warning(f"could not publish progress: {e!r}")
        # our own view should not wait for the network; copy-on-write, other threads read snapshots
        self._records = {**self._records, self._peer_id: self._mine}

    async def heartbeat(self) -> None:
        """Keep our entries alive while we are: a dead peer's records expire after ``ttl``."""
        while True:
            await asyncio.sleep(self.ttl / 4)
            if time.monotonic() - self._last_store >= self.ttl / 4:
                await self._store_mine()
            if self._fingerprint is not None:
                try:
                    await self._store(self._fingerprint_key, self._fingerprint)
                except Exception as e:
                    logger.warning(f"could not refresh our run fingerprint: {e!r}")

    async def withdraw(self) -> None:
        """Tell the others we left (a None entry), so nobody waits for us in matchmaking."""
        self._stored = None
        await self._store(self._progress_key, None)

    # ---- reading ----
    async def read(self, max_age: float = 0.5) -> Records:
        """Live records by peer id, from a fetch that started at most ``max_age`` seconds ago."""
        oldest_ok = time.monotonic() - max_age
        if self._read_at < oldest_ok:
            if self._reader is None or self._reader.done() or self._reader_started < oldest_ok:
                self._start_fetch()
            await asyncio.shield(self._reader)
        return dict(self._records)

    def recent(self, max_age: float = 0.5) -> Records:
        """Any thread, never waits: the last records read, and a fresher read started on the loop
        when they are older than ``max_age`` seconds."""
        records, read_at = self._records, self._read_at  # copy-on-write: a consistent snapshot
        if time.monotonic() - max(read_at, self._refresh_asked) > max_age:
            self._refresh_asked = time.monotonic()
            self._loop.call_soon_threadsafe(self.refresh)
        return records

    def refresh(self) -> None:
        """Start a read unless one is running (loop thread only)."""
        if self._reader is None or self._reader.done():
            self._start_fetch()

    def _start_fetch(self) -> None:
        self._reader_started = time.monotonic()
        self._reader = asyncio.create_task(self._fetch(self._reader_started))

    async def _fetch(self, started: float) -> None:
        entries = await self._read_entries(self._progress_key)
        if entries is None:
            return  # keep the last good view: "nobody else is there" would be a dangerous guess
        records: Records = {}
        for peer_id, value in entries.items():
            if value is None:
                continue  # the peer withdrew
            try:
                record = ProgressRecord.from_wire(value)
            except (pv1.ValidationError, ValueError, TypeError) as e:
                self._complain(peer_id, f"dropping its malformed progress record ({str(e).splitlines()[0]})")
                continue
            if record.peer_id != peer_id:
                self._complain(peer_id, f"dropping its record that claims to be from {record.peer_id}")
                continue
            records[peer_id] = record
        if self._mine is not None:  # ours is fresher locally than anything the DHT returns
            records[self._peer_id] = self._mine
        if started >= self._read_at:  # reads may overlap: never let an older one win
            self._records, self._read_at = records, started

    async def _read_entries(self, key: str) -> dict[str, Any] | None:
        """Entries under ``key`` by the peer id their owner key derives to; None if the read failed."""
        try:
            found = await self._answer(self._dht.get(key, latest=True, return_future=True))
        except Exception as e:
            logger.warning(f"could not read {key} from the DHT: {e!r}")
            return None
        if found is None or not isinstance(found.value, dict):
            return {}
        entries = {}
        for subkey, item in found.value.items():
            peer_id = self._owner(subkey)
            if peer_id is not None and not self._admitted(peer_id):
                self._complain(peer_id, "ignoring it: it is not one of this private run's peers")
            elif peer_id is not None:
                entries[peer_id] = item.value
        return entries

    def _owner(self, subkey: Any) -> str | None:
        if subkey not in self._owners:
            if len(self._owners) >= _MAX_CACHED:  # keys of peers long gone: start over
                self._owners.clear()
                self._keys.clear()
            match = _OWNER_RE.fullmatch(subkey) if isinstance(subkey, bytes) else None
            try:
                self._owners[subkey] = peer_id_of_public_key(match.group(1)) if match else None
            except ValueError:
                self._owners[subkey] = None
            if self._owners[subkey] is not None:
                self._keys[self._owners[subkey]] = match.group(1)
        return self._owners[subkey]

    def public_key(self, peer_id: str) -> bytes | None:
        """The signing key (OpenSSH form) of a peer whose records we read, or None."""
        return self._keys.get(peer_id)

    def _complain(self, peer_id: str, what: str) -> None:
        if (peer_id, what) not in self._complained:
            if len(self._complained) >= _MAX_CACHED:
                self._complained.clear()
            self._complained.add((peer_id, what))
            logger.warning(f"peer {peer_id}: {what}")

    # ---- fingerprint ----
    async def swarm_fingerprint(self) -> tuple[dict | None, int, int]:
        """The fingerprint most other live peers published, how many published it, and of how many."""
        others = []
        for peer_id, value in (await self._read_entries(self._fingerprint_key) or {}).items():
            if peer_id == self._peer_id or value is None:
                continue
            try:
                parsed = json.loads(value) if isinstance(value, str) else None
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                self._complain(peer_id, "dropping its malformed run fingerprint")
                continue
            others.append(canonical_fingerprint(parsed))
        if not others:
            return None, 0, 0
        counts = Counter(others)
        best = max(counts, key=lambda fp: (counts[fp], fp))
        return json.loads(best), counts[best], len(others)

    async def join_with_fingerprint(self, fingerprint: dict) -> None:
        """Refuse to join a swarm whose fingerprint differs from ours; then publish ours."""
        ours = canonical_fingerprint(fingerprint)
        swarm, agree, total = await self.swarm_fingerprint()
        if swarm is not None and canonical_fingerprint(swarm) != ours:
            diff = first_difference(swarm, json.loads(ours)) or "a field of different type"
            raise SwarmError(
                f"this peer's run fingerprint differs from the swarm's ({agree} of {total} peers) at {diff}; "
                "use the same config as the swarm or another --run-id"
            )
        self._fingerprint = ours
        await self._store(self._fingerprint_key, ours)
