"""The MCP route's own behaviour around the SDK's session manager."""

from __future__ import annotations

import httpx
from starlette.types import Receive, Scope, Send

from p2p_node.mcp_server.http import _InFlight

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}


async def answering(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"jsonrpc": "2.0", "id": 1, "result": {}}'})


async def test_requests_after_the_sessions_closed_get_a_503_that_says_why() -> None:
    in_flight = _InFlight()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=in_flight.counting(answering)), base_url="http://n")
    async with client:
        assert (await client.post("/mcp", json=INITIALIZE)).status_code == 200
        in_flight.closing.set()
        refused = await client.post("/mcp", json=INITIALIZE)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert "shutting down" in refused.json()["error"]["message"]
    assert in_flight.count == 0 and in_flight.idle.is_set()
