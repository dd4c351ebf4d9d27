"""The lean streaming client against a scripted HTTP/1.1 server on a real loopback socket.

The server is raw bytes on purpose: it produces what well-behaved servers rarely do on
demand (closing a kept-alive connection, dying mid-body, going silent), and counts the
connections it accepts so that pooling is observable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import httpx
import pytest
import trio

from backends.remote._lean_http import LeanHttpClient, use_lean_client
from tests.conftest import wait_until

Script = Callable[[trio.SocketStream, int], Awaitable[None]]  # (connection, request number)


@dataclass
class ScriptedServer:
    script: Script
    connections: int = 0
    hung_up_on: int = 0  # connections the client closed
    requests: list[bytes] = field(default_factory=list)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        self.hung_up_on += 1
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                self.requests.append(head + b"\r\n\r\n" + buffer[:length])
                buffer = buffer[length:]
                await self.script(stream, len(self.requests))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


@asynccontextmanager
async def serving(script: Script) -> AsyncIterator[tuple[ScriptedServer, LeanHttpClient]]:
    server = ScriptedServer(script)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server._handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = LeanHttpClient(f"http://127.0.0.1:{port}/v1", {"user-agent": "test"}, connect_timeout_s=2)
        try:
            yield server, client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


def chunked(*pieces: bytes, close: bool = False) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    head += b"connection: close\r\n" if close else b""
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return head + b"\r\n" + body + b"0\r\n\r\n"


async def answer_two_pieces(stream: trio.SocketStream, number: int) -> None:
    await stream.send_all(chunked(b"data: one\n\n", b"data: two\n\n"))


async def fetch(client: LeanHttpClient, timeout_s: float = 5.0) -> bytes:
    async with client.post_stream("/chat/completions", b'{"a": 1}', {"x-request-id": "r1"}, timeout_s) as reply:
        assert reply.status_code == 200
        return b"".join([data async for data in reply.aiter_bytes()])


async def test_a_streamed_body_arrives_whole_and_the_request_carries_our_headers() -> None:
    async with serving(answer_two_pieces) as (server, client):
        assert await fetch(client) == b"data: one\n\ndata: two\n\n"
    request = server.requests[0].decode()
    assert request.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    for header in ("user-agent: test", "x-request-id: r1", "content-type: application/json", "content-length: 8"):
        assert header in request
    assert request.endswith('{"a": 1}')


async def test_a_connection_read_to_the_end_is_reused() -> None:
    async with serving(answer_two_pieces) as (server, client):
        for _ in range(3):
            await fetch(client)
    assert server.connections == 1


async def test_a_reply_abandoned_mid_body_closes_its_connection_instead_of_pooling_it() -> None:
    async def slow_second_piece(stream: trio.SocketStream, number: int) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await trio.sleep(0.2)
        await stream.send_all(b"6\r\nsecond\r\n0\r\n\r\n")

    async with serving(slow_second_piece) as (server, client):
        async with client.post_stream("/chat/completions", b"{}", {}, 5) as reply:
            assert await anext(reply.aiter_bytes()) == b"first"
        await fetch(client)
    assert server.connections == 2


async def test_connection_close_from_the_server_is_not_pooled() -> None:
    async def close_after(stream: trio.SocketStream, number: int) -> None:
        await stream.send_all(chunked(b"data: x\n\n", close=True))
        await stream.aclose()

    async with serving(close_after) as (server, client):
        await fetch(client)
        await fetch(client)
    assert server.connections == 2


async def test_a_kept_alive_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def answer_then_hang_up(stream: trio.SocketStream, number: int) -> None:
        await stream.send_all(chunked(b"data: x\n\n"))
        await trio.sleep(0.05)
        await stream.aclose()  # an idle timeout on the server's side, no connection: close

    async with serving(answer_then_hang_up) as (server, client):
        await fetch(client)
        await trio.sleep(0.2)
        assert await fetch(client) == b"data: x\n\n"
    assert server.connections == 2


async def test_a_reused_connection_dropped_on_receiving_the_request_is_retried_once_on_a_new_one() -> None:
    async def drop_the_second_request(stream: trio.SocketStream, number: int) -> None:
        if number == 2:
            await stream.aclose()  # the race the idle check cannot see: closed as we sent
            return
        await stream.send_all(chunked(b"data: x\n\n"))

    async with serving(drop_the_second_request) as (server, client):
        await fetch(client)
        assert await fetch(client) == b"data: x\n\n"
    assert (server.connections, len(server.requests)) == (2, 3)


async def test_a_new_connection_dropped_without_an_answer_is_a_protocol_error_not_a_retry() -> None:
    async def hang_up(stream: trio.SocketStream, number: int) -> None:
        await stream.aclose()

    async with serving(hang_up) as (server, client):
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await fetch(client)
    assert len(server.requests) == 1


async def test_a_body_cut_short_is_a_protocol_error() -> None:
    async def die_mid_body(stream: trio.SocketStream, number: int) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await stream.aclose()

    async with serving(die_mid_body) as (_, client):
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(client)


async def test_silence_longer_than_the_timeout_is_a_read_timeout() -> None:
    async def go_silent(stream: trio.SocketStream, number: int) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await trio.sleep_forever()

    async with serving(go_silent) as (_, client):
        with pytest.raises(httpx.ReadTimeout):
            await fetch(client, timeout_s=0.2)


async def test_an_error_reply_is_handed_over_whole_as_an_httpx_response() -> None:
    async def refuse(stream: trio.SocketStream, number: int) -> None:
        body = b'{"error": {"message": "slow down"}}'
        head = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\ncontent-length: %d\r\n\r\n" % len(body)
        await stream.send_all(head + body)

    async with serving(refuse) as (_, client):
        async with client.post_stream("/chat/completions", b"{}", {}, 5) as reply:
            response = await reply.as_httpx()
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.json() == {"error": {"message": "slow down"}}
    assert str(response.request.url).endswith("/v1/chat/completions")


async def test_nothing_listening_is_a_connect_error() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = LeanHttpClient(f"http://127.0.0.1:{port}", {}, connect_timeout_s=2)
    with pytest.raises(httpx.ConnectError):
        await fetch(client)


async def test_a_closed_client_closes_its_idle_connections() -> None:
    async with serving(answer_two_pieces) as (server, client):
        await fetch(client)
        assert server.hung_up_on == 0
        await client.aclose()
        await wait_until(lambda: server.hung_up_on == 1)
        with pytest.raises(httpx.ConnectError, match="closed"):
            await fetch(client)


def test_only_plain_http_without_a_proxy_takes_the_lean_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert use_lean_client("http://10.0.0.5:8000/v1")
    assert not use_lean_client("https://api.openai.com/v1")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    assert not use_lean_client("http://10.0.0.5:8000/v1")
    monkeypatch.setenv("NO_PROXY", "10.0.0.5")
    assert use_lean_client("http://10.0.0.5:8000/v1")
