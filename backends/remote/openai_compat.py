"""Any server that speaks the OpenAI API: OpenAI, vLLM, llama.cpp's server, TGI, LocalAI,
text-generation-webui, or another p2p-node.

Streaming is the primitive: a non-streamed request is a consumed stream, so time to
first token is measured the same way for every upstream. Usage comes from the upstream's
final usage chunk (`stream_options.include_usage`); servers that ignore that option get
completion tokens counted as content chunks (one token per chunk is what they all send)
and prompt tokens reported as 0.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from backends.base import Backend
from backends.errors import BackendFailedError, BackendUnavailableError, InferenceError
from backends.remote._http import backend_headers, make_client, raise_for_status, translate_errors
from backends.remote._lean_http import LeanHttpClient, use_lean_client
from backends.types import (
    HOPS_HEADER,
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
    token_ids_from,
)

log = logging.getLogger(__name__)

GENERATION_TASKS = (Task.CHAT, Task.COMPLETION)


@dataclass(frozen=True)
class OpenAIBackendSettings:
    backend_id: str
    base_url: str  # up to and including the API prefix, e.g. http://10.0.0.5:8000/v1
    api_key: str | None = None
    # Served models. Discovered ones (GET /models) are added unless discover_models is off;
    # they count as chat+completion models unless the upstream lists their tasks (p2p-node
    # does) or they are named in embedding_models / rerank_models.
    models: tuple[ModelCard, ...] = ()
    embedding_models: tuple[str, ...] = ()
    rerank_models: tuple[str, ...] = ()
    discover_models: bool = True
    timeout_s: float = 300.0
    connect_timeout_s: float = 5.0
    backend_type: BackendType = BackendType.API
    name: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Ask for each streamed token's id (vLLM's `return_token_ids`, p2p-node has it too), so a
    # failover can continue this backend's answer exactly. Servers without it refuse the field.
    return_token_ids: bool = False
    # Set when the upstream is a peer of the mesh reached over HTTP: this node's id, sent with
    # the hops so far, so the peer serves the request itself and never forwards it back.
    mesh_hop: str | None = None
    # "auto": streamed generation from a plain-http upstream without a proxy goes through
    # the lean client (`_lean_http`, a third of httpx's CPU per token); "httpx": always httpx.
    http_client: str = "auto"


class OpenAICompatibleBackend(Backend):
    def __init__(self, settings: OpenAIBackendSettings) -> None:
        super().__init__(settings.backend_id, settings.name)
        self.backend_type = settings.backend_type
        self.settings = settings
        self._base_url = settings.base_url.rstrip("/")
        self._discovered: tuple[ModelCard, ...] = ()
        self._client: httpx.AsyncClient | None = None
        self._lean: LeanHttpClient | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._client = make_client(self._base_url, s.api_key, s.headers, s.timeout_s, s.connect_timeout_s)
        if s.http_client == "auto" and use_lean_client(self._base_url):
            headers = backend_headers(s.api_key, s.headers)
            self._lean = LeanHttpClient(self._base_url, headers, connect_timeout_s=s.connect_timeout_s)
        # A remote that is down at start is not a reason to stop the node: the health
        # loop keeps probing and the status report says why it is unhealthy.
        self.status = await self.check_health()
        if self.status != BackendStatus.HEALTHY:
            log.warning("backend %s not healthy at start: %s", self.id, self.status_detail)

    async def aclose(self) -> None:
        if self._lean is not None:
            await self._lean.aclose()
            self._lean = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def check_health(self) -> BackendStatus:
        try:
            with translate_errors(self.id):
                response = await self._http.get("/models", timeout=self.settings.connect_timeout_s + 5)
                raise_for_status(response, self.id)
                if self.settings.discover_models:
                    self._discovered = tuple(self._parse_models(response.json()))
        except InferenceError as exc:
            self.status_detail = exc.message
            return BackendStatus.UNHEALTHY
        self.status_detail = ""
        return BackendStatus.HEALTHY

    # ---- what it offers --------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        cards = {(card.id, card.task): card for card in self._discovered}
        cards.update({(card.id, card.task): card for card in self.settings.models})
        for name in self.settings.embedding_models:
            cards.setdefault((name, Task.EMBEDDING), ModelCard(name, Task.EMBEDDING, owned_by=self.id))
        for name in self.settings.rerank_models:
            cards.setdefault((name, Task.RERANK), ModelCard(name, Task.RERANK, owned_by=self.id))
        models = tuple(cards.values())
        return Capabilities(
            tasks=frozenset(card.task for card in models),
            models=models,
            streaming=True,
            protocols=frozenset({"openai"}),
            context_window=max((c.context_window or 0 for c in models), default=0) or None,
        )

    @property
    def endpoint(self) -> str | None:
        return self._base_url

    def describe(self) -> dict[str, object]:
        return {
            "base_url": self._base_url,
            "discovered_models": [c.id for c in self._discovered],
            "streaming_client": "lean" if self._lean is not None else "httpx",
        }

    def _parse_models(self, body: Any) -> Iterable[ModelCard]:
        special = {name: Task.EMBEDDING for name in self.settings.embedding_models}
        special.update({name: Task.RERANK for name in self.settings.rerank_models})
        for entry in body.get("data", []):
            model_id = str(entry["id"])
            window = entry.get("max_model_len") or entry.get("context_window") or entry.get("context_length")
            listed = [Task.parse(t) for t in entry.get("tasks", []) if _known_task(t)]
            tasks = listed or ([special[model_id]] if model_id in special else list(GENERATION_TASKS))
            for task in tasks:
                yield ModelCard(model_id, task, context_window=int(window) if window else None, owned_by=self.id)

    # ---- inference ------------------------------------------------------------------

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise BackendUnavailableError(f"backend {self.id} is not running")
        return self._client

    def _request_headers(self, ctx: RequestContext) -> dict[str, str]:
        headers = {"x-request-id": ctx.request_id}
        if self.settings.mesh_hop is not None:
            headers[HOPS_HEADER] = ",".join([*ctx.hops, self.settings.mesh_hop])
        return headers

    def _timeout(self, ctx: RequestContext) -> httpx.Timeout:
        total = self.settings.timeout_s
        if ctx.deadline is not None:
            # A second past the deadline: the manager's cancel scope should fire first and
            # report the deadline, not a timed-out backend to retry elsewhere.
            total = max(0.001, min(total, ctx.deadline - trio.current_time() + 1.0))
        return httpx.Timeout(total, connect=min(total, self.settings.connect_timeout_s))

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        params = request.params
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if self.settings.return_token_ids:
            body["return_token_ids"] = True
        if isinstance(request, ChatRequest):
            path = "/chat/completions"
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            path = "/completions"
            body["prompt"] = request.prompt
        chat = isinstance(request, ChatRequest)
        with translate_errors(self.id):
            async with self._streamed_reply(path, body, ctx) as reply:
                with translate_errors(self.id, reply_started=True):
                    async for chunk in _parse_sse(reply, self.id, chat=chat):
                        yield chunk

    @asynccontextmanager
    async def _streamed_reply(
        self, path: str, body: dict[str, Any], ctx: RequestContext
    ) -> AsyncIterator[AsyncIterable[bytes]]:
        """POSTs `body` and gives the reply's body bytes, through the lean client where it
        applies, else httpx; an error status is raised as ours, its message quoted."""
        headers, timeout = self._request_headers(ctx), self._timeout(ctx)
        if self._lean is not None:
            assert timeout.read is not None
            async with self._lean.post_stream(path, json.dumps(body).encode(), headers, timeout.read) as lean:
                if lean.status_code >= 400:
                    raise_for_status(await lean.as_httpx(), self.id)
                yield lean.aiter_bytes()
            return
        async with self._http.stream("POST", path, json=body, headers=headers, timeout=timeout) as response:
            if response.status_code >= 400:
                await response.aread()
                raise_for_status(response, self.id)
            yield response.aiter_bytes()

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        body = {"model": request.model, "input": list(request.inputs), "encoding_format": "float"}
        with translate_errors(self.id):
            response = await self._http.post(
                "/embeddings", json=body, headers=self._request_headers(ctx), timeout=self._timeout(ctx)
            )
            raise_for_status(response, self.id)
            answer = response.json()
            data = sorted(answer["data"], key=lambda item: item["index"])
            vectors = tuple(tuple(float(x) for x in item["embedding"]) for item in data)
            if len(vectors) != len(request.inputs):
                raise BackendFailedError(f"backend {self.id} returned {len(vectors)} vectors for {len(request.inputs)}")
            usage = answer.get("usage") or {}
            return EmbeddingResult(vectors, Usage(int(usage.get("prompt_tokens", 0))), request.model, self.id)

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        body: dict[str, Any] = {"model": request.model, "query": request.query, "documents": list(request.documents)}
        if request.top_n is not None:
            body["top_n"] = request.top_n
        with translate_errors(self.id):
            response = await self._http.post(
                "/rerank", json=body, headers=self._request_headers(ctx), timeout=self._timeout(ctx)
            )
            raise_for_status(response, self.id)
            answer = response.json()
            hits = sorted(
                (RerankHit(int(r["index"]), float(r["relevance_score"])) for r in answer["results"]),
                key=lambda hit: hit.relevance_score,
                reverse=True,
            )
            if request.top_n is not None:
                hits = hits[: request.top_n]
            usage = answer.get("usage") or {}
            return RerankResult(tuple(hits), Usage(int(usage.get("prompt_tokens", 0))), request.model, self.id)


def _known_task(name: str) -> bool:
    try:
        Task.parse(name)
    except ValueError:
        return False
    return True


async def _sse_lines(body: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
    """The body's lines as bytes. httpx's aiter_lines decodes to text and splits through
    two incremental decoders; per token that cost more than the rest of our relay."""
    pending = b""
    async for data in body:
        *complete, pending = (pending + data).split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r")
    if pending:
        yield pending.rstrip(b"\r")


async def _parse_sse(
    body: AsyncIterable[bytes], backend_id: str, *, chat: bool
) -> AsyncGenerator[GenerationChunk, None]:
    """OpenAI's SSE stream → our chunks. The final chunk carries finish_reason and usage."""
    finish: str | None = None
    usage: Usage | None = None
    content_chunks = 0
    done = False
    lines = _sse_lines(body)
    async for line in lines:
        if not line.startswith(b"data:"):
            continue  # comments, event names, keep-alives
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            raise BackendFailedError(f"backend {backend_id} failed mid-stream: {message}")
        if event.get("usage"):
            u = event["usage"]
            usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                content_chunks += 1
                yield GenerationChunk(text, token_ids=token_ids_from(choice.get("token_ids")))
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    if done:
        # Read to the end of the body: an unfinished response can't go back to the pool,
        # and a new connection (a TLS handshake, upstream) per request is what that costs.
        with trio.move_on_after(1.0):
            async for _ in lines:
                pass
    if not done and finish is None:
        raise BackendFailedError(f"backend {backend_id} ended the stream before finishing the answer")
    if usage is None:
        usage = Usage(0, content_chunks)
    yield GenerationChunk("", finish_reason="length" if finish == "length" else "stop", usage=usage)
