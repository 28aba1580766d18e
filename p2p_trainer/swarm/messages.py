"""Every JSON message a peer can receive from another, as a typed schema with bounds.

Peers are untrusted: a header is parsed here, once, at the edge of the protocol, and the code
behind it only ever sees these typed values. Parsing refuses oversized or deeply nested input
before ``json`` sees it, refuses NaN/Infinity, unknown fields and wrong types (no coercion), and
bounds every number, string and list. A refusal is a ``ProtocolError`` whose one-line message names
the problem; it costs the sender its place in the round, never the receiver's process.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, TypeVar

import blake3
import pydantic
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_HEADER_BYTES = 1 << 16
MAX_DEPTH = 8  # our messages nest at most 4 levels
MAX_MEMBERS = 256  # no group is larger (target_group_size is bounded by this)
MAX_STEP = 1 << 53  # steps and counts stay exact in a float64 (JSON numbers)
MAX_NUMEL = 1 << 40

# a base58 libp2p peer id (RSA keys: "Qm" + 44 chars; other key types are longer)
PeerId = Annotated[str, StringConstraints(pattern=r"^[1-9A-HJ-NP-Za-km-z]{32,64}$")]
Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8,64}$")]
Reason = Annotated[str, StringConstraints(max_length=500)]
Step = Annotated[int, Field(ge=0, le=MAX_STEP)]
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]  # see ``slice_digest``
Signature = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/=]{0,1024}$")]  # base64
GroupId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16,32}$")]
Weight = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


def slice_digest() -> blake3.blake3:
    """The hash a reducer seals over the averaged chunks of its slice, and every member checks.
    BLAKE3 (256 bits; as collision resistant as SHA-256, which sealed slices before): on the 2-core
    benchmark machine it hashes 6.8 GB/s on one core against SHA-256's 1.5 GB/s, and a round hashes
    every averaged byte twice (where it is encoded, where it is received)."""
    return blake3.blake3()


class ProtocolError(ValueError):
    """A peer sent a message we refuse; the text is one line naming what is wrong."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


T = TypeVar("T", bound=Message)


# ---- matchmaking ----------------------------------------------------------------------------------
class JoinRequest(Message):
    step: Step
    weight: Weight
    client_mode: bool
    numel: Annotated[int, Field(ge=1, le=MAX_NUMEL)]
    fingerprint: Hex  # the run fingerprint's hash: a lobby only admits peers of the same run
    skipped: Annotated[list[PeerId], Field(max_length=64)] = []


class MemberInfo(Message):
    peer_id: PeerId
    weight: Weight
    client_mode: bool


class GroupInfo(Message):
    group_id: GroupId
    outer_step: Step
    numel: Annotated[int, Field(ge=1, le=MAX_NUMEL)]
    chunk: Annotated[int, Field(ge=1, le=1 << 26)]  # values per streamed chunk of the all-reduce
    members: Annotated[list[MemberInfo], Field(min_length=1, max_length=MAX_MEMBERS)]


class JoinReply(Message):
    """Exactly one of: the group, a redirect to another leader, an error."""

    group: GroupInfo | None = None
    redirect: PeerId | None = None
    error: Reason | None = None

    @pydantic.model_validator(mode="after")
    def _one_of(self) -> JoinReply:
        if sum(x is not None for x in (self.group, self.redirect, self.error)) != 1:
            raise ValueError("a join reply holds exactly one of group, redirect, error")
        return self


# ---- the all-reduce -------------------------------------------------------------------------------
class PartHeader(Message):
    """What a member says before streaming its part of one slice to that slice's reducer."""

    group_id: GroupId
    group_digest: Hex
    slice: Annotated[int, Field(ge=0, lt=MAX_MEMBERS)]
    weight: Weight
    numel: Annotated[int, Field(ge=0, le=MAX_NUMEL)]
    takeover: bool = False
    check: bool = False  # a copy for the slice's verifier (see ``verify``), not a part to reduce


class ReduceRefusal(Message):
    error: Reason


class SliceTrailer(Message):
    """What a reducer says after the last averaged chunk of its slice."""

    total_weight: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    included: Annotated[int, Field(ge=0, le=MAX_MEMBERS)]
    excluded: Annotated[dict[PeerId, Reason], Field(max_length=MAX_MEMBERS)] = {}
    clipped: Annotated[
        dict[PeerId, Annotated[float, Field(ge=0.0, le=1.0)]], Field(max_length=MAX_MEMBERS)
    ] = {}
    digest: Digest  # of the averaged chunks sent, in order
    signature: Signature  # the reducer's, over (run, group, slice, digest): see ``verify``


class Seal(Message):
    """A reducer's signed word on what it sent for one slice."""

    slice: Annotated[int, Field(ge=0, lt=MAX_MEMBERS)]
    reducer: PeerId
    digest: Digest
    signature: Signature


class Accusation(Message):
    """A verifier's signed finding that a reducer's average is not what its parts give."""

    slice: Annotated[int, Field(ge=0, lt=MAX_MEMBERS)]
    reducer: PeerId
    verifier: PeerId
    reason: Reason
    signature: Signature


class CommitPost(Message):
    """What a member tells every witness after the data phase: the seals it holds, its findings."""

    group_id: GroupId
    seals: Annotated[list[Seal], Field(max_length=MAX_MEMBERS)]
    accusations: Annotated[list[Accusation], Field(max_length=MAX_MEMBERS)] = []


class CommitReply(Message):
    """Every distinct seal and accusation a witness holds for the group."""

    seals: Annotated[list[Seal], Field(max_length=4 * MAX_MEMBERS)]
    accusations: Annotated[list[Accusation], Field(max_length=MAX_MEMBERS)] = []


# ---- the training state ---------------------------------------------------------------------------
class StateRequest(Message):
    step: Step
    inner: bool = False


class StateHeader(Message):
    outer_step: Step
    params_sha256: Hex
    nbytes: Annotated[int, Field(gt=0, le=1 << 42)]
    inner: bool


class StateTrailer(Message):
    blob_sha256: Hex  # of the bytes before it: the downloader checks it before using them


class StateRefusal(Message):
    error: Reason
    moved: bool = False


# ---- reachability (see ``reachability``) ---------------------------------------------------------
class ProbeRequest(Message):
    maddrs: Annotated[list[Annotated[str, StringConstraints(max_length=300)]], Field(max_length=32)]


class ProbeReply(Message):
    reachable: bool
    reason: Reason
    observed: Annotated[str, StringConstraints(max_length=100)] | None = None


class ProbeRefusal(Message):
    error: Reason


# ---- parsing --------------------------------------------------------------------------------------
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_DEPTH = bytes.maketrans(b"[{]}", b"\x01\x01\x02\x02")


def nesting_depth(raw: bytes) -> int:
    """How deeply ``raw`` (JSON text) nests arrays and objects, brackets inside strings not counted."""
    depth = deepest = 0
    for byte in _STRINGS.sub(b"", raw).translate(_DEPTH):
        if byte == 1:
            depth += 1
            deepest = max(deepest, depth)
        elif byte == 2:
            depth -= 1
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number we accept")


def load_json(
    raw: bytes | bytearray | str, *, max_bytes: int = MAX_HEADER_BYTES, max_depth: int = MAX_DEPTH
) -> Any:
    """``json.loads`` with bounds on size and depth, and no NaN/Infinity."""
    if isinstance(raw, str):
        raw = raw.encode()
    if len(raw) > max_bytes:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
    if raw.count(b"[") + raw.count(b"{") > max_depth and nesting_depth(bytes(raw)) > max_depth:
        raise ProtocolError(f"message nests deeper than {max_depth} levels")
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"malformed message: {str(e).splitlines()[0][:200]}") from None


def parse(model: type[T], raw: bytes | bytearray | str | dict) -> T:
    """The message ``model`` from raw JSON (or an already loaded dict); ProtocolError if it is not one."""
    value = raw if isinstance(raw, dict) else load_json(raw)
    try:
        return model.model_validate(value)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise ProtocolError(f"bad {model.__name__}: {where}: {first['msg']}"[:300]) from None


def parse_any(models: tuple[type[Message], ...], raw: bytes | bytearray) -> Message:
    """The first of ``models`` that ``raw`` is (e.g. a header or a refusal)."""
    value = load_json(raw)
    errors = []
    for model in models:
        try:
            return parse(model, value)
        except ProtocolError as e:
            errors.append(str(e))
    raise ProtocolError("; ".join(errors)[:300])


def dump(message: Message) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()
