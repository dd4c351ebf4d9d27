"""One WebSocket connection: a reader, a writer, a topic watcher and one task per request.

Everything a connection does lives in the nursery `serve` opens, so when the client
leaves, every request it started is cancelled and each manager stream is closed (which
frees the backend slot). The writer is the only task that touches the socket; everyone
else hands it encoded messages through a bounded queue. A producer that finds the queue
full for `send_timeout_s` means the client has stopped keeping up: the connection stops
its work, drops the backlog, tells the client (`slow_consumer`) and closes. Memory per
connection is therefore bounded by the queue, whatever the client does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import trio
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from backends.errors import InferenceError
from backends.manager import BackendManager
from backends.types import ChatRequest, CompletionRequest, EmbeddingRequest, RequestContext
from p2p_node.api._ws_protocol import (
    PROTOCOL_VERSION,
    TOPICS,
    CancelMessage,
    InferenceCall,
    InferenceMessage,
    PlainMessage,
    ProtocolError,
    TopicsMessage,
    build_call,
    decode,
    embedding_complete,
    encode,
    error_from,
    error_message,
    generation_complete,
    rerank_complete,
    stamped,
    stream_complete,
    topics_of,
)
from p2p_node.api._ws_topics import SnapshotSource, State, TopicEvent, changes, snapshot_event, state_of

log = logging.getLogger(__name__)

# RFC 6455 "policy violation": the client broke the deal of reading what it asked for.
CLOSE_TOO_SLOW = 1008


@dataclass(frozen=True)
class WebSocketSettings:
    queue_size: int = 256  # encoded messages waiting for the socket, per connection
    send_timeout_s: float = 10.0  # a full queue this long means the client is too far behind
    max_requests: int = 32  # inference requests in flight per connection
    max_message_bytes: int = 4 * 1024 * 1024
    event_interval_s: float = 1.0  # how often subscribed topics are checked for changes
    metrics_interval_s: float = 5.0
    close_timeout_s: float = 5.0  # for the goodbye to a client that fell behind


@dataclass
class ConnectionDeps:
    manager: BackendManager
    node_status: Callable[[], dict[str, Any]]
    snapshots: SnapshotSource
    default_max_tokens: int
    settings: WebSocketSettings


class Connection:
    def __init__(self, websocket: WebSocket, client_id: str, deps: ConnectionDeps) -> None:
        self._ws = websocket
        self.client_id = client_id
        self._deps = deps
        self._settings = deps.settings
        self._outbox, self._inbox = trio.open_memory_channel[str](self._settings.queue_size)
        self._work = trio.CancelScope()
        self._requests: dict[str, trio.CancelScope] = {}
        self._topics: dict[str, State] = {}
        self._metrics_sent_at = 0.0
        self.fell_behind = False

    async def serve(self) -> None:
        """Runs until the client leaves or falls too far behind."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            async with self._outbox:
                with self._work:
                    async with trio.open_nursery() as work:
                        await self.put(
                            stamped(
                                "connection",
                                status="connected",
                                client_id=self.client_id,
                                protocol=PROTOCOL_VERSION,
                                topics=list(TOPICS),
                            )
                        )
                        work.start_soon(self._watch_topics)
                        await self._read_loop(work)
                        work.cancel_scope.cancel()  # the client left: stop what it started
            if not self.fell_behind:
                nursery.cancel_scope.cancel()
            # Otherwise the writer says goodbye and closes; the outbox is closed so it ends.

    # ---- the outbox ---------------------------------------------------------------------

    async def put(self, message: dict[str, Any]) -> None:
        """Queue a message for the client, waiting for room at most `send_timeout_s`."""
        text = encode(message)
        try:
            self._outbox.send_nowait(text)
            return
        except trio.WouldBlock:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.sleep_forever()  # the writer is gone with the client; our cancel is coming
        with trio.move_on_after(self._settings.send_timeout_s):
            try:
                await self._outbox.send(text)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.sleep_forever()
            return
        self._fall_behind()
        await trio.sleep_forever()  # every producer runs in the work scope just cancelled

    def _fall_behind(self) -> None:
        if not self.fell_behind:
            log.warning(
                "websocket client %s fell behind (%d messages queued for %gs); disconnecting",
                self.client_id,
                self._settings.queue_size,
                self._settings.send_timeout_s,
            )
        self.fell_behind = True
        self._work.cancel()

    async def _write_loop(self) -> None:
        async with self._inbox:
            async for text in self._inbox:
                if self.fell_behind:
                    break  # drop the backlog: the client is told why next
                try:
                    await self._ws.send_text(text)
                except (WebSocketDisconnect, WebSocketDisconnected):
                    self._work.cancel()
                    return
            if self.fell_behind:
                await self._say_too_slow()

    async def _say_too_slow(self) -> None:
        notice = error_message(
            "slow_consumer",
            f"the client fell too far behind: {self._settings.queue_size} messages waited more than "
            f"{self._settings.send_timeout_s:g}s; its requests were cancelled and the connection is closing",
        )
        with trio.move_on_after(self._settings.close_timeout_s):
            try:
                await self._ws.send_text(encode(notice))
                await self._ws.close(CLOSE_TOO_SLOW, "client too far behind")
            except (WebSocketDisconnect, WebSocketDisconnected, RuntimeError):
                pass

    # ---- reading ------------------------------------------------------------------------

    async def _read_loop(self, work: trio.Nursery) -> None:
        limit = self._settings.max_message_bytes
        while True:
            message = await self._ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw: str | bytes = message["text"] if message.get("text") is not None else (message.get("bytes") or b"")
            if len(raw) > limit:
                await self.put(error_message("message_too_large", f"messages are limited to {limit} bytes", param=None))
                continue
            await self._handle(raw, work)

    async def _handle(self, raw: str | bytes, work: trio.Nursery) -> None:
        request_id: str | None = None
        try:
            kind, message = decode(raw)
            request_id = getattr(message, "request_id", None)
            await self._dispatch(kind, message, work)
        except ProtocolError as exc:
            await self.put(error_from(exc, request_id))
        except InferenceError as exc:
            await self.put(error_from(exc, request_id))
        except Exception:
            log.exception("websocket client %s: unexpected error handling a message", self.client_id)
            await self.put(error_message("internal_error", "the node failed to handle this message"))

    async def _dispatch(self, kind: str, message: Any, work: trio.Nursery) -> None:
        if kind == "ping":
            assert isinstance(message, PlainMessage)
            await self.put(stamped("pong", **_request_id(message.request_id)))
        elif kind == "status":
            assert isinstance(message, PlainMessage)
            report = self._deps.node_status()
            await self.put(
                stamped(
                    "status",
                    **_request_id(message.request_id),
                    node=report.get("node"),
                    backend_status=report.get("manager"),
                    peers=report.get("peers", []),
                )
            )
        elif kind == "subscribe":
            assert isinstance(message, TopicsMessage)
            await self._subscribe(topics_of(message), message.request_id)
        elif kind == "unsubscribe":
            assert isinstance(message, TopicsMessage)
            topics = topics_of(message)
            for topic in topics:
                self._topics.pop(topic, None)
            await self.put(
                stamped(
                    "unsubscribed",
                    **_request_id(message.request_id),
                    topics=topics,
                    subscriptions=sorted(self._topics),
                )
            )
        elif kind == "inference":
            assert isinstance(message, InferenceMessage)
            await self._start_request(message, work)
        elif kind == "cancel":
            assert isinstance(message, CancelMessage)
            scope = self._requests.get(message.request_id)
            if scope is None:
                raise ProtocolError(
                    "unknown_request",
                    f"no request {message.request_id!r} is in flight on this connection",
                    request_id=message.request_id,
                )
            scope.cancel()

    # ---- topics -------------------------------------------------------------------------

    async def _subscribe(self, topics: list[str], request_id: str | None) -> None:
        added = [t for t in topics if t not in self._topics]
        report = self._deps.snapshots.get()
        states = {topic: state_of(topic, report) for topic in added}
        self._topics.update(states)
        if "metrics" in states:
            self._metrics_sent_at = trio.current_time()
        await self.put(
            stamped("subscribed", **_request_id(request_id), topics=topics, subscriptions=sorted(self._topics))
        )
        for topic, state in states.items():
            await self.put(_event(snapshot_event(topic, state)))

    async def _watch_topics(self) -> None:
        settings = self._settings
        while True:
            await trio.sleep(settings.event_interval_s)
            if not self._topics:
                continue
            report = self._deps.snapshots.get()
            now = trio.current_time()
            for topic in list(self._topics):
                if topic not in self._topics:
                    continue  # unsubscribed while an earlier event waited for room
                new = state_of(topic, report)
                if topic == "metrics":
                    if now - self._metrics_sent_at >= settings.metrics_interval_s:
                        self._metrics_sent_at = now
                        await self.put(_event(TopicEvent("metrics", "metrics", new)))
                    continue
                events = changes(topic, self._topics[topic], new)
                self._topics[topic] = new
                for event in events:
                    await self.put(_event(event))

    # ---- inference ----------------------------------------------------------------------

    async def _start_request(self, message: InferenceMessage, work: trio.Nursery) -> None:
        deps = self._deps
        call = build_call(message, deps.manager, deps.default_max_tokens)
        if call.request_id in self._requests:
            raise ProtocolError(
                "duplicate_request_id",
                f"request {call.request_id!r} is already in flight on this connection",
                param="request_id",
                request_id=call.request_id,
            )
        if len(self._requests) >= self._settings.max_requests:
            raise ProtocolError(
                "too_many_requests",
                f"at most {self._settings.max_requests} requests may be in flight on one connection",
                request_id=call.request_id,
            )
        scope = trio.CancelScope()
        self._requests[call.request_id] = scope
        await self.put(
            stamped(
                "inference_started",
                request_id=call.request_id,
                model=call.request.model,
                task=call.request.task.value,
                stream=call.stream,
            )
        )
        work.start_soon(self._run_request, call, scope)

    async def _run_request(self, call: InferenceCall, scope: trio.CancelScope) -> None:
        ctx = RequestContext(request_id=call.request_id, hops=call.hops)
        if call.timeout_s is not None:
            ctx.deadline = trio.current_time() + call.timeout_s
        final: dict[str, Any] | None = None
        try:
            with scope:
                try:
                    final = await self._serve(call, ctx)
                except InferenceError as exc:
                    final = error_from(exc, call.request_id)
                except Exception:
                    log.exception("websocket request %s failed unexpectedly", call.request_id)
                    final = error_message(
                        "internal_error", "internal error while serving the request", request_id=call.request_id
                    )
        finally:
            # Free the id before the last message can reach the client, so it may reuse it.
            self._requests.pop(call.request_id, None)
        if scope.cancelled_caught:
            final = stamped("inference_cancelled", request_id=call.request_id)
        if final is not None:
            await self.put(final)

    async def _serve(self, call: InferenceCall, ctx: RequestContext) -> dict[str, Any]:
        manager = self._deps.manager
        request = call.request
        if isinstance(request, (ChatRequest, CompletionRequest)):
            if call.stream:
                return await self._stream(call, request, ctx)
            return generation_complete(call, await manager.generate(request, ctx))
        if isinstance(request, EmbeddingRequest):
            result = await manager.embed(request, ctx)
            return embedding_complete(call, result, ctx.served_by or "")
        reranked = await manager.rerank(request, ctx)
        return rerank_complete(call, reranked, ctx.served_by or "")

    async def _stream(
        self, call: InferenceCall, request: ChatRequest | CompletionRequest, ctx: RequestContext
    ) -> dict[str, Any]:
        index = 0
        final = None
        async with aclosing(self._deps.manager.stream(request, ctx)) as chunks:
            async for chunk in chunks:
                if chunk.text:
                    message = stamped("inference_chunk", request_id=call.request_id, chunk=chunk.text, index=index)
                    if call.return_token_ids and chunk.token_ids:
                        message["token_ids"] = list(chunk.token_ids)
                    await self.put(message)
                    index += 1
                if chunk.finish_reason is not None:
                    final = chunk
        return stream_complete(
            call,
            ctx.served_by or "",
            final.finish_reason if final else None,
            final.usage if final else None,
            index,
        )


def _request_id(request_id: str | None) -> dict[str, str]:
    return {"request_id": request_id} if request_id is not None else {}


def _event(event: TopicEvent) -> dict[str, Any]:
    return stamped("event", topic=event.topic, event=event.event, data=event.data)
