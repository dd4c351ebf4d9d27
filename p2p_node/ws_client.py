"""A small asyncio client for the node's WebSocket API (docs/PROTOCOL.md, "WebSocket").

Depends only on the `websockets` package and the standard library, so it can be used
without the node's own dependencies::

    async with NodeClient("ws://127.0.0.1:8000", api_key="sk-...") as node:
        async with node.stream("chat", "Write a haiku", max_tokens=64) as answer:
            async for text in answer:
                print(text, end="", flush=True)
        print(answer.complete["usage"])

        vectors = (await node.infer("embedding", ["one", "two"]))["result"]
        await node.subscribe("backend")
        async for event in node.events():
            print(event["event"], event["data"])

Many requests may run at once on one client; each has its own `request_id`. Leaving a
`stream` early (or `aclose()`) cancels the request on the node, which frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = ["InferenceStream", "NodeClient", "NodeConnectionError", "NodeError", "RequestCancelled"]

_TERMINAL = frozenset({"inference_complete", "inference_cancelled", "error"})


class NodeError(Exception):
    """The node answered with an `error` message."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        param: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.param = param
        self.retryable = retryable

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> NodeError:
        return cls(
            str(message.get("code", "unknown")),
            str(message.get("message", "")),
            request_id=message.get("request_id"),
            param=message.get("param"),
            retryable=bool(message.get("retryable", False)),
        )


class RequestCancelled(NodeError):
    """The request was cancelled before it finished."""


class NodeConnectionError(ConnectionError):
    """The connection ended while a request or reply was outstanding."""

    def __init__(self, message: str, reason: NodeError | None = None) -> None:
        super().__init__(message)
        self.reason = reason  # e.g. the node's `slow_consumer` notice


class _Closed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class NodeClient:
    """One WebSocket connection to a node. Use as an async context manager."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        api_key: str | None = None,
        open_timeout: float = 10.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_events: int = 1000,
        compression: bool = False,
    ) -> None:
        self.client_id = client_id or f"py-{uuid.uuid4().hex[:12]}"
        self.url = _ws_url(url, self.client_id)
        self._api_key = api_key
        self._open_timeout = open_timeout
        self._max_message_bytes = max_message_bytes
        # Per-message deflate costs more CPU than it saves on small JSON messages.
        self._compression = compression
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._streams: dict[str, asyncio.Queue[dict[str, Any] | _Closed]] = {}
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any] | _Closed] = asyncio.Queue()
        self._max_events = max_events
        self.events_dropped = 0
        self.connection_info: dict[str, Any] = {}
        self._closed_error: NodeConnectionError | None = None

    # ---- connection ---------------------------------------------------------------------

    async def connect(self) -> NodeClient:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
        self._ws = await connect(
            self.url,
            additional_headers=headers,
            open_timeout=self._open_timeout,
            max_size=self._max_message_bytes,
            compression="deflate" if self._compression else None,
        )
        first = json.loads(await asyncio.wait_for(self._ws.recv(), self._open_timeout))
        if first.get("type") == "error":
            await self._ws.close()
            raise NodeError.from_message(first)
        self.connection_info = first
        self._reader = asyncio.create_task(self._read_loop())
        return self

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> NodeClient:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send a raw protocol message (the typed helpers below cover the protocol)."""
        if self._closed_error is not None:
            raise self._closed_error
        assert self._ws is not None, "connect() first"
        try:
            await self._ws.send(json.dumps(message, separators=(",", ":")))
        except ConnectionClosed as exc:
            raise self._closed_error or NodeConnectionError(f"connection closed: {exc}") from exc

    # ---- requests -----------------------------------------------------------------------

    def stream(
        self,
        task: str,
        inputs: Any,
        *,
        model: str | None = None,
        request_id: str | None = None,
        stream: bool = True,
        **parameters: Any,
    ) -> InferenceStream:
        """An inference whose answer arrives as text chunks (an async iterator of str)."""
        message: dict[str, Any] = {
            "type": "inference",
            "request_id": request_id or uuid.uuid4().hex,
            "task": task,
            "inputs": inputs,
            "parameters": parameters,
            "stream": stream,
        }
        if model is not None:
            message["model"] = model
        return InferenceStream(self, message)

    async def infer(
        self, task: str, inputs: Any, *, model: str | None = None, request_id: str | None = None, **parameters: Any
    ) -> dict[str, Any]:
        """A non-streamed inference; returns the `inference_complete` message (`result` holds
        the text, the vectors or the ranked documents)."""
        async with self.stream(task, inputs, model=model, request_id=request_id, stream=False, **parameters) as call:
            async for _ in call:
                pass
        assert call.complete is not None
        return call.complete

    async def chat(self, inputs: Any, *, model: str | None = None, **parameters: Any) -> str:
        return str((await self.infer("chat", inputs, model=model, **parameters))["result"])

    async def ping(self) -> float:
        """Round-trip time of one ping, in seconds."""
        started = time.perf_counter()
        await self._request({"type": "ping"})
        return time.perf_counter() - started

    async def status(self) -> dict[str, Any]:
        return await self._request({"type": "status"})

    async def subscribe(self, *topics: str) -> list[str]:
        """Subscribe to topics; returns every topic now subscribed. Events arrive on `events()`."""
        reply = await self._request({"type": "subscribe", "topics": list(topics)})
        return list(reply["subscriptions"])

    async def unsubscribe(self, *topics: str) -> list[str]:
        reply = await self._request({"type": "unsubscribe", "topics": list(topics)})
        return list(reply["subscriptions"])

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Topic events (`{"topic", "event", "data"}`) as they arrive, until the connection ends.
        At most `max_events` wait here; older ones are dropped (counted in `events_dropped`)."""
        while True:
            item = await self._events.get()
            if isinstance(item, _Closed):
                self._events.put_nowait(item)  # later readers see the end too
                return
            yield item

    async def cancel(self, request_id: str) -> None:
        await self.send({"type": "cancel", "request_id": request_id})

    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        try:
            await self.send({**message, "request_id": request_id})
            reply = await future
        finally:
            self._replies.pop(request_id, None)
        if reply.get("type") == "error":
            raise NodeError.from_message(reply)
        return reply

    # ---- dispatch -----------------------------------------------------------------------

    def _open_stream(self, request_id: str) -> asyncio.Queue[dict[str, Any] | _Closed]:
        if self._closed_error is not None:
            raise self._closed_error
        if request_id in self._streams:
            raise ValueError(f"request {request_id!r} is already running on this client")
        queue: asyncio.Queue[dict[str, Any] | _Closed] = asyncio.Queue()
        self._streams[request_id] = queue
        return queue

    def _forget_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def _read_loop(self) -> None:
        assert self._ws is not None
        notice: NodeError | None = None
        error = NodeConnectionError("client closed")
        try:
            async for raw in self._ws:
                message = json.loads(raw)
                kind = message.get("type")
                request_id = message.get("request_id")
                if kind == "event":
                    self._deliver_event(message)
                elif request_id in self._streams:
                    self._streams[request_id].put_nowait(message)
                elif request_id in self._replies:
                    future = self._replies[request_id]
                    if not future.done():
                        future.set_result(message)
                elif kind == "error" and request_id is None:
                    notice = NodeError.from_message(message)  # about the connection (slow_consumer...)
                # Anything else answers a request this client already gave up on.
            error = NodeConnectionError(_closed_text(self._ws, notice), notice)
        except ConnectionClosed:
            error = NodeConnectionError(_closed_text(self._ws, notice), notice)
        finally:
            self._fail_all(error)

    def _deliver_event(self, message: dict[str, Any]) -> None:
        if self._events.qsize() >= self._max_events:
            self._events.get_nowait()
            self.events_dropped += 1
        self._events.put_nowait(message)

    def _fail_all(self, error: NodeConnectionError) -> None:
        self._closed_error = error
        for queue in self._streams.values():
            queue.put_nowait(_Closed(error))
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error)
        self._events.put_nowait(_Closed(error))


class InferenceStream:
    """Chunks of one inference, in order. After the iteration ends, `complete` holds the
    `inference_complete` message (usage, finish_reason, `result` when not streamed)."""

    def __init__(self, client: NodeClient, message: dict[str, Any]) -> None:
        self._client = client
        self._message = message
        self.request_id: str = message["request_id"]
        self._queue: asyncio.Queue[dict[str, Any] | _Closed] | None = None
        self.started: dict[str, Any] | None = None
        self.complete: dict[str, Any] | None = None
        self._done = False

    async def start(self) -> None:
        if self._queue is None:
            self._queue = self._client._open_stream(self.request_id)
            try:
                await self._client.send(self._message)
            except BaseException:
                self._client._forget_stream(self.request_id)
                self._done = True
                raise

    def __aiter__(self) -> InferenceStream:
        return self

    async def __anext__(self) -> str:
        await self.start()
        assert self._queue is not None
        while not self._done:
            item = await self._queue.get()
            if isinstance(item, _Closed):
                self._finish()
                raise item.error
            kind = item.get("type")
            if kind == "inference_chunk":
                return str(item["chunk"])
            if kind == "inference_started":
                self.started = item
                continue
            if kind in _TERMINAL:
                self._finish()
                if kind == "inference_complete":
                    self.complete = item
                    break
                if kind == "inference_cancelled":
                    raise RequestCancelled("cancelled", "the request was cancelled", request_id=self.request_id)
                raise NodeError.from_message(item)
        raise StopAsyncIteration

    async def text(self) -> str:
        """The whole answer, joined."""
        return "".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        """Stop early: the node cancels the request and frees its backend slot."""
        if self._queue is not None and not self._done:
            self._finish()
            with contextlib.suppress(NodeConnectionError):
                await self._client.cancel(self.request_id)

    def _finish(self) -> None:
        self._done = True
        self._client._forget_stream(self.request_id)

    async def __aenter__(self) -> InferenceStream:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _ws_url(url: str, client_id: str) -> str:
    """`ws://host:port`, `http://host:port` or a full `.../ws/<id>` URL."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if not path.startswith("/ws") and "/ws/" not in path:
        path = f"{path}/ws/{client_id}"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _closed_text(ws: ClientConnection, notice: NodeError | None) -> str:
    code = ws.close_code
    reason = ws.close_reason or ""
    text = f"connection closed (code {code}{': ' + reason if reason else ''})"
    return f"{text}; {notice.message}" if notice else text
