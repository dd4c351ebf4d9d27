"""The mesh frame codec: round trips, limits, and fuzzing — a bad peer's bytes must
produce a WireError, never anything else."""

from __future__ import annotations

import itertools
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p_node.mesh import wire

MESSAGES = [
    wire.request("r1", "chat", "m", {"messages": [{"role": "user", "content": "hé 🦙"}]}, ["peer-a"], 1500),
    wire.chunk("r1", "Hel"),
    wire.done("r1", "stop", 5, 3),
    wire.result("r2", {"vectors": [[0.5, -1.0]]}),
    wire.error("r1", "overloaded", "busy", retryable=True),
    wire.cancel("r1"),
    {"t": "advert", "peer_id": "p", "version": "0.1.0", "seq": 3, "models": [], "load": {}},
]


def test_every_frame_type_round_trips() -> None:
    stream = b"".join(wire.encode(m) for m in MESSAGES)
    assert wire.FrameDecoder().feed(stream) == MESSAGES


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_frames_split_anywhere_decode_the_same(cuts: list[int]) -> None:
    stream = b"".join(wire.encode(m) for m in MESSAGES)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    decoder = wire.FrameDecoder()
    out = []
    for start, end in itertools.pairwise(bounds):
        out += decoder.feed(stream[start:end])
    assert out == MESSAGES and decoder.pending_bytes == 0


def test_an_oversized_frame_is_refused_before_its_body_arrives() -> None:
    decoder = wire.FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(wire.WireError, match="limit"):
        decoder.feed(struct.pack(">I", 10_000_000))
    with pytest.raises(wire.WireError, match="limit"):
        wire.encode(wire.chunk("r", "x" * (wire.MAX_FRAME_BYTES + 1)))


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        ([1, 2], "must be a map"),
        ({"t": "teleport", "id": "x"}, "unknown frame type"),
        ({"t": "chunk", "id": "x"}, "'text'"),
        ({"t": "chunk", "id": 7, "text": "a"}, "'id'"),
        ({"t": "request", "id": "x", "task": "dance", "model": "m", "payload": {}, "hops": []}, "unknown task"),
        ({"t": "advert", "peer_id": "p", "version": "1", "seq": True, "models": [], "load": {}}, "'seq'"),
    ],
)
def test_malformed_messages_are_wire_errors(message: object, complaint: str) -> None:
    body = msgpack.packb(message)
    with pytest.raises(wire.WireError, match=complaint):
        wire.FrameDecoder().feed(struct.pack(">I", len(body)) + body)


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    try:
        wire.FrameDecoder(max_frame_bytes=4096).feed(data)
    except wire.WireError:
        pass


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False)
        | st.text()
        | st.binary(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
        max_leaves=20,
    )
)
def test_arbitrary_msgpack_values_are_validated_not_trusted(value: object) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    try:
        messages = wire.FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    except wire.WireError:
        return
    assert messages[0]["t"] in wire._SCHEMA


def test_consecutive_chunks_merge_into_one_frame_in_order() -> None:
    frames = [
        wire.chunk("r1", "Hel", [1]),
        wire.chunk("r1", "lo", [2, 3]),
        wire.chunk("r1", "!", [4]),
        wire.done("r1", "stop", 3, 4),
    ]
    assert wire.merge_chunks(frames) == [wire.chunk("r1", "Hello!", [1, 2, 3, 4]), wire.done("r1", "stop", 3, 4)]


def test_chunks_of_other_requests_or_without_ids_are_not_merged() -> None:
    frames = [wire.chunk("r1", "a", [1]), wire.chunk("r2", "b", [2]), wire.chunk("r2", "c"), wire.chunk("r2", "d")]
    assert wire.merge_chunks(frames) == [
        wire.chunk("r1", "a", [1]),
        wire.chunk("r2", "b", [2]),
        wire.chunk("r2", "cd"),
    ]
    assert wire.merge_chunks([]) == []
