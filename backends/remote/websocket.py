"""A remote node reached through its WebSocket API (`/ws/{client_id}`, docs/PROTOCOL.md).

One connection carries every concurrent request, told apart by request id; a reader task
routes each incoming message to its request's channel. Health is the round trip of a
`ping`; the served models come from the remote `status` (its own backends, not its
peers: those it would have to forward). When the connection drops, requests in flight
fail (before output: retryable elsewhere) and the backend reconnects with backoff.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, open_websocket_url

from backends.base import Backend
from backends.errors import BackendFailedError, BackendUnavailableError, error_from_code
from backends.metrics import Ewma
from backends.types import (
    BackendStatus,
    BackendType,
    Capabilities,
    ChatRequest,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    RequestContext,
    RerankHit,
    RerankRequest,
    RerankResult,
    Task,
    Usage,
    token_ids_from,
)

log = logging.getLogger(__name__)

# What ends a connection to the remote (ValueError: a refused or malformed status answer).
_CONNECTION_LOST = (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError, ValueError)


@dataclass(frozen=True)
class WebSocketBackendSettings:
    backend_id: str
    url: str  # ws://host:port (the /ws/<client id> path is added)
    api_key: str | None = None
    timeout_s: float = 300.0
    connect_timeout_s: float = 5.0
    ping_interval_s: float = 5.0
    reconnect_max_backoff_s: float = 30.0
    name: str | None = None
    # Set when the remote is a peer of the mesh: this node's id, sent with the hops so far,
    # so the peer serves the request itself and never forwards it back.
    mesh_hop: str | None = None


class WebSocketBackend(Backend):
    backend_type = BackendType.WEBSOCKET

    def __init__(self, settings: WebSocketBackendSettings) -> None:
        super().__init__(settings.backend_id, settings.name)
        self.settings = settings
        self._client_id = f"p2p-node-{uuid.uuid4().hex[:12]}"
        self._ws: WebSocketConnection | None = None
        self._waiting: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._models: tuple[ModelCard, ...] = ()
        self._rtt = Ewma(tau_s=30.0)
        self._pongs: dict[str, trio.Event] = {}
        self._connected = trio.Event()

    # ---- connection ----------------------------------------------------------------------

    @property
    def endpoint(self) -> str | None:
        return self.settings.url

    def _url(self) -> str:
        return f"{self.settings.url.rstrip('/')}/ws/{self._client_id}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stay_connected)
            # A remote that is down at start is not a reason to hold the node back.
            with trio.move_on_after(self.settings.connect_timeout_s):
                await self._connected.wait()
            task_status.started()

    async def _stay_connected(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._session()
            except* _CONNECTION_LOST as group:  # raised inside the session's nursery: grouped
                lost = group.exceptions[0]
                self.status_detail = f"{self.settings.url}: {lost or type(lost).__name__}"
            finally:
                if self._ws is not None:  # it was connected: this is a reconnect, not a retry
                    backoff = 0.5
                self._ws = None
                self._fail_waiting("the WebSocket connection to the node closed")
            self.status = BackendStatus.UNHEALTHY
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.reconnect_max_backoff_s)

    async def _session(self) -> None:
        """One connection, from open to close; returns when the remote closes it."""
        headers = [(b"authorization", f"Bearer {self.settings.api_key}".encode())] if self.settings.api_key else []
        async with open_websocket_url(
            self._url(),
            extra_headers=headers,
            connect_timeout=self.settings.connect_timeout_s,
            max_message_size=64 * 1024 * 1024,
            message_queue_size=256,
        ) as ws:
            self._ws = ws
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, ws, nursery.cancel_scope)
                await self._refresh_models(ws)
                self.status, self.status_detail = BackendStatus.HEALTHY, ""
                self._connected.set()
                nursery.start_soon(self._keep_pinging)

    async def _read(self, ws: WebSocketConnection, scope: trio.CancelScope) -> None:
        try:
            while True:
                message = json.loads(await ws.get_message())
                request_id = message.get("request_id")
                if message.get("type") == "pong" and request_id in self._pongs:
                    self._pongs.pop(request_id).set()
                elif request_id in self._waiting:
                    try:
                        self._waiting[request_id].send_nowait(message)
                    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        except (ConnectionClosed, json.JSONDecodeError) as exc:
            self.status_detail = f"connection lost: {exc}"
        finally:
            scope.cancel()

    def _fail_waiting(self, reason: str) -> None:
        for channel in self._waiting.values():
            try:
                channel.send_nowait({"type": "_closed", "message": reason})
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _keep_pinging(self) -> None:
        while True:
            await trio.sleep(self.settings.ping_interval_s)
            self.status = await self.check_health()

    async def check_health(self) -> BackendStatus:
        ws = self._ws
        if ws is None:
            return BackendStatus.UNHEALTHY
        ping_id = f"ping-{uuid.uuid4().hex[:8]}"
        pong = self._pongs[ping_id] = trio.Event()
        started = trio.current_time()
        try:
            await ws.send_message(json.dumps({"type": "ping", "request_id": ping_id}))
            with trio.fail_after(self.settings.connect_timeout_s):
                await pong.wait()
        except (ConnectionClosed, trio.TooSlowError):
            self._pongs.pop(ping_id, None)
            self.status_detail = "no pong"
            return BackendStatus.UNHEALTHY
        self._rtt.update(trio.current_time() - started)
        try:
            await self._refresh_models(ws)
        except _CONNECTION_LOST as exc:  # a verdict, not a crash: the session ends on its own
            self.status_detail = f"status refused: {exc or type(exc).__name__}"
            return BackendStatus.UNHEALTHY
        return BackendStatus.HEALTHY

    async def _refresh_models(self, ws: WebSocketConnection) -> None:
        request_id = f"status-{uuid.uuid4().hex[:8]}"
        answer = await self._ask(ws, {"type": "status", "request_id": request_id}, request_id, "status")
        cards = {}
        for backend in answer.get("backend_status", {}).get("backends", []):
            if backend.get("type") in ("p2p", "websocket", "hybrid"):
                continue  # those the remote node would only forward
            for model in backend.get("capabilities", {}).get("models", []):
                try:
                    task = Task.parse(str(model["task"]))
                except (KeyError, ValueError):
                    continue
                card = ModelCard(
                    str(model["id"]), task, model.get("context_window"), bool(model.get("loaded")), self.id
                )
                cards[(card.id, task)] = card
        self._models = tuple(cards.values())

    async def _ask(
        self, ws: WebSocketConnection, message: dict[str, Any], request_id: str, kind: str
    ) -> dict[str, Any]:
        send, receive = trio.open_memory_channel[dict[str, Any]](16)
        self._waiting[request_id] = send
        try:
            await ws.send_message(json.dumps(message))
            with trio.fail_after(self.settings.connect_timeout_s + 5):
                async for reply in receive:
                    if reply.get("type") == kind:
                        return reply
                    if reply.get("type") in ("error", "_closed"):
                        raise ValueError(reply.get("message", "status refused"))
        finally:
            self._waiting.pop(request_id, None)
        raise ValueError("no answer")

    # ---- what it offers ------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            tasks=frozenset(c.task for c in self._models),
            models=self._models,
            streaming=True,
            protocols=frozenset({"websocket"}),
        )

    def describe(self) -> dict[str, object]:
        rtt = self._rtt.value
        return {
            "url": self._url(),
            "connected": self._ws is not None,
            "rtt_ms": None if rtt is None else round(rtt * 1000, 2),
        }

    # ---- inference -----------------------------------------------------------------------

    def _inference(self, request_id: str, request: Any, ctx: RequestContext) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "inference", "request_id": request_id, "model": request.model}
        if self.settings.mesh_hop is not None:
            message["hops"] = [*ctx.hops, self.settings.mesh_hop]
        if isinstance(request, EmbeddingRequest):
            message.update(task="embedding", inputs=list(request.inputs))
        elif isinstance(request, RerankRequest):
            inputs: dict[str, Any] = {"query": request.query, "documents": list(request.documents)}
            if request.top_n is not None:
                inputs["top_n"] = request.top_n
            message.update(task="rerank", inputs=inputs, parameters={"return_documents": False})
        else:
            p = request.params
            parameters: dict[str, Any] = {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p}
            if p.seed is not None:
                parameters["seed"] = p.seed
            if p.stop:
                parameters["stop"] = list(p.stop)
            if isinstance(request, ChatRequest):
                message.update(task="chat", inputs=[{"role": m.role, "content": m.content} for m in request.messages])
            else:
                message.update(task="completion", inputs=request.prompt)
            # Token ids let a failover continue this answer exactly; servers without them ignore it.
            message.update(parameters=parameters, stream=True, return_token_ids=True)
        return message

    async def _exchange(self, request: Any, ctx: RequestContext) -> AsyncGenerator[dict[str, Any], None]:
        """Send one inference and yield its replies until the terminal one (inclusive)."""
        ws = self._ws
        if ws is None:
            raise BackendUnavailableError(f"backend {self.id}: not connected to {self.settings.url}")
        request_id = f"{ctx.request_id}-{uuid.uuid4().hex[:6]}"
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._waiting[request_id] = send
        finished = False
        try:
            try:
                await ws.send_message(json.dumps(self._inference(request_id, request, ctx)))
            except ConnectionClosed as exc:
                raise BackendUnavailableError(f"backend {self.id}: connection closed ({exc})") from None
            async for reply in receive:
                kind = reply.get("type")
                if kind == "_closed":
                    raise BackendUnavailableError(f"backend {self.id}: {reply['message']}")
                if kind in ("inference_complete", "error", "inference_cancelled"):
                    finished = True
                yield reply
                if finished:
                    return
        finally:
            self._waiting.pop(request_id, None)
            if not finished and self._ws is ws:
                with trio.move_on_after(1), trio.CancelScope(shield=True):
                    try:
                        await ws.send_message(json.dumps({"type": "cancel", "request_id": request_id}))
                    except ConnectionClosed:
                        pass

    def _error(self, reply: dict[str, Any]) -> Exception:
        message = f"backend {self.id}: {reply.get('message', 'error')}"
        return error_from_code(str(reply.get("code", "")), message, reply.get("retry_after_s"))

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        emitted = False
        try:
            replies = self._exchange(request, ctx)
            async for reply in replies:
                kind = reply.get("type")
                if kind == "inference_chunk" and reply.get("chunk"):
                    emitted = True
                    yield GenerationChunk(str(reply["chunk"]), token_ids=token_ids_from(reply.get("token_ids")))
                elif kind == "inference_complete":
                    usage = reply.get("usage") or {}
                    reason: FinishReason = "length" if reply.get("finish_reason") == "length" else "stop"
                    yield GenerationChunk(
                        "",
                        finish_reason=reason,
                        usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
                    )
                    return
                elif kind == "error":
                    raise self._error(reply)
                elif kind == "inference_cancelled":
                    raise BackendFailedError(f"backend {self.id}: the remote node cancelled the request")
            raise BackendFailedError(f"backend {self.id}: the answer ended without completing")
        except BackendUnavailableError as exc:
            if emitted:  # it took the request, then went away: a failure while serving
                raise BackendFailedError(exc.message) from None
            raise

    async def _result(self, request: Any, ctx: RequestContext) -> dict[str, Any]:
        async for reply in self._exchange(request, ctx):
            if reply.get("type") == "inference_complete":
                return reply
            if reply.get("type") == "error":
                raise self._error(reply)
        raise BackendFailedError(f"backend {self.id}: no result")

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        reply = await self._result(request, ctx)
        vectors = tuple(tuple(float(x) for x in v) for v in reply["result"])
        usage = Usage(int((reply.get("usage") or {}).get("prompt_tokens", 0)))
        return EmbeddingResult(vectors, usage, request.model, self.id)

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        reply = await self._result(request, ctx)
        hits = tuple(RerankHit(int(h["index"]), float(h["relevance_score"])) for h in reply["result"])
        usage = Usage(int((reply.get("usage") or {}).get("prompt_tokens", 0)))
        return RerankResult(hits, usage, request.model, self.id)
