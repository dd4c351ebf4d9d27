"""The HTTP application: OpenAI-compatible inference, rerank, status and admin routes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.manager import BackendManager
from p2p_node.api import admin_routes, infer_routes, openai_routes, stats_routes, websocket
from p2p_node.api.auth import ApiKeys, RequireApiKey
from p2p_node.api.errors import error_body, install_error_handlers
from p2p_node.api.request_ids import RequestIds
from p2p_node.mcp_server.http import McpHttp, McpHttpSettings
from p2p_node.registry import ModelRegistry


@dataclass
class ApiDependencies:
    manager: BackendManager
    node_status: Callable[[], dict[str, Any]]
    readiness: Callable[[], tuple[bool, str]]
    render_metrics: Callable[[], bytes]
    inference_health: Callable[[], dict[str, Any]]
    default_max_tokens: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    version: str = "0"
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    mcp: McpHttpSettings = field(default_factory=McpHttpSettings)
    registry: ModelRegistry = field(default_factory=ModelRegistry.builtin)  # seed 004's /infer models


def create_app(deps: ApiDependencies) -> FastAPI:
    mcp_http = McpHttp.from_api(deps) if deps.mcp.enabled else None
    # MCP's session manager must run for as long as the app serves.
    lifespan = mcp_http.lifespan if mcp_http is not None else None
    app = FastAPI(title="p2p-node", version=deps.version, docs_url="/docs", redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(openai_routes.build_router(deps.manager, deps.default_max_tokens))
    app.include_router(
        admin_routes.build_router(
            deps.manager, deps.node_status, deps.readiness, deps.render_metrics, deps.inference_health
        )
    )
    app.include_router(stats_routes.build_router(deps.manager, deps.node_status))
    app.include_router(infer_routes.build_router(deps.manager, deps.registry, deps.default_max_tokens))
    app.include_router(websocket.build_router(deps))
    if mcp_http is not None:
        app.router.routes.extend(mcp_http.routes)  # copied, not mounted: a mount answers /mcp with 307
    app.state.mcp_http = mcp_http  # the node ends MCP sessions at shutdown
    app.add_middleware(BodySizeLimit, max_bytes=deps.max_body_bytes)
    # Added last, so it runs first: unauthenticated requests cost nothing further.
    app.add_middleware(RequireApiKey, keys=deps.api_keys)
    # Outermost: even a refused request gets an id and an access-log line.
    app.add_middleware(RequestIds)
    return app


class BodySizeLimit:
    """Refuses bodies over the limit with 413 before they are buffered, whether the
    client declared a Content-Length or streams chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        responded = False

        async def limited_receive() -> Message:
            nonlocal seen, responded
            if responded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer now and tell the app the client left, so it stops reading.
                    await self._refuse(send)
                    responded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not responded:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            error_body(f"request body larger than {self.max_bytes} bytes", "invalid_request_error", "request_too_large")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
