"""The node's MCP server: its tools and resources, independent of the transport.

`build_server` returns an SDK `MCPServer`; `http.py` serves it at `/mcp` inside the
node's FastAPI app and `stdio.py` serves it on stdin/stdout for agent hosts that launch
`p2p-node mcp` themselves.
"""

from __future__ import annotations

import json
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.types import ToolAnnotations

from p2p_node.mcp_server.tools import NodeTools

SERVER_NAME = "p2p-node"
RESOURCE_SCHEME = "p2p-node"

INSTRUCTIONS = """\
This server is a p2p-node inference node. It routes chat, completion, embedding and rerank
requests between its backends (embedded models, local inference servers, remote APIs).
Start with get_supported_tasks or list_models, then run work with route_inference_request.
Errors start with a stable code (model_not_found, invalid_request, overloaded,
backend_unavailable, deadline_exceeded...) followed by what to change or when to retry.
The node's status is also readable as resources under p2p-node://."""

_READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_MODEL_ACTION = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
# Inference changes nothing on the node, but it is not free, and a remote API backend
# may be reached: not read-only, and open world.
_INFERENCE = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True)


def build_server(tools: NodeTools, *, version: str = "") -> MCPServer:
    # Constructing the server configures logging unless the root logger already has
    # handlers; the node's entry points configure logging first (stderr, our format).
    server: MCPServer = MCPServer(SERVER_NAME, title="p2p-node", version=version, instructions=INSTRUCTIONS)
    server.add_tool(tools.list_inference_backends, title="List inference backends", annotations=_READ_ONLY)
    server.add_tool(tools.get_backend_status, title="Backend status", annotations=_READ_ONLY)
    server.add_tool(tools.select_backend_for_inference, title="Select a backend", annotations=_READ_ONLY)
    server.add_tool(tools.route_inference_request, title="Run an inference", annotations=_INFERENCE)
    server.add_tool(tools.get_supported_tasks, title="Supported tasks", annotations=_READ_ONLY)
    server.add_tool(tools.list_peers, title="List peers", annotations=_READ_ONLY)
    server.add_tool(tools.list_models, title="List models", annotations=_READ_ONLY)
    server.add_tool(tools.load_model, title="Load a model", annotations=_MODEL_ACTION)
    server.add_tool(tools.unload_model, title="Unload a model", annotations=_MODEL_ACTION)
    _add_resources(server, tools)
    return server


def _add_resources(server: MCPServer, tools: NodeTools) -> None:
    # Every reader is async: the SDK runs sync ones in a worker thread, where the trio
    # clock the status reports read is out of reach.
    def as_json(value: Any) -> str:
        return json.dumps(value, indent=2, sort_keys=True, default=str)

    @server.resource(
        f"{RESOURCE_SCHEME}://status",
        name="status",
        description="The node's status report: node, routing, and every backend with its metrics",
        mime_type="application/json",
    )
    async def status() -> str:
        return as_json(tools.node_status())

    @server.resource(
        f"{RESOURCE_SCHEME}://backends",
        name="backends",
        description="The backends this node routes between, with status, models and load",
        mime_type="application/json",
    )
    async def backends() -> str:
        return (await tools.list_inference_backends()).model_dump_json(indent=2)

    @server.resource(
        f"{RESOURCE_SCHEME}://backends/{{backend_id}}",
        name="backend",
        description="One backend's status report, metrics and circuit breaker",
        mime_type="application/json",
    )
    async def backend(backend_id: str) -> str:
        entry = tools.backend_report(backend_id)
        if entry is None:
            raise ResourceNotFoundError(tools.unknown_backend(backend_id).message)
        return as_json(entry)

    @server.resource(
        f"{RESOURCE_SCHEME}://models",
        name="models",
        description="The models this node serves, their tasks and whether they are loaded",
        mime_type="application/json",
    )
    async def models() -> str:
        return (await tools.list_models()).model_dump_json(indent=2)

    @server.resource(
        f"{RESOURCE_SCHEME}://health/inference",
        name="inference-health",
        description="The primary inference provider and its fallbacks, with their health",
        mime_type="application/json",
    )
    async def inference_health() -> str:
        return as_json(tools.inference_health())
