"""API-key authentication for every surface of the node (HTTP, WebSocket, MCP over HTTP).

With no keys configured the node is open, as local inference servers usually are. With
keys, a request must carry one as `Authorization: Bearer <key>` (what the OpenAI clients
send) or `X-API-Key: <key>`; WebSocket clients may also pass `?api_key=` because browsers
can't set headers on a WebSocket handshake. Liveness and readiness stay open so
orchestrators can probe the node.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from p2p_node.api.errors import error_body

OPEN_PATHS = frozenset({"/health", "/ready", "/health/ready"})


class ApiKeys:
    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(k.encode() for k in keys if k)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def accepts(self, presented: str | None) -> bool:
        if not self._keys:
            return True
        if not presented:
            return False
        candidate = presented.encode()
        # Compare against every key in constant time: no timing hint about which matched.
        return any([hmac.compare_digest(candidate, key) for key in self._keys])

    def presented_in(self, scope: Scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            return authorization[7:].strip()
        if "x-api-key" in headers:
            return headers["x-api-key"].strip()
        if scope["type"] == "websocket":
            values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key")
            return values[0] if values else None
        return None


class RequireApiKey:
    """ASGI middleware: 401 with an OpenAI error object for HTTP; WebSocket handshakes
    without a valid key are refused with close code 1008 (policy violation)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or not self.keys.required
            or scope.get("path") in OPEN_PATHS
            or self.keys.accepts(self.keys.presented_in(scope))
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await receive()  # the websocket.connect message
            await send({"type": "websocket.close", "code": 1008, "reason": "invalid or missing API key"})
            return
        body = json.dumps(error_body("invalid or missing API key", "invalid_request_error", "invalid_api_key")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
