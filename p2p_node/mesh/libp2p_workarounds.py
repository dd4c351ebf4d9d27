"""Workarounds for faults of py-libp2p 0.8.1 that our mesh host would otherwise inherit.
Each names the libp2p code it works around; re-check them when upgrading libp2p (the
tests in tests/p2p_node/mesh/test_connection_churn.py fail if one stops working)."""

from __future__ import annotations

import contextvars
from typing import Any

import trio
from libp2p.abc import INotifee
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.rcmgr import Direction
from libp2p.stream_muxer.yamux.yamux import YamuxStream

TCP_READ_SIZE = 64 * 1024


def batch_yamux_window_updates() -> None:
    """Yamux receive-window credit goes back in batches of half a window, as go-yamux does.

    py-libp2p 0.8.1 (libp2p/stream_muxer/yamux/yamux.py, `_auto_tune_and_send_window_update`,
    its "partial slack" branch) sends a WINDOW_UPDATE after nearly every read, whatever
    `PY_YAMUX_RELEASE_ON_READ` says: for a token stream, one frame back per token, encrypted,
    sent, read and decrypted in Python on both sides. Credit owed is what was read and not
    yet returned; it is returned once it reaches half the window, so a sender that has a
    reader always has at least half a window to write into. Applies to every Yamux stream
    of this process (the class's method is replaced once)."""
    if getattr(YamuxStream._auto_tune_and_send_window_update, "batched", False):
        return

    def owed(self: YamuxStream) -> int:
        unread = len(self.conn.stream_buffers.get(self.stream_id, b""))
        return self.target_recv_window - (self.recv_window + unread)

    async def return_credit_in_batches(self: YamuxStream, *, bytes_read: int = 0) -> None:
        # Checked before taking the lock (no await between reading and deciding): taking
        # it is a trio checkpoint, i.e. a pass through the scheduler for every token read.
        if owed(self) < self.target_recv_window // 2:
            return
        async with self.window_lock:
            credit = owed(self)
            if credit < self.target_recv_window // 2:
                return
            self.recv_window += credit
        # Not under window_lock: libp2p's inbound WINDOW_UPDATE handling takes it.
        await self.send_window_update(credit, skip_lock=True)

    return_credit_in_batches.batched = True  # type: ignore[attr-defined]
    YamuxStream._auto_tune_and_send_window_update = return_credit_in_batches  # type: ignore[method-assign]


async def acquire_eagerly(lock: trio.Lock) -> None:
    """Take `lock` at once if it is free (no checkpoint), else wait for it as trio does."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def buffer_tcp_reads() -> None:
    """TCP reads under libp2p take what the socket has and serve the rest from a buffer.

    py-libp2p 0.8.1 reads each Noise message with two `TrioTCPStream.read` calls (its
    2-byte length, then its body: libp2p/io/msgio.py via io/utils.read_exactly), each a
    recv and two trio checkpoints (its read lock and the socket op), and the next frame's
    length read usually fails with EAGAIN first. For a token stream that is one message per
    token: recv once, up to 64 KiB, and the body and any following messages need no I/O.
    Semantics kept: `read(n)` returns at most n bytes, b"" at EOF or after a local close,
    `ConnectionClosedError` on a reset; reads are serialised by the stream's read lock, and
    a reader that waited on it serves what the previous one buffered before touching the
    socket. Applies to every libp2p TCP connection of this process."""
    if getattr(TrioTCPStream.read, "buffered", False):
        return

    def take(buffer: bytearray, n: int | None) -> bytes:
        size = len(buffer) if n is None else min(n, len(buffer))
        data = bytes(buffer[:size])
        del buffer[:size]
        return data

    async def read_buffered(self: TrioTCPStream, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        buffer: bytearray = self.__dict__.setdefault("_read_buffer", bytearray())
        if buffer:
            return take(buffer, n)
        await acquire_eagerly(self.read_lock)  # the socket op below is the checkpoint
        try:
            if buffer:  # filled by the reader this one waited for
                return take(buffer, n)
            try:
                data = await self.stream.receive_some(max(n or 0, TCP_READ_SIZE))
            except trio.BrokenResourceError as error:
                raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
            except trio.ClosedResourceError:
                return b""
            if n is not None and len(data) > n:
                buffer += data[n:]
                data = data[:n]
            return data
        finally:
            self.read_lock.release()

    read_buffered.buffered = True  # type: ignore[attr-defined]
    TrioTCPStream.read = read_buffered  # type: ignore[method-assign]


class EagerLock:
    """A trio.Lock whose uncontended acquire is not a checkpoint.

    trio's Lock.acquire yields to the scheduler even when the lock is free; py-libp2p takes
    several such locks around every read and write of a stream (see
    `eager_locks_in_libp2p_streams`), each a pass through trio's run loop (an epoll_wait
    and a task switch) per token. Contended, it waits exactly as trio.Lock does. The code
    holding the lock reaches a checkpoint soon anyway: the socket op it protects."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        await acquire_eagerly(self._lock)

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def statistics(self) -> Any:
        return self._lock.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()


def eager_locks_in_libp2p_streams() -> None:
    """py-libp2p 0.8.1's per-read and per-write locks become `EagerLock`s.

    Reading one frame from a stream takes NetStream's `_state_lock`
    (libp2p/network/stream/net_stream.py `read`) and Yamux's `streams_lock` in its read
    loop and again in `read_stream`; writing one takes the stream's `window_lock` and
    Yamux's `_write_lock` (the stream's `close_lock` is swapped too; its ReadWriteLock is
    left as it is). Uncontended (the usual case: one reader, one writer per
    stream), each was a trip through trio's scheduler; counted with a trio Instrument on an
    asking node relaying a token stream: 7.8 scheduler passes per token before."""
    if getattr(YamuxStream.__init__, "eager", False):
        return

    def with_eager_locks(init: Any, names: tuple[str, ...]) -> Any:
        def init_then_swap(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            for name in names:
                setattr(self, name, EagerLock())

        init_then_swap.eager = True  # type: ignore[attr-defined]
        return init_then_swap

    from libp2p.network.stream.net_stream import NetStream
    from libp2p.stream_muxer.yamux.yamux import Yamux

    NetStream.__init__ = with_eager_locks(NetStream.__init__, ("_state_lock",))  # type: ignore[method-assign]
    Yamux.__init__ = with_eager_locks(Yamux.__init__, ("streams_lock", "_write_lock"))  # type: ignore[method-assign]
    YamuxStream.__init__ = with_eager_locks(YamuxStream.__init__, ("window_lock", "close_lock"))  # type: ignore[method-assign]


# [cancel scope, accepted connection] of the inbound handler a task runs under.
_INBOUND_HANDLER: contextvars.ContextVar[list[Any]] = contextvars.ContextVar("inbound_handler")


class InboundHandlerReaper(INotifee):
    """Ends libp2p's handler task for an accepted connection when that connection closes.

    py-libp2p 0.8.1 (libp2p/network/swarm.py): `Swarm._handle_inbound_connection` holds one
    of `_inbound_limiter`'s 250 slots until `_do_handle_inbound_connection` returns, which
    awaits `self.manager.wait_finished()` (the swarm's end) after the upgrade: after 250
    reconnects every inbound connection is refused (issue 4; no upstream report found in
    2026-08). We cancel that wait once libp2p reports the connection gone."""

    def __init__(self, swarm: Any) -> None:
        """Wraps this swarm's handler (no other swarm's), so: before the swarm listens."""
        self._scopes: dict[Any, trio.CancelScope] = {}  # accepted connection → its handler's
        handle = swarm._do_handle_inbound_connection

        async def handle_until_closed(*args: Any) -> None:
            with trio.CancelScope() as scope:
                _INBOUND_HANDLER.set([scope, None])  # in this task's context: copied by tasks it starts
                await handle(*args)

        swarm._do_handle_inbound_connection = handle_until_closed
        swarm.register_notifee(self)

    async def connected(self, network: Any, conn: Any) -> None:
        slot = _INBOUND_HANDLER.get(None)
        # Tasks on the accepted connection inherit the variable; connections they dial are outbound.
        if slot is not None and slot[1] is None and conn.direction == Direction.INBOUND:
            slot[1], self._scopes[conn] = conn, slot[0]
            if conn.is_closed:  # closed before this ran: `disconnected` may have come already
                await self.disconnected(network, conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        if (scope := self._scopes.pop(conn, None)) is not None:
            scope.cancel()

    async def opened_stream(self, network: Any, stream: Any) -> None: ...
    async def closed_stream(self, network: Any, stream: Any) -> None: ...
    async def listen(self, network: Any, multiaddr: Any) -> None: ...
    async def listen_close(self, network: Any, multiaddr: Any) -> None: ...
