"""Property-based fuzzing of every parser a peer's bytes reach: message headers, progress records,
the training state's file format. Random and mutated input may be refused (ProtocolError,
StateFormatError, ValueError), never crash otherwise, hang or allocate by a lying size."""

import json
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_trainer.swarm import TrainingState, messages, state_format
from p2p_trainer.swarm.records import ProgressRecord

pytestmark = pytest.mark.timeout(120)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
MODELS = [
    messages.JoinRequest,
    messages.JoinReply,
    messages.PartHeader,
    messages.ReduceRefusal,
    messages.SliceTrailer,
    messages.CommitPost,
    messages.CommitReply,
    messages.StateRequest,
    messages.StateHeader,
    messages.StateRefusal,
]
PEER = "QmXGaG9yZ1hJ4R4mV3PR3rQJ4C8hLZNVn8d3ZGgN5Gbp8S"
VALID = {
    messages.PartHeader: {
        "group_id": "0123456789abcdef",
        "group_digest": "ab" * 8,
        "slice": 1,
        "weight": 5.0,
        "numel": 10,
    },
    messages.JoinReply: {"redirect": PEER},
    messages.StateHeader: {
        "outer_step": 3,
        "params_sha256": "a" * 64,
        "nbytes": 10,
        "inner": False,
        "blob_sha256": "b" * 64,
    },
    messages.SliceTrailer: {"total_weight": 1.0, "included": 2, "digest": "c" * 64, "signature": "abc="},
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def _parse_all(raw: bytes) -> None:
    for model in MODELS:
        try:
            model.model_validate(messages.parse(model, raw).model_dump())
        except messages.ProtocolError:
            pass


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_a_message_parser(raw):
    _parse_all(raw)


@FUZZ
@given(json_values)
def test_random_json_never_crashes_a_message_parser(value):
    _parse_all(json.dumps(value).encode())


@FUZZ
@given(st.sampled_from(sorted(VALID, key=str)), st.text(max_size=12), json_values)
def test_a_valid_message_with_one_field_changed_is_parsed_or_refused(model, key, value):
    mutated = {**VALID[model], key: value}
    try:
        parsed = messages.parse(model, json.dumps(mutated).encode())
    except messages.ProtocolError:
        return
    assert isinstance(parsed, model)


def test_deep_nesting_huge_numbers_and_nan_are_refused_in_one_line():
    for raw in [b"[" * 30000, b'{"a":' * 5000, b'{"total_weight": NaN}', b'{"weight": 1e999}', b"x" * 70000]:
        with pytest.raises(messages.ProtocolError) as info:
            messages.parse(messages.SliceTrailer, raw)
        assert "\n" not in str(info.value)
    with pytest.raises(messages.ProtocolError, match="exactly one"):
        messages.parse(messages.JoinReply, b'{"redirect": "%s", "error": "x"}' % PEER.encode())


@FUZZ
@given(json_values)
def test_random_progress_records_are_refused_cleanly(value):
    try:
        ProgressRecord.from_wire(value)
    except (ValueError, TypeError):
        pass


def _state_blob(numel: int = 64) -> bytes:
    state = TrainingState(3, "a" * 64, torch.randn(numel), torch.randn(numel), 7)
    meta = {"format": state_format.FORMAT, "outer_step": "3", "inner_step": "7", "params_sha256": "a" * 64}
    return b"".join(state_format.stream(state.entries(False), meta, state.read))


def test_a_state_file_is_a_safetensors_file():
    loaded = safetensors.torch.load(_state_blob())
    assert set(loaded) == {"master", "momentum"} and loaded["master"].shape == (64,)


@FUZZ
@given(st.data())
def test_mutated_state_files_are_refused_or_sound(data):
    blob = bytearray(_state_blob())
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "truncate", "extend", "size"]))
        if action == "flip" and blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
        elif action == "truncate":
            del blob[data.draw(st.integers(0, len(blob))) :]
        elif action == "extend":
            blob += data.draw(st.binary(max_size=64))
        elif len(blob) >= 8:  # a lying header size
            blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    try:
        file = state_format.StateFile(bytes(blob), 64)
        file.verify()
    except state_format.StateFormatError:
        return
    master = file.read("master", 0, 64)
    assert master.shape == (64,) and torch.isfinite(master).all()


def test_a_state_file_larger_than_it_should_be_is_refused_before_loading():
    meta = {"format": state_format.FORMAT, "outer_step": "1", "inner_step": "1", "params_sha256": ""}
    zeros = safetensors.torch.save(
        {"master": torch.zeros(64), "inner.step": torch.zeros(10**6)}, metadata=meta
    )
    with pytest.raises(state_format.StateFormatError, match="inner.step has 1000000 entries"):
        state_format.StateFile(zeros, 64)
    with pytest.raises(state_format.StateFormatError, match="data of"):
        state_format.StateFile(_state_blob() + b"\0" * 8, 64)
    with pytest.raises(state_format.StateFormatError, match="θ has 64"):
        state_format.StateFile(_state_blob(65), 64)
