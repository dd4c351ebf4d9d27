"""Frames over a libp2p stream, with the timeouts and EOF rules py-libp2p needs.

* every read has a timeout (a peer that stops mid-frame must not hang us);
* EOF is reported as None and it's the caller's job to decide whether it was early;
* our own buffering (libp2p's read_exactly gives up after 100 partial reads).
"""

from __future__ import annotations

from typing import Any, Protocol

import trio
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset

from p2p_node.mesh import wire

READ_CHUNK = 64 * 1024


class StreamLike(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...
    async def reset(self) -> None: ...


class StreamBroken(Exception):
    """The stream was reset, closed under us, or timed out."""


class PeerSilent(StreamBroken):
    """Nothing came from the peer for the whole read timeout: after a silent partition
    (no FIN, no RST) this is the only sign that the connection under the stream is dead."""


class FramedStream:
    def __init__(self, stream: StreamLike, read_timeout_s: float = 30.0, write_timeout_s: float = 10.0) -> None:
        self.stream = stream
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        self._decoder = wire.FrameDecoder()
        self._ready: list[dict[str, Any]] = []
        self._eof = False

    @property
    def reusable(self) -> bool:
        """The stream was negotiated for requests one after another (it may carry another
        request after this one's answer)."""
        get_protocol = getattr(self.stream, "get_protocol", None)
        return get_protocol is not None and get_protocol() == wire.INFERENCE_PROTOCOL_REUSABLE

    async def receive(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next message, or None at a clean EOF. Raises WireError or StreamBroken."""
        with trio.move_on_after(self.read_timeout_s if timeout_s is None else timeout_s) as scope:
            while not self._ready:
                if self._eof:
                    if self._decoder.pending_bytes:
                        raise StreamBroken("the stream ended in the middle of a frame")
                    return None
                try:
                    data = await self.stream.read(READ_CHUNK)
                except StreamEOF:
                    self._eof = True
                    continue
                except (StreamReset, StreamClosed, StreamError) as exc:
                    raise StreamBroken(f"stream broken: {type(exc).__name__}") from None
                if not data:
                    self._eof = True
                    continue
                self._ready.extend(self._decoder.feed(data))
            return self._ready.pop(0)
        assert scope.cancelled_caught
        raise PeerSilent("timed out waiting for the peer")

    async def send(self, message: dict[str, Any]) -> None:
        frame = wire.encode(message)
        with trio.move_on_after(self.write_timeout_s) as scope:
            try:
                await self.stream.write(frame)
            except (StreamReset, StreamClosed, StreamError) as exc:
                raise StreamBroken(f"stream broken: {type(exc).__name__}") from None
            except Exception as exc:  # yamux raises bare errors when the window never opens
                raise StreamBroken(f"write failed: {exc}") from None
        if scope.cancelled_caught:
            raise StreamBroken("timed out writing: the peer is not reading")

    async def close(self) -> None:
        with trio.move_on_after(2), trio.CancelScope(shield=True):
            try:
                await self.stream.close()
            except Exception:
                pass

    async def reset(self) -> None:
        with trio.move_on_after(2), trio.CancelScope(shield=True):
            try:
                await self.stream.reset()
            except Exception:
                pass
