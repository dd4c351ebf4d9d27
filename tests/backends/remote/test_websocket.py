"""The WebSocket backend against an in-process server speaking the node's WebSocket
protocol (docs/PROTOCOL.md): losing the connection at any moment is a health verdict and
a reconnect, never an error out of the backend's task."""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer, serve_websocket

from backends.remote.websocket import WebSocketBackend, WebSocketBackendSettings
from backends.types import BackendStatus, Task
from tests.conftest import wait_until

STATUS = {
    "backend_status": {
        "backends": [
            {"type": "local", "capabilities": {"models": [{"id": "tiny", "task": "chat", "loaded": True}]}},
            {"type": "p2p", "capabilities": {"models": [{"id": "forwarded-only", "task": "chat"}]}},
        ]
    }
}


class RemoteNode:
    """Answers ping and status; drops the connection (no close handshake) on the
    `drop_on_status`-th status request, or right after answering the first ping."""

    def __init__(self, drop_on_status: int | None = None, *, drop_after_pong: bool = False) -> None:
        self.drop_on_status = drop_on_status
        self.drop_after_pong = drop_after_pong
        self.statuses = 0
        self.connections = 0

    async def handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        self.connections += 1
        try:
            while True:
                message = json.loads(await ws.get_message())
                if message["type"] == "ping":
                    await ws.send_message(json.dumps({"type": "pong", "request_id": message["request_id"]}))
                    if self.drop_after_pong:
                        self.drop_after_pong = False
                        await ws._stream.aclose()
                        return
                elif message["type"] == "status":
                    self.statuses += 1
                    if self.statuses == self.drop_on_status:
                        await ws._stream.aclose()  # the process died: no close frame
                        return
                    await ws.send_message(json.dumps({"type": "status", "request_id": message["request_id"], **STATUS}))
        except ConnectionClosed:
            pass


async def serve(nursery: trio.Nursery, node: RemoteNode) -> str:
    server: WebSocketServer = await nursery.start(serve_websocket, node.handle, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}"


def backend_for(url: str) -> WebSocketBackend:
    return WebSocketBackend(
        WebSocketBackendSettings("remote", url, ping_interval_s=0.2, connect_timeout_s=2.0, reconnect_max_backoff_s=0.5)
    )


async def test_models_come_from_the_remote_status_without_what_it_would_forward() -> None:
    async with trio.open_nursery() as nursery:
        backend = backend_for(await serve(nursery, RemoteNode()))
        with trio.fail_after(10):
            await nursery.start(backend.run)
        assert backend.status is BackendStatus.HEALTHY
        assert [(m.id, m.task) for m in backend.capabilities.models] == [("tiny", Task.CHAT)]
        nursery.cancel_scope.cancel()


async def test_a_connection_lost_during_a_health_check_is_a_reconnect_not_a_crash() -> None:
    node = RemoteNode(drop_on_status=2)  # the first health check's status request
    async with trio.open_nursery() as nursery:
        backend = backend_for(await serve(nursery, node))
        with trio.fail_after(10):
            await nursery.start(backend.run)
        await wait_until(lambda: node.connections >= 2 and backend.status is BackendStatus.HEALTHY)
        assert node.statuses >= 3  # asked again on the new connection
        nursery.cancel_scope.cancel()


async def test_a_connection_lost_between_pong_and_status_is_a_reconnect_not_a_crash() -> None:
    # The pong wakes the health check; the close that follows it in the same read must
    # not make the status request that comes next raise out of the backend's task.
    node = RemoteNode(drop_after_pong=True)
    async with trio.open_nursery() as nursery:
        backend = backend_for(await serve(nursery, node))
        with trio.fail_after(10):
            await nursery.start(backend.run)
        await wait_until(lambda: node.connections >= 2 and backend.status is BackendStatus.HEALTHY)
        nursery.cancel_scope.cancel()


async def test_a_connection_lost_while_connecting_is_retried() -> None:
    node = RemoteNode(drop_on_status=1)  # the status request right after connecting
    async with trio.open_nursery() as nursery:
        backend = backend_for(await serve(nursery, node))
        with trio.fail_after(10):
            await nursery.start(backend.run)
        await wait_until(lambda: backend.status is BackendStatus.HEALTHY)
        assert node.connections >= 2
        nursery.cancel_scope.cancel()
