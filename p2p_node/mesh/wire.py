"""Wire format of the mesh protocols: length-prefixed msgpack frames.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack encoding
one map. Every map has `t` (its type) and, on the inference protocol, `id` (the request
id): a stream carries one request, but the id in every frame lets either side check
that what it reads belongs to what it asked.

Inference (`INFERENCE_PROTOCOL`), one request per stream:

    client → server   request {t, id, task, model, payload, deadline_ms?, hops}
    server → client   chunk {t, id, text}*  then  done {t, id, finish_reason, usage}
                      or result {t, id, payload}   (embedding / rerank)
                      or error {t, id, code, message, retryable}
    client → server   cancel {t, id}   (at any time; the server stops and answers error "cancelled")

Adverts (`ADVERT_PROTOCOL`): the dialer opens a stream, both sides write their advert
{t: "advert", peer_id, version, seq, models, load, ...} and then push a fresh one whenever
it changed (at most once a second) and at least every keep-alive period; {t: "ping", n} is
answered with {t: "pong", n} to measure the round trip.

This module is pure: it knows nothing of sockets or libp2p (see docs/PROTOCOL.md).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

INFERENCE_PROTOCOL = "/p2p-node/inference/1.0.0"
# The same frames; after a terminal frame (done, result, error) the stream stays open for
# the client's next request, so a request needn't pay for negotiating a new stream.
INFERENCE_PROTOCOL_REUSABLE = "/p2p-node/inference/1.1.0"
ADVERT_PROTOCOL = "/p2p-node/advert/1.0.0"

MAX_FRAME_BYTES = 4 * 1024 * 1024  # an embedding batch answer fits; a runaway peer doesn't
_HEADER = struct.Struct(">I")

REQUEST, CHUNK, DONE, RESULT, ERROR, CANCEL = "request", "chunk", "done", "result", "error", "cancel"
ADVERT, PING, PONG = "advert", "ping", "pong"
TASKS = frozenset({"chat", "completion", "embedding", "rerank"})

# Required fields (and their types) per frame type; extra fields are ignored, so newer
# peers can add fields without breaking older ones.
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    REQUEST: {"id": str, "task": str, "model": str, "payload": dict, "hops": list},
    CHUNK: {"id": str, "text": str},
    DONE: {"id": str, "finish_reason": str, "usage": dict},
    RESULT: {"id": str, "payload": dict},
    ERROR: {"id": str, "code": str, "message": str},
    CANCEL: {"id": str},
    ADVERT: {"peer_id": str, "version": str, "seq": int, "models": list, "load": dict},
    PING: {"n": int},
    PONG: {"n": int},
}


class WireError(Exception):
    """A frame that breaks the protocol. The connection it came on can't be trusted after it."""


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _HEADER.pack(len(body)) + body


def validate(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise WireError(f"a frame must be a map, got {type(message).__name__}")
    kind = message.get("t")
    schema = _SCHEMA.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise WireError(f"unknown frame type {kind!r}")
    for field, expected in schema.items():
        value = message.get(field)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is int):
            raise WireError(f"{kind} frame: field {field!r} is missing or has the wrong type")
    if kind == REQUEST and message["task"] not in TASKS:
        raise WireError(f"request frame: unknown task {message['task']!r}")
    return message


class FrameDecoder:
    """Feed bytes as they arrive; get back whole, validated messages.

    Partial frames are buffered (any split works: no give-up after N partial reads).
    A declared length over the limit is refused before the body is buffered.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages: list[dict[str, Any]] = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self._max:
                raise WireError(f"peer announced a {length}-byte frame; the limit is {self._max}")
            if len(self._buffer) < _HEADER.size + length:
                break
            body = bytes(self._buffer[_HEADER.size : _HEADER.size + length])
            del self._buffer[: _HEADER.size + length]
            try:
                decoded = msgpack.unpackb(body, raw=False, strict_map_key=True)
            except Exception as exc:  # msgpack raises several unrelated types
                raise WireError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
            messages.append(validate(decoded))
        return messages


# ---- constructors (so call sites can't misspell a field) -----------------------------


def request(
    request_id: str,
    task: str,
    model: str,
    payload: dict[str, Any],
    hops: list[str],
    deadline_ms: int | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "t": REQUEST,
        "id": request_id,
        "task": task,
        "model": model,
        "payload": payload,
        "hops": hops,
    }
    if deadline_ms is not None:
        message["deadline_ms"] = deadline_ms
    return message


def chunk(request_id: str, text: str, token_ids: list[int] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"t": CHUNK, "id": request_id, "text": text}
    if token_ids:
        message["ids"] = token_ids  # lets a failover target continue the answer exactly
    return message


def merge_chunks(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive chunk frames of one request as one (text and token ids joined in order).

    A server whose writer falls behind sends what has piled up in one frame: the same
    tokens in fewer frames, so a slow link or a busy reader costs less per token. Other
    frames, and their order, are kept.
    """
    merged: list[dict[str, Any]] = []
    for frame in frames:
        last = merged[-1] if merged else None
        if (
            last is not None
            and frame.get("t") == CHUNK
            and last.get("t") == CHUNK
            and last.get("id") == frame.get("id")
            and bool(last.get("ids")) == bool(frame.get("ids"))  # all ids or none: stays exact
        ):
            joined = {**last, "text": last["text"] + frame["text"]}
            if frame.get("ids"):
                joined["ids"] = [*last["ids"], *frame["ids"]]
            merged[-1] = joined
        else:
            merged.append(frame)
    return merged


def done(request_id: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return {"t": DONE, "id": request_id, "finish_reason": finish_reason, "usage": usage}


def result(request_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"t": RESULT, "id": request_id, "payload": payload}


def error(request_id: str, code: str, message: str, retryable: bool = False) -> dict[str, Any]:
    return {"t": ERROR, "id": request_id, "code": code, "message": message, "retryable": retryable}


def cancel(request_id: str) -> dict[str, Any]:
    return {"t": CANCEL, "id": request_id}
