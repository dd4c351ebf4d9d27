"""Every HTTP request gets an id that follows it through the logs and comes back to the client.

The id is the client's `X-Request-Id` when it sent a usable one (so a caller can follow its
own id through our logs), otherwise a new one. It is written back into the request's
headers, so handlers that read `X-Request-Id` see the same id, set in `REQUEST_ID` for the
logging filter, returned as the `X-Request-Id` response header, and logged once per request
on the `p2p_node.access` logger with the method, path, status and duration.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from p2p_node.logs import REQUEST_ID

log = logging.getLogger("p2p_node.access")

HEADER = b"x-request-id"
# A client's id is echoed into logs and headers: only short, plain tokens are taken as they are.
_USABLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
# Probes and scrapes arrive every few seconds; they are logged only at DEBUG.
_QUIET_PATHS = frozenset({"/health", "/ready", "/health/ready", "/metrics"})


def new_request_id() -> str:
    return uuid.uuid4().hex


def usable_request_id(value: str | None) -> str | None:
    return value if value is not None and _USABLE.fullmatch(value) else None


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers", []) if k != HEADER]
        sent = next((v for k, v in scope.get("headers", []) if k == HEADER), None)
        request_id = usable_request_id(sent.decode("latin-1") if sent is not None else None) or new_request_id()
        scope = {**scope, "headers": [*headers, (HEADER, request_id.encode())]}
        token = REQUEST_ID.set(request_id)
        status = 500  # what the client gets if the app fails before answering
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = list(message.get("headers", []))
                if not any(k.lower() == HEADER for k, _ in response_headers):
                    response_headers.append((HEADER, request_id.encode()))
                message = {**message, "headers": response_headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["type"] == "http":
                path = scope.get("path", "")
                duration_ms = round((time.perf_counter() - started) * 1000, 2)
                log.log(
                    logging.DEBUG if path in _QUIET_PATHS else logging.INFO,
                    "%s %s %d %.1fms",
                    scope.get("method", ""),
                    path,
                    status,
                    duration_ms,
                    extra={
                        "method": scope.get("method", ""),
                        "path": path,
                        "status": status,
                        "duration_ms": duration_ms,
                    },
                )
            REQUEST_ID.reset(token)
