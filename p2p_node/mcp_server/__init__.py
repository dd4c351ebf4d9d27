"""The node's MCP server (Model Context Protocol), for agents.

Named `mcp_server`, never `mcp`: that import name belongs to the official SDK.
`server.build_server` holds the tools and resources; `http` serves them at `/mcp` in
the node's app, `stdio` on stdin/stdout for `p2p-node mcp`.
"""

from p2p_node.mcp_server.http import McpHttp, McpHttpSettings
from p2p_node.mcp_server.server import build_server
from p2p_node.mcp_server.tools import NodeTools

__all__ = ["McpHttp", "McpHttpSettings", "NodeTools", "build_server"]
