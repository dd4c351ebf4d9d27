"""Ollama through its native API: `/api/chat`, `/api/generate`, `/api/embed`, `/api/tags`.

Native rather than Ollama's OpenAI layer because only the native API reports real token
counts on its final stream line (`prompt_eval_count`, `eval_count`), loads and unloads
models on request (`keep_alive`), and lists what is installed and what is in memory.

Streams are NDJSON: one object per line, `done: true` on the last, which carries the
finish reason and the counts. Ollama reports a failure after the reply has started as an
`{"error": ...}` line (the status stays 200), so every line is checked for one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from backends.base import Backend
from backends.errors import BackendFailedError, BackendUnavailableError, InferenceError
from backends.remote._http import make_client, raise_for_status, translate_errors
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
    Task,
    Usage,
)

log = logging.getLogger(__name__)

_DEADLINE_GRACE_S = 1.0

DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"


@dataclass(frozen=True)
class OllamaSettings:
    backend_id: str = "ollama"
    base_url: str = DEFAULT_OLLAMA_URL  # the server root, without /api
    api_key: str | None = None  # sent as a bearer token (Ollama behind an authenticating proxy)
    # Served models. None: whatever /api/tags lists, refreshed on every health check.
    models: tuple[str, ...] | None = None
    # /api/tags does not reliably say which models embed (only newer servers list
    # capabilities), so these names are embedding models; all others chat and complete.
    # With an explicit `models` list, these are served in addition to it.
    embedding_models: tuple[str, ...] = ()
    # How long Ollama keeps a model in memory after a request: a duration string ("10m",
    # "1h", "-1" for ever) or seconds. None leaves it to the server's OLLAMA_KEEP_ALIVE.
    keep_alive: str | float | None = None
    # True: /api/generate gets the prompt verbatim, without the model's prompt template.
    raw_completions: bool = False
    timeout_s: float = 300.0
    connect_timeout_s: float = 5.0
    name: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Model:
    name: str
    embedding: bool
    context_window: int | None = None
    dimensions: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


def canonical(name: str) -> str:
    """Ollama's own reading of a model name: no tag means `:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


class OllamaBackend(Backend):
    backend_type = BackendType.API

    def __init__(self, settings: OllamaSettings) -> None:
        super().__init__(settings.backend_id, settings.name or f"{settings.backend_id} (ollama)")
        self.settings = settings
        self._base_url = settings.base_url.rstrip("/")
        self._embedding = {canonical(n) for n in settings.embedding_models}
        self._models: dict[str, _Model] = self._configured_models()
        self._running: dict[str, int | None] = {}  # canonical name -> context length, from /api/ps
        self._dimensions: dict[str, int] = {}  # canonical name -> vector size seen in a reply
        self._version: str | None = None
        self._client: httpx.AsyncClient | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._client = make_client(self._base_url, s.api_key, s.headers, s.timeout_s, s.connect_timeout_s)
        # A server that is down at start does not stop the node: the health loop keeps
        # probing (and discovering), and the status report says why it is unhealthy.
        self.status = await self.check_health()
        if self.status != BackendStatus.HEALTHY:
            log.warning("backend %s not healthy at start: %s", self.id, self.status_detail)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def check_health(self) -> BackendStatus:
        try:
            await self._refresh()
        except InferenceError as exc:
            self.status_detail = exc.message
            return BackendStatus.UNHEALTHY
        self.status_detail = ""
        return BackendStatus.HEALTHY

    async def _refresh(self) -> None:
        probe = self.settings.connect_timeout_s + 5
        if self.settings.models is None:
            self._models = self._parse_tags(await self._get_json("/api/tags", probe))
        else:
            self._version = str((await self._get_json("/api/version", probe)).get("version", ""))
        try:
            running = await self._get_json("/api/ps", probe)
        except InferenceError as exc:  # what is in memory is a detail, not a health verdict
            log.debug("backend %s: /api/ps failed: %s", self.id, exc)
            return
        self._running = {
            canonical(str(entry.get("name") or entry["model"])): _positive_int(entry.get("context_length"))
            for entry in running.get("models") or []
        }

    def _configured_models(self) -> dict[str, _Model]:
        if self.settings.models is None:
            return {}
        models = {name: _Model(name, canonical(name) in self._embedding) for name in self.settings.models}
        for name in self.settings.embedding_models:
            models.setdefault(name, _Model(name, True))
        return models

    def _parse_tags(self, body: Any) -> dict[str, _Model]:
        models: dict[str, _Model] = {}
        for entry in body.get("models") or []:
            name = str(entry.get("name") or entry["model"])
            details = dict(entry.get("details") or {})
            listed = entry.get("capabilities")  # newer servers only
            embedding = canonical(name) in self._embedding or (
                isinstance(listed, list) and "embedding" in listed and "completion" not in listed
            )
            models[name] = _Model(
                name,
                embedding,
                context_window=_positive_int(details.get("context_length")),
                dimensions=_positive_int(details.get("embedding_length")),
                details=details,
            )
        return models

    # ---- what it offers --------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        cards: list[ModelCard] = []
        for model in self._models.values():
            key = canonical(model.name)
            window = model.context_window or self._running.get(key)
            loaded = key in self._running
            names = [model.name]
            if self.settings.models is None and model.name.endswith(":latest"):
                # What people type, and what Ollama itself accepts for the :latest tag.
                names.append(model.name.removesuffix(":latest"))
            for name in names:
                if model.embedding:
                    dims = model.dimensions or self._dimensions.get(key)
                    cards.append(
                        ModelCard(name, Task.EMBEDDING, window, loaded=loaded, owned_by=self.id, dimensions=dims)
                    )
                else:
                    for task in (Task.CHAT, Task.COMPLETION):
                        cards.append(ModelCard(name, task, window, loaded=loaded, owned_by=self.id))
        return Capabilities(
            tasks=frozenset(card.task for card in cards),
            models=tuple(cards),
            streaming=True,
            protocols=frozenset({"ollama"}),
            context_window=max((c.context_window or 0 for c in cards), default=0) or None,
        )

    @property
    def endpoint(self) -> str | None:
        return self._base_url

    def describe(self) -> dict[str, object]:
        return {
            "base_url": self._base_url,
            "version": self._version,
            "discovery": self.settings.models is None,
            "keep_alive": self.settings.keep_alive,
            "models": {
                m.name: {
                    "task": "embedding" if m.embedding else "chat",
                    "context_window": m.context_window,
                    **m.details,
                }
                for m in self._models.values()
            },
            "loaded": sorted(self._running),
        }

    # ---- inference ------------------------------------------------------------------

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise BackendUnavailableError(f"backend {self.id} is not running")
        return self._client

    def _timeout(self, ctx: RequestContext | None) -> httpx.Timeout:
        total = self.settings.timeout_s
        if ctx is not None and ctx.deadline is not None:
            # A little past the deadline: the manager's cancel scope should end the request
            # (as DeadlineExceededError); this only bounds a caller without one.
            total = max(0.001, min(total, ctx.deadline - trio.current_time() + _DEADLINE_GRACE_S))
        return httpx.Timeout(total, connect=min(total, self.settings.connect_timeout_s))

    def _with_keep_alive(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.settings.keep_alive is not None:
            body["keep_alive"] = self.settings.keep_alive
        return body

    async def _get_json(self, path: str, probe_s: float) -> Any:
        with translate_errors(self.id):
            response = await self._http.get(path, timeout=probe_s)
            raise_for_status(response, self.id)
            return response.json()

    async def _post_json(self, path: str, body: dict[str, Any], ctx: RequestContext | None) -> Any:
        headers = {"x-request-id": ctx.request_id} if ctx is not None else {}
        with translate_errors(self.id):
            response = await self._http.post(path, json=body, headers=headers, timeout=self._timeout(ctx))
            raise_for_status(response, self.id)
            answer = response.json()
        if isinstance(answer, dict) and "error" in answer:
            raise BackendFailedError(f"backend {self.id} failed: {answer['error']}")
        return answer

    def _generation_body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        params = request.params
        options: dict[str, Any] = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "num_predict": params.max_tokens,
        }
        if params.seed is not None:
            options["seed"] = params.seed
        if params.stop:
            options["stop"] = list(params.stop)
        body: dict[str, Any] = {"model": request.model, "stream": True, "options": options}
        if isinstance(request, ChatRequest):
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            return "/api/chat", self._with_keep_alive(body)
        body["prompt"] = request.prompt
        if self.settings.raw_completions:
            body["raw"] = True
        return "/api/generate", self._with_keep_alive(body)

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        path, body = self._generation_body(request)
        chat = isinstance(request, ChatRequest)
        with translate_errors(self.id):
            async with self._http.stream(
                "POST", path, json=body, headers={"x-request-id": ctx.request_id}, timeout=self._timeout(ctx)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise_for_status(response, self.id)
                try:
                    with translate_errors(self.id):
                        async for line in response.aiter_lines():
                            if not line.strip():
                                continue
                            chunk = self._chunk(json.loads(line), chat)
                            if chunk.text or chunk.finish_reason is not None:
                                yield chunk
                            if chunk.finish_reason is not None:
                                return
                except BackendUnavailableError as exc:
                    # The server took the request and then went away: that is a failure
                    # while serving, whatever the transport called it.
                    raise BackendFailedError(f"backend {self.id} broke off the answer: {exc.message}") from exc
                raise BackendFailedError(f"backend {self.id} ended the stream without its final line")

    def _chunk(self, event: dict[str, Any], chat: bool) -> GenerationChunk:
        if "error" in event:
            raise BackendFailedError(f"backend {self.id} failed mid-stream: {event['error']}")
        text = str(((event.get("message") or {}).get("content") if chat else event.get("response")) or "")
        if not event.get("done"):
            return GenerationChunk(text)
        # Ollama omits a count that is zero (Go's omitempty), e.g. a fully cached prompt.
        usage = Usage(int(event.get("prompt_eval_count") or 0), int(event.get("eval_count") or 0))
        reason: FinishReason = "length" if event.get("done_reason") == "length" else "stop"
        return GenerationChunk(text, finish_reason=reason, usage=usage)

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        if not request.inputs:
            return EmbeddingResult((), Usage(0), request.model, self.id)
        body = self._with_keep_alive({"model": request.model, "input": list(request.inputs)})
        answer = await self._post_json("/api/embed", body, ctx)
        with translate_errors(self.id):
            vectors = tuple(tuple(float(x) for x in vector) for vector in answer["embeddings"])
            prompt_tokens = int(answer.get("prompt_eval_count") or 0)
        if len(vectors) != len(request.inputs):
            raise BackendFailedError(f"backend {self.id} returned {len(vectors)} vectors for {len(request.inputs)}")
        self._dimensions[canonical(request.model)] = len(vectors[0])
        return EmbeddingResult(vectors, Usage(prompt_tokens), request.model, self.id)

    # ---- model management ------------------------------------------------------------

    async def load_model(self, model: str) -> None:
        """Ollama loads a model when /api/generate gets one with no prompt."""
        await self._post_json("/api/generate", self._with_keep_alive({"model": model, "stream": False}), None)
        self._running.setdefault(canonical(model), None)

    async def unload_model(self, model: str) -> None:
        await self._post_json("/api/generate", {"model": model, "keep_alive": 0, "stream": False}, None)
        self._running.pop(canonical(model), None)


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
