"""Workarounds for faults of py-libp2p 0.8.1 that our mesh host would otherwise inherit.
Each names the libp2p code it works around; re-check them when upgrading libp2p (the
tests in tests/p2p_node/mesh/test_connection_churn.py fail if one stops working)."""

from __future__ import annotations

import contextvars
from typing import Any

import trio
from libp2p.abc import INotifee
from libp2p.rcmgr import Direction
from libp2p.stream_muxer.yamux.yamux import YamuxStream


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

    async def return_credit_in_batches(self: YamuxStream, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            unread = len(self.conn.stream_buffers.get(self.stream_id, b""))
            owed = self.target_recv_window - (self.recv_window + unread)
            if owed < self.target_recv_window // 2:
                return
            self.recv_window += owed
        # Not under window_lock: libp2p's inbound WINDOW_UPDATE handling takes it.
        await self.send_window_update(owed, skip_lock=True)

    return_credit_in_batches.batched = True  # type: ignore[attr-defined]
    YamuxStream._auto_tune_and_send_window_update = return_credit_in_batches  # type: ignore[method-assign]


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
