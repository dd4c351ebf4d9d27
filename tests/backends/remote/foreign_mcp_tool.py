"""A foreign MCP server (stdio) with an inference-like tool whose arguments aren't ours:
`ask(question, length)` answers with the question's first `length` words."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("echo-tools")


@server.tool()
def ask(question: str, length: int = 16) -> str:
    """Answer a question (by echoing its words, at most `length` of them)."""
    if "forbidden" in question:
        raise ToolError("model_not_found: this tool knows no such model")
    return " ".join(question.split()[:length])


if __name__ == "__main__":
    server.run("stdio")
