"""A lean HTTP/1.1 client for the per-token hot path: streamed generation from a plain-HTTP
upstream (vLLM, llama.cpp, another p2p-node on the LAN).

Why not httpx there: measured in one process against the benchmarks' simulated upstream
(2 ms per token, one token per read), reading a streamed reply through httpx cost ~315 µs
of CPU per token, h11 on a trio socket ~200 µs, the bare socket ~135 µs. httpx's layers
(pool, transport and body iterators, an exception-mapping context manager and a timeout
scope per read, the decoders) are paid on every chunk; on a node relaying hundreds of
tokens a second to several clients that is most of its CPU.

The scope is deliberately narrow: `http://` only, no proxy, no redirects, identity
encoding, one POST with a JSON body per connection at a time, idle keep-alive
connections pooled per client. Everything else (https, proxies, the small requests)
stays on httpx; `use_lean_client` says which. Failures are raised as httpx's exceptions,
so `_http.translate_errors` classifies both paths in one place, and an error reply is
handed over as an `httpx.Response` for `raise_for_status`.
"""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import h11
import httpx
import trio

_READ_SIZE = 65536
_STALE_RETRIES = 1


def use_lean_client(base_url: str) -> bool:
    """Plain http:// and no proxy configured for it (httpx honours the proxy variables)."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    if not ({"http", "all"} & proxies.keys()):
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname))


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.protocol = h11.Connection(h11.CLIENT)
        self.reused = False

    def reusable(self) -> bool:
        return self.protocol.our_state is h11.DONE and self.protocol.their_state is h11.DONE

    async def send(self, data: bytes, timeout_s: float, request: httpx.Request) -> None:
        with trio.move_on_after(timeout_s) as scope:
            try:
                await self.stream.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise httpx.WriteError(f"sending the request failed: {exc}", request=request) from exc
        if scope.cancelled_caught:
            raise httpx.WriteTimeout(f"sending the request took over {timeout_s:g} s", request=request)

    async def next_event(self, timeout_s: float, request: httpx.Request) -> h11.Event:
        while True:
            try:
                event = self.protocol.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            if event is h11.PAUSED:  # bytes past the end of the reply: nothing we asked for
                raise httpx.RemoteProtocolError("the server sent data after its reply", request=request)
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            with trio.move_on_after(timeout_s) as scope:
                try:
                    data = await self.stream.receive_some(_READ_SIZE)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise httpx.ReadError(f"reading the reply failed: {exc}", request=request) from exc
            if scope.cancelled_caught:
                raise httpx.ReadTimeout(f"no data from the upstream for {timeout_s:g} s", request=request)
            if not data and self.protocol.their_state is h11.SEND_RESPONSE:
                raise httpx.RemoteProtocolError("the server closed the connection without answering", request=request)
            self.protocol.receive_data(data)


class LeanResponse:
    """Status and headers of a reply whose body is read with `aiter_bytes` or `aread`."""

    def __init__(self, connection: _Connection, head: h11.Response, request: httpx.Request, timeout_s: float) -> None:
        self.status_code = head.status_code
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
        self._connection = connection
        self._request = request
        self._timeout_s = timeout_s

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._connection.next_event(self._timeout_s, self._request)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the server closed the connection mid-reply", request=self._request)

    async def aread(self) -> bytes:
        return b"".join([data async for data in self.aiter_bytes()])

    async def as_httpx(self) -> httpx.Response:
        """The whole reply as httpx's type, for the error classification shared with httpx."""
        content = await self.aread()
        return httpx.Response(self.status_code, headers=self.headers, content=content, request=self._request)


class LeanHttpClient:
    def __init__(
        self, base_url: str, headers: Mapping[str, str], *, connect_timeout_s: float, max_idle: int = 32
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the lean client speaks plain http only, not {base_url!r}")
        self._base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._path_prefix = parts.path.rstrip("/")
        self._authority = parts.netloc.rpartition("@")[2]
        self._headers = [("host", self._authority), *headers.items()]
        self._connect_timeout_s = connect_timeout_s
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._closed = False

    @asynccontextmanager
    async def post_stream(
        self, path: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> AsyncIterator[LeanResponse]:
        """POST a JSON body; the reply's head is read before this yields, its body while in it.
        The connection goes back to the pool only when the reply was read to its end."""
        request = httpx.Request("POST", self._base_url + path)
        head_fields = [
            *self._headers,
            *headers.items(),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("accept-encoding", "identity"),
        ]
        message = h11.Request(method="POST", target=self._path_prefix + path, headers=head_fields)
        for attempt in range(_STALE_RETRIES + 1):
            connection = await self._checkout(timeout_s, request)
            try:
                payload = connection.protocol.send(message) + connection.protocol.send(h11.Data(data=body))
                payload += connection.protocol.send(h11.EndOfMessage())
                await connection.send(payload, timeout_s, request)
                head = await self._read_head(connection, timeout_s, request)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                await trio.aclose_forcefully(connection.stream)
                # A kept-alive connection the server closed as we sent: it never saw the
                # request, so one fresh connection may try again.
                if connection.reused and attempt < _STALE_RETRIES:
                    continue
                raise
            except BaseException:
                await trio.aclose_forcefully(connection.stream)
                raise
            break
        try:
            yield LeanResponse(connection, head, request, timeout_s)
        finally:
            await self._checkin(connection)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await trio.aclose_forcefully(connection.stream)

    async def _read_head(self, connection: _Connection, timeout_s: float, request: httpx.Request) -> h11.Response:
        while True:
            event = await connection.next_event(timeout_s, request)
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the server closed the connection without answering", request=request)
            # h11.InformationalResponse (100 Continue and the like): keep reading.

    async def _checkout(self, timeout_s: float, request: httpx.Request) -> _Connection:
        if self._closed:
            raise httpx.ConnectError("the client is closed", request=request)
        while self._idle:
            connection = self._idle.pop()
            # Readable while idle means the server closed it (or sent garbage): not reusable.
            if connection.stream.socket.is_readable():
                await trio.aclose_forcefully(connection.stream)
                continue
            connection.reused = True
            return connection
        with trio.move_on_after(min(timeout_s, self._connect_timeout_s)) as scope:
            try:
                return _Connection(await trio.open_tcp_stream(self._host, self._port))
            except OSError as exc:
                raise httpx.ConnectError(f"connecting to {self._authority} failed: {exc}", request=request) from exc
        assert scope.cancelled_caught
        raise httpx.ConnectTimeout(f"connecting to {self._authority} took too long", request=request)

    async def _checkin(self, connection: _Connection) -> None:
        if connection.reusable() and not self._closed and len(self._idle) < self._max_idle:
            connection.protocol.start_next_cycle()
            self._idle.append(connection)
        else:
            await trio.aclose_forcefully(connection.stream)
