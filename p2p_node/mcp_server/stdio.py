"""MCP on stdin/stdout: `p2p-node mcp`, for agent hosts that launch servers themselves.

The process embeds a whole node (the backend manager, the embedded models, configured
and discovered backends, the mesh when enabled) and serves no HTTP: an agent host that
starts `p2p-node mcp` expects it to work on its own. To use a node that is already
running, point the agent host at that node's `/mcp` URL instead (streamable HTTP).

stdin and stdout are the protocol. `StdioWire.claim()` takes them over as the process
starts: the protocol gets private duplicates, fd 1 then points at stderr and fd 0 at
/dev/null for the rest of the process, so nothing printed by us, a library or a child
process can corrupt the stream, and nothing else can eat the host's messages.

The SDK's own stdin reader blocks a worker thread that cancellation must wait for, so
a SIGTERM with stdin still open would hang the process (python-sdk issue #3551). Our
reader and writer run their reads and writes in threads that cancellation abandons:
a signal stops the node even while the host keeps the pipe open.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, cast

import trio
from mcp.server.stdio import stdio_server

from p2p_node.mcp_server.server import build_server
from p2p_node.mcp_server.tools import NodeTools

if TYPE_CHECKING:
    from p2p_node.node import Node

log = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024


class StdioWire:
    """The protocol's ends of stdin and stdout, apart from fds 0 and 1."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    @classmethod
    def claim(cls) -> StdioWire:
        sys.stdout.flush()
        wire = cls(os.dup(0), os.dup(1))
        os.dup2(2, 1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        return wire

    def lines(self) -> _Lines:
        return _Lines(self.read_fd)

    def writer(self) -> _Writer:
        return _Writer(self.write_fd)


class _Lines:
    """Async iteration over the lines of an fd, as `stdio_server` reads its stdin."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self._eof = False

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        while b"\n" not in self._buffer and not self._eof:
            chunk = await trio.to_thread.run_sync(os.read, self._fd, _READ_SIZE, abandon_on_cancel=True)
            self._eof = not chunk
            self._buffer += chunk
        if not self._buffer:
            raise StopAsyncIteration
        line, newline, self._buffer = self._buffer.partition(b"\n")
        return (line + newline).decode("utf-8", errors="replace")


class _Writer:
    """The `write`/`flush` pair `stdio_server` writes its stdout with."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        while data:
            written = await trio.to_thread.run_sync(os.write, self._fd, data, abandon_on_cancel=True)
            data = data[written:]

    async def flush(self) -> None:
        """Writes go straight to the fd: nothing is buffered."""


async def serve_stdio(node: Node, wire: StdioWire) -> None:
    """Runs the node's backends and serves MCP over `wire` until stdin closes or a signal."""
    tools = NodeTools(node.manager, node.status_report, node.inference_health, node.config.models.default_max_tokens)
    server = build_server(tools, version=node.version)
    # `MCPServer.run_stdio_async` reads the process's stdin itself; serving our own
    # streams takes the low-level server, which the SDK's in-process client uses too.
    lowlevel = server._lowlevel_server
    async with trio.open_nursery() as nursery:
        await node.start_backends(nursery)
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        log.info("node %s serving MCP on stdio", node.node_id)
        streams = stdio_server(stdin=cast(Any, wire.lines()), stdout=cast(Any, wire.writer()))
        async with streams as (read_stream, write_stream):
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
        log.info("stdin closed: stopping")
        nursery.cancel_scope.cancel()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: stopping", signal.Signals(signum).name)
            scope.cancel()
            return
