"""Inference streams kept open per peer and reused.

Opening a libp2p stream costs a multistream-select negotiation (round trips between the
two processes) before the request can even be sent; on a busy machine that is several
milliseconds of every peer-served request's time to first token. Under protocol
`INFERENCE_PROTOCOL_REUSABLE` a stream carries one request after another: after a
terminal frame (done, result, error) the client may send the next request on it. This
module holds the idle ones (`StreamPool`) and the client's side of one request
(`InferenceCall`), which falls back to a fresh stream if a reused one turns out dead
before it answered anything: nothing was answered, so nothing is repeated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from p2p_node.mesh import wire
from p2p_node.mesh.framed import FramedStream, PeerSilent, StreamBroken

TERMINAL = frozenset({wire.DONE, wire.RESULT, wire.ERROR})


class StreamPool:
    """Idle reusable streams per peer, most recently used first."""

    def __init__(self, max_idle_per_peer: int = 8, max_idle_s: float = 30.0) -> None:
        self.max_idle_per_peer = max_idle_per_peer
        # Shorter than the server's idle timeout, so a pooled stream is never one the
        # server is about to close.
        self.max_idle_s = max_idle_s
        self._idle: dict[str, list[tuple[float, FramedStream]]] = {}

    def take(self, peer: str) -> tuple[FramedStream | None, list[FramedStream]]:
        """A live idle stream to `peer` (or None), and expired ones for the caller to close."""
        idle = self._idle.get(peer, [])
        now = trio.current_time()
        expired = [framed for since, framed in idle if now - since > self.max_idle_s]
        fresh = [(since, framed) for since, framed in idle if now - since <= self.max_idle_s]
        chosen = fresh.pop()[1] if fresh else None
        self._idle[peer] = fresh
        return chosen, expired

    def give(self, peer: str, framed: FramedStream) -> bool:
        """Keep `framed` for the next request; False if the pool for `peer` is full."""
        idle = self._idle.setdefault(peer, [])
        if len(idle) >= self.max_idle_per_peer:
            return False
        idle.append((trio.current_time(), framed))
        return True

    def drop(self, peer: str) -> list[FramedStream]:
        """Every idle stream to `peer` (its connection is gone), for the caller to close."""
        return [framed for _, framed in self._idle.pop(peer, [])]

    def idle_count(self, peer: str) -> int:
        return len(self._idle.get(peer, []))


class InferenceCall:
    """The client's side of one request: read replies with `receive()`."""

    def __init__(
        self,
        framed: FramedStream,
        request: dict[str, Any],
        reused: bool,
        reopen: Callable[[], Awaitable[FramedStream]],
    ) -> None:
        self.framed = framed
        self.request = request
        self.reused = reused
        self._reopen = reopen
        self.answered = False  # a reply arrived
        self.ended = False  # a terminal frame arrived: the stream is free for the next request

    async def receive(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        if self.reused and not self.answered:
            frame = await self._first_reply_or_retry(timeout_s)
        else:
            frame = await self.framed.receive(timeout_s)
        self.answered = True
        if frame is not None and frame["t"] in TERMINAL:
            self.ended = True
        return frame

    async def _first_reply_or_retry(self, timeout_s: float | None) -> dict[str, Any] | None:
        try:
            frame = await self.framed.receive(timeout_s)
        except PeerSilent:
            raise  # alive but slow (a long prompt): not a reason to ask twice
        except StreamBroken:
            frame = None
        if frame is not None:
            return frame
        # The peer closed the idle stream (it restarted, or timed the stream out) before
        # our request reached it: ask again on a fresh stream.
        await self.framed.reset()
        self.framed = await self._reopen()
        self.reused = False
        await self.framed.send(self.request)
        return await self.framed.receive(timeout_s)
