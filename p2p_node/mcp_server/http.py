"""MCP over streamable HTTP at `/mcp`, inside the node's own FastAPI app.

The SDK's routes are copied into the app (mounting its sub-app answers 307), and its
session manager must run in the app's lifespan: without it every MCP call fails with
500. The API-key middleware in `p2p_node.api.auth` guards `/mcp` like every other path.

DNS-rebinding protection: MCP clients may run in browsers, so the Host and Origin
headers are checked. Loopback names are always accepted; the address the node binds
to (unless a wildcard) and `mcp.allowed_hosts` / `mcp.allowed_origins` add more.
`"*"` in allowed_hosts turns both checks off, for nodes behind a proxy that checks them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from p2p_node.mcp_server.server import build_server
from p2p_node.mcp_server.tools import NodeTools

if TYPE_CHECKING:
    from p2p_node.api.app import ApiDependencies

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class McpHttpSettings:
    enabled: bool = True
    allowed_hosts: tuple[str, ...] = ()  # Host header values: "name", "name:port" or "name:*"
    allowed_origins: tuple[str, ...] = ()  # Origin header values: "https://name", "http://name:*"
    bind_host: str = "127.0.0.1"  # the address the node listens on, accepted as a Host too


def transport_security(settings: McpHttpSettings) -> TransportSecuritySettings:
    if "*" in settings.allowed_hosts:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    names = list(LOOPBACK_HOSTS)
    bind = settings.bind_host.strip("[]")
    if bind not in _WILDCARDS and f"[{bind}]" not in names and bind not in names:
        names.append(f"[{bind}]" if ":" in bind else bind)
    hosts = [pattern for name in names for pattern in (name, f"{name}:*")]
    origins = [pattern for name in names for pattern in (f"http://{name}", f"http://{name}:*")]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*hosts, *settings.allowed_hosts],
        allowed_origins=[*origins, *settings.allowed_origins],
    )


class _InFlight:
    """Counts requests in progress on the MCP route, so shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = trio.Event()
        self.idle.set()
        # Set once the sessions are being closed: later requests get a 503 that says so
        # (the SDK's session manager, stopped, would raise and the client see a bare 500).
        self.closing = trio.Event()

    def counting(self, app: ASGIApp) -> ASGIApp:
        return _Counted(app, self)


class _Counted:
    # A class, not a function: Starlette would treat a function endpoint as a handler of
    # Request objects rather than as an ASGI app.
    def __init__(self, app: ASGIApp, in_flight: _InFlight) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        in_flight = self.in_flight
        if in_flight.closing.is_set():
            await _shutting_down(send)
            return
        in_flight.count += 1
        if in_flight.idle.is_set():
            in_flight.idle = trio.Event()
        try:
            await self.app(scope, receive, send)
        finally:
            in_flight.count -= 1
            if in_flight.count == 0:
                in_flight.idle.set()


async def _shutting_down(send: Send) -> None:
    error = {"code": -32000, "message": "the node is shutting down and accepts no new MCP requests"}
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"5"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class McpHttp:
    """The MCP server and what the app needs from it: routes, and a lifespan to run."""

    server: MCPServer
    routes: list[BaseRoute] = field(default_factory=list)
    _in_flight: _InFlight = field(default_factory=_InFlight)
    _closed: trio.Event = field(default_factory=trio.Event)

    @classmethod
    def from_api(cls, deps: ApiDependencies) -> McpHttp:
        tools = NodeTools(deps.manager, deps.node_status, deps.inference_health, deps.default_max_tokens)
        return cls.build(tools, deps.mcp, version=deps.version)

    @classmethod
    def build(cls, tools: NodeTools, settings: McpHttpSettings, *, version: str = "") -> McpHttp:
        server = build_server(tools, version=version)
        security = transport_security(settings)
        if settings.bind_host.strip("[]") in _WILDCARDS and not settings.allowed_hosts:
            log.warning(
                "the node listens on every address, but MCP at %s accepts only loopback Host headers; "
                "clients reaching it by another name get 421 until mcp.allowed_hosts lists that name",
                MCP_PATH,
            )
        sub_app = server.streamable_http_app(streamable_http_path=MCP_PATH, transport_security=security)
        in_flight = _InFlight()
        routes: list[BaseRoute] = [
            Route(route.path, in_flight.counting(route.endpoint)) if isinstance(route, Route) else route
            for route in sub_app.routes
        ]
        return cls(server, routes, in_flight)

    async def close_sessions(self, timeout_s: float = 2.0) -> None:
        """Ends every MCP session and the streams clients keep open on them, and waits (at most
        `timeout_s`) for their requests to finish. Agents keep a response stream open between
        calls: a connection still busy with one when the HTTP server begins its graceful
        shutdown is waited on for the whole timeout. Call it once the requests in flight have
        finished; MCP requests after it fail."""
        self._in_flight.closing.set()
        with trio.move_on_after(timeout_s):
            await self._closed.wait()
            await self._in_flight.idle.wait()

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._run_sessions)
            yield
            self._in_flight.closing.set()

    async def _run_sessions(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with self.server.session_manager.run():
                task_status.started()
                await self._in_flight.closing.wait()
        finally:
            self._closed.set()
