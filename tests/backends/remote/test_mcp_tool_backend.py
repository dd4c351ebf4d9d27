"""An inference tool on a foreign MCP server (a real stdio subprocess, the official
client), reached through our argument mapping."""

from __future__ import annotations

import sys
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from backends.errors import ModelNotFoundError
from backends.remote.mcp_tool import McpBackend, McpBackendSettings
from backends.types import BackendStatus, ChatRequest, GenerationParams, Message, RequestContext, Task

TOOL = Path(__file__).with_name("foreign_mcp_tool.py")


def backend(probe_interval_s: float = 5.0) -> McpBackend:
    return McpBackend(
        McpBackendSettings(
            backend_id="foreign",
            command=(sys.executable, str(TOOL)),
            tool="ask",
            arguments={"prompt": "question", "max_tokens": "length"},
            models=("echo-tool",),
            probe_interval_s=probe_interval_s,
        )
    )


async def answer(b: McpBackend, text: str, max_tokens: int = 3) -> str:
    request = ChatRequest((Message("user", text),), "echo-tool", GenerationParams(max_tokens=max_tokens))
    async with aclosing(b.stream(request, RequestContext())) as chunks:
        return "".join([c.text async for c in chunks])


@pytest.mark.slow
async def test_a_foreign_tool_answers_through_the_argument_mapping(nursery: trio.Nursery) -> None:
    b = backend()
    await nursery.start(b.run)
    assert b.status is BackendStatus.HEALTHY, b.status_detail
    assert b.capabilities.serves(Task.CHAT, "echo-tool")
    assert await answer(b, "what is the capital of France") == "what is the"  # max_tokens -> length
    with pytest.raises(ModelNotFoundError, match="no such model"):  # the code in its message maps
        await answer(b, "a forbidden question")
    nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_the_idle_session_probe_keeps_the_session(nursery: trio.Nursery) -> None:
    # The probe must be something every protocol version answers: `ping`, removed in
    # 2026-07-28, is "method not found" there, and the session was torn down mid-request.
    b = backend(probe_interval_s=0.05)
    await nursery.start(b.run)
    for _ in range(5):
        await trio.sleep(0.2)
        assert await answer(b, "still there") == "still there"
        assert b.status is BackendStatus.HEALTHY, b.status_detail
    nursery.cancel_scope.cancel()


def test_a_backend_needs_exactly_one_transport() -> None:
    with pytest.raises(ValueError, match="exactly one of url or command"):
        McpBackend(McpBackendSettings(backend_id="x"))
