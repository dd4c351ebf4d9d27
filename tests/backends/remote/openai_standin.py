"""A stand-in OpenAI-compatible server for the adapter's failure-mode tests.

The happy path is tested against a real second p2p-node (tests/p2p_node/test_remote_backends.py);
this server exists to produce what a real one rarely does on demand: rate limits, auth
failures, error events mid-stream, streams cut short, servers that ignore
`stream_options`. Its "model" echoes the last user message word by word.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class OpenAIStandin:
    models: list[dict[str, Any]] = field(default_factory=lambda: [{"id": "echo", "object": "model"}])
    send_usage: bool = True
    error_after_chunks: int | None = None  # send an error event after this many chunks
    cut_after_chunks: int | None = None  # end the stream without finish_reason or [DONE]
    chunk_delay_s: float = 0.0
    next_reply: Reply | None = None  # answer the next request with this instead
    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    streams_closed_early: int = 0
    stream_closed_early: trio.Event = field(default_factory=trio.Event)
    url: str = ""

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self._models),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/rerank", self._rerank, methods=["POST"]),
            ]
        )

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, self.app(), config))  # type: ignore[arg-type]
            self.url = binds[0] + "/v1"
            task_status.started(self.url)

    def _scripted(self) -> Response | None:
        reply, self.next_reply = self.next_reply, None
        if reply is None:
            return None
        return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)

    async def _record(self, request: Request) -> dict[str, Any]:
        body = await request.json() if request.method == "POST" else {}
        self.requests.append((request.url.path, dict(request.headers), body))
        return body

    async def _models(self, request: Request) -> Response:
        await self._record(request)
        return self._scripted() or JSONResponse({"object": "list", "data": self.models})

    async def _chat(self, request: Request) -> Response:
        body = await self._record(request)
        scripted = self._scripted()
        if scripted is not None:
            return scripted
        words = body["messages"][-1]["content"].split()[: body.get("max_tokens", 16)]
        return StreamingResponse(self._events(words), media_type="text/event-stream")

    async def _events(self, words: list[str]) -> AsyncIterator[bytes]:
        def event(payload: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(payload)}\n\n".encode()

        finished = False
        try:
            for i, word in enumerate(words):
                if i == self.error_after_chunks:
                    yield event({"error": {"message": "engine died", "type": "server_error", "code": 500}})
                    finished = True
                    return
                if i == self.cut_after_chunks:
                    finished = True
                    return
                await trio.sleep(self.chunk_delay_s)
                text = word if i == 0 else " " + word
                yield event({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            if self.send_usage:
                yield event({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": len(words)}})
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.streams_closed_early += 1
                self.stream_closed_early.set()

    async def _embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0]} for i, t in enumerate(texts)]
        data.reverse()  # the API promises `index`, not order
        return self._scripted() or JSONResponse({"data": data, "usage": {"prompt_tokens": len(texts) * 3}})

    async def _rerank(self, request: Request) -> Response:
        body = await self._record(request)
        results = [{"index": i, "relevance_score": float(len(d))} for i, d in enumerate(body["documents"])]
        return self._scripted() or JSONResponse({"results": results, "usage": {"prompt_tokens": 5}})
