"""Helpers for the WebSocket tests: a JSON session over trio-websocket, a backend with a
deterministic script, and the WebSocket router served in-process by hypercorn on a real
loopback port (for what a node process can't be made to do on cue: fall behind, change a
backend's health, gain peers)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio
from fastapi import FastAPI
from trio_websocket import WebSocketConnection, open_websocket_url

from backends.base import Backend
from backends.catalog import ModelCatalog
from backends.errors import BackendFailedError
from backends.manager import BackendManager, ManagerSettings
from backends.types import (
    BackendStatus,
    BackendType,
    Capabilities,
    ChatRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    RequestContext,
    RerankHit,
    RerankRequest,
    RerankResult,
    Task,
    Usage,
)
from p2p_node.api import websocket
from p2p_node.api.app import ApiDependencies
from p2p_node.api.auth import ApiKeys, RequireApiKey
from p2p_node.api.websocket import WebSocketSettings

TERMINAL = ("inference_complete", "inference_cancelled", "error")


# ---- a JSON session ------------------------------------------------------------------


class WsSession:
    def __init__(self, ws: WebSocketConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send_message(message if isinstance(message, (str, bytes)) else json.dumps(message))

    async def recv(self, wait_s: float = 10.0) -> dict[str, Any]:
        with trio.fail_after(wait_s):
            return dict(json.loads(await self.ws.get_message()))

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], wait_s: float = 10.0
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Messages up to the first that matches, and that one."""
        seen: list[dict[str, Any]] = []
        with trio.fail_after(wait_s):
            while True:
                message = await self.recv(wait_s)
                if predicate(message):
                    return seen, message
                seen.append(message)

    async def ping(self, request_id: str = "ping") -> dict[str, Any]:
        await self.send({"type": "ping", "request_id": request_id})
        _, pong = await self.recv_until(lambda m: m["type"] == "pong" and m.get("request_id") == request_id)
        return pong

    async def event(self, topic: str, event: str, wait_s: float = 10.0) -> dict[str, Any]:
        _, found = await self.recv_until(
            lambda m: m["type"] == "event" and m["topic"] == topic and m["event"] == event, wait_s
        )
        return found


@asynccontextmanager
async def ws_session(base_url: str, path: str = "/ws/test", **options: Any) -> AsyncIterator[WsSession]:
    url = base_url.replace("http://", "ws://") + path
    async with open_websocket_url(url, **{"connect_timeout": 10, **options}) as ws:
        with trio.fail_after(10):
            hello = json.loads(await ws.get_message())
        assert hello["type"] == "connection", hello
        yield WsSession(ws, hello)


async def collect(session: WsSession, request_id: str, wait_s: float = 60.0) -> tuple[list[str], dict[str, Any]]:
    """The chunks of one request and its terminal message (other requests' messages are skipped)."""
    return (await collect_all(session, [request_id], wait_s))[request_id]


async def collect_all(
    session: WsSession, request_ids: list[str], wait_s: float = 60.0
) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """Chunks and terminal message of each of several requests running at once."""
    chunks: dict[str, list[str]] = {request_id: [] for request_id in request_ids}
    ends: dict[str, dict[str, Any]] = {}
    with trio.fail_after(wait_s):
        while len(ends) < len(request_ids):
            message = await session.recv(wait_s)
            request_id = message.get("request_id")
            if request_id not in chunks:
                continue
            if message["type"] == "inference_chunk":
                chunks[request_id].append(message["chunk"])
            elif message["type"] in TERMINAL:
                ends[request_id] = message
    return {request_id: (chunks[request_id], ends[request_id]) for request_id in request_ids}


# ---- a backend with a script -----------------------------------------------------------


class ScriptBackend(Backend):
    """Answers chunk i of a request as `<tag>-<i> `, where the tag is the prompt's last word.
    A prompt containing `fail-after-2` breaks after two chunks; `pad` makes every chunk that
    many bytes long (to fill socket buffers quickly)."""

    backend_type = BackendType.API

    def __init__(self, backend_id: str = "script", *, delay: float = 0.0, pad: int = 0) -> None:
        super().__init__(backend_id)
        self.delay = delay
        self.pad = pad
        self.status = BackendStatus.HEALTHY
        self.health = BackendStatus.HEALTHY
        self.open_streams = 0
        self.closed_streams = 0
        self.chunks_yielded = 0

    @property
    def capabilities(self) -> Capabilities:
        tasks = (Task.CHAT, Task.COMPLETION, Task.EMBEDDING, Task.RERANK)
        return Capabilities(tasks=frozenset(tasks), models=tuple(ModelCard("script", t, loaded=True) for t in tasks))

    async def check_health(self) -> BackendStatus:
        return self.health

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        prompt = request.messages[-1].content if isinstance(request, ChatRequest) else request.prompt
        tag = prompt.split()[-1] if prompt.split() else "empty"
        self.open_streams += 1
        try:
            for i in range(request.params.max_tokens):
                if "fail-after-2" in prompt and i == 2:
                    raise BackendFailedError(f"{self.id} broke mid-stream")
                text = f"{tag}-{i} "
                yield GenerationChunk(text.ljust(self.pad, "."))
                self.chunks_yielded += 1
                await trio.sleep(self.delay)
            yield GenerationChunk(
                "", finish_reason="length", usage=Usage(len(prompt.split()), request.params.max_tokens)
            )
        finally:
            self.open_streams -= 1
            self.closed_streams += 1

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        return EmbeddingResult(tuple((float(len(t)), 1.0) for t in request.inputs), Usage(len(request.inputs)))

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        query = set(request.query.split())
        scores = [len(query & set(doc.split())) / max(len(query), 1) for doc in request.documents]
        hits = sorted((RerankHit(i, s) for i, s in enumerate(scores)), key=lambda h: -h.relevance_score)
        return RerankResult(tuple(hits[: request.top_n or len(hits)]), Usage(len(request.documents)))


# ---- the router served in-process -----------------------------------------------------


@dataclass
class InProcessNode:
    url: str
    manager: BackendManager
    backend: ScriptBackend
    peers: list[dict[str, Any]] = field(default_factory=list)


@asynccontextmanager
async def serve_in_process(
    settings: WebSocketSettings,
    *,
    backend: ScriptBackend | None = None,
    api_keys: tuple[str, ...] = (),
) -> AsyncIterator[InProcessNode]:
    """The WebSocket router and the API-key middleware, served by hypercorn under trio
    exactly as the node serves them, with a manager around a `ScriptBackend`."""
    backend = backend or ScriptBackend()
    manager = BackendManager(
        ManagerSettings(health_check_interval_s=3600.0),
        ModelCatalog(defaults={task: "script" for task in Task}),
    )
    manager.register(backend)
    node = InProcessNode(url="", manager=manager, backend=backend)

    def node_status() -> dict[str, Any]:
        return {"node": {"id": "in-process"}, "manager": manager.status_report(), "peers": list(node.peers)}

    deps = ApiDependencies(
        manager=manager,
        node_status=node_status,
        readiness=lambda: (True, "ready"),
        render_metrics=lambda: b"",
        inference_health=dict,
        default_max_tokens=8,
        api_keys=ApiKeys(api_keys),
    )
    app = FastAPI()
    app.include_router(websocket.build_router(deps, settings))
    app.add_middleware(RequireApiKey, keys=deps.api_keys)
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        node.url = binds[0]
        try:
            yield node
        finally:
            stop.set()
            nursery.cancel_scope.cancel()
