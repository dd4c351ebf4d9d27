"""The node's WebSocket API: `ws://host:port/ws/{client_id}` (the protocol is in docs/PROTOCOL.md).

JSON messages carry inference requests (streamed or not, several at once, told apart by
`request_id`, cancellable), status queries, pings, and subscriptions to topic events.
API keys are checked by the `RequireApiKey` middleware before the handshake completes.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from fastapi import APIRouter, WebSocket

from p2p_node.api._ws_connection import Connection, ConnectionDeps, WebSocketSettings
from p2p_node.api._ws_protocol import MAX_REQUEST_ID_LENGTH, encode, error_message
from p2p_node.api._ws_topics import SnapshotSource

if TYPE_CHECKING:
    from p2p_node.api.app import ApiDependencies

__all__ = ["WebSocketSettings", "build_router"]

log = logging.getLogger(__name__)


def build_router(deps: ApiDependencies, settings: WebSocketSettings | None = None) -> APIRouter:
    settings = settings or WebSocketSettings(max_message_bytes=deps.max_body_bytes)
    connection_deps = ConnectionDeps(
        manager=deps.manager,
        node_status=deps.node_status,
        # Every connection's topic watcher reads the same report, taken once per half interval.
        snapshots=SnapshotSource(deps.node_status, settings.event_interval_s / 2),
        default_max_tokens=deps.default_max_tokens,
        settings=settings,
    )
    router = APIRouter()

    @router.websocket("/ws/{client_id}")
    async def websocket_endpoint(websocket: WebSocket, client_id: str) -> None:
        await _serve(websocket, client_id, connection_deps)

    @router.websocket("/ws")
    async def websocket_anonymous(websocket: WebSocket) -> None:
        await _serve(websocket, f"anon-{uuid.uuid4().hex[:12]}", connection_deps)

    return router


async def _serve(websocket: WebSocket, client_id: str, deps: ConnectionDeps) -> None:
    await websocket.accept()
    if len(client_id) > MAX_REQUEST_ID_LENGTH or not client_id.isprintable():
        # Accepted first so the client can read why: a refused handshake carries no reason.
        await websocket.send_text(
            encode(
                error_message(
                    "invalid_client_id",
                    f"client_id must be 1 to {MAX_REQUEST_ID_LENGTH} printable characters",
                    param="client_id",
                )
            )
        )
        await websocket.close(1008, "invalid client_id")
        return
    connection = Connection(websocket, client_id, deps)
    log.info("websocket client %s connected", client_id)
    try:
        await connection.serve()
    finally:
        log.info("websocket client %s disconnected%s", client_id, " (fell behind)" if connection.fell_behind else "")
