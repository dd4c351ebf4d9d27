"""What each MCP tool does: translate typed arguments into manager calls and back.

Like the HTTP handlers, the tools know nothing about which backend serves a request:
they resolve models, call `BackendManager` and report what it did. Every failure an
agent can do something about leaves as a `ToolError` whose text starts with our stable
error code (`model_not_found: ...`, `overloaded: ...`) and says what to change or when to
retry; the SDK returns it as a tool result with `is_error` set.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, cast

import trio
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from backends.errors import (
    BackendUnavailableError,
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
)
from backends.manager import BackendManager
from backends.types import (
    BackendType,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationParams,
    GenerationRequest,
    Message,
    RequestContext,
    RerankRequest,
    Task,
)
from p2p_node.mcp_server.models import (
    BackendChoice,
    BackendList,
    BackendSummary,
    ChatMessage,
    InferenceOutcome,
    ModelAction,
    ModelEntry,
    ModelList,
    PeerInfo,
    PeerList,
    RankedDocument,
    TaskInfo,
    TaskList,
    TokenUsage,
)

_T = TypeVar("_T")

MAX_TOKENS_LIMIT = 1_000_000  # as over HTTP: the model's context window is the real bound

TaskName = Annotated[
    str,
    Field(
        description="chat, completion, embedding or rerank; older names are accepted too "
        "(text-generation, chat-completion, embeddings, feature-extraction, reranking, text-ranking)"
    ),
]
ModelName = Annotated[
    str | None,
    Field(description="a model id or alias from list_models; omit for the node's default model for the task"),
]
BackendId = Annotated[str | None, Field(description="an id from list_inference_backends")]

# Arguments of route_inference_request that only some tasks use, so a misplaced one is
# refused instead of silently ignored.
_TASK_ARGUMENTS: dict[str, frozenset[Task]] = {
    "messages": frozenset({Task.CHAT}),
    "prompt": frozenset({Task.CHAT, Task.COMPLETION}),
    "inputs": frozenset({Task.EMBEDDING}),
    "query": frozenset({Task.RERANK}),
    "documents": frozenset({Task.RERANK}),
    "top_n": frozenset({Task.RERANK}),
    "max_tokens": frozenset({Task.CHAT, Task.COMPLETION}),
    "temperature": frozenset({Task.CHAT, Task.COMPLETION}),
    "top_p": frozenset({Task.CHAT, Task.COMPLETION}),
    "seed": frozenset({Task.CHAT, Task.COMPLETION}),
    "stop": frozenset({Task.CHAT, Task.COMPLETION}),
}


def tool_error(exc: InferenceError, renamed: Mapping[str, str] | None = None) -> ToolError:
    """Our error as a message an agent can act on: code first, then what to do.
    `renamed` maps the manager's parameter names to the tool's argument names."""
    message = f"{exc.code}: {exc.message}"
    if exc.param:
        message += f" (argument: {(renamed or {}).get(exc.param, exc.param)})"
    if isinstance(exc, ModelNotFoundError):
        message += "; list_models shows the models this node serves"
    elif isinstance(exc, OverloadedError):
        message += f"; retry in {max(1, round(exc.retry_after_s))} s"
    elif exc.retryable:
        message += "; this is temporary: retry shortly"
    return ToolError(message)


@contextmanager
def as_tool_errors(renamed: Mapping[str, str] | None = None) -> Iterator[None]:
    try:
        yield
    except InferenceError as exc:
        raise tool_error(exc, renamed) from exc


def parse_task(name: str) -> Task:
    try:
        return Task.parse(name)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="task") from None


@dataclass
class NodeTools:
    """The node as the tools see it: the manager plus the node's status reports."""

    manager: BackendManager
    node_status: Callable[[], dict[str, Any]]
    inference_health: Callable[[], dict[str, Any]]
    default_max_tokens: int = 256

    # ---- backends -------------------------------------------------------------------

    async def list_inference_backends(self) -> BackendList:
        """List the inference backends this node routes between (its embedded models, local
        inference servers, remote APIs...), with their status, tasks, models and load."""
        report = self.manager.status_report()
        summaries = []
        for entry in _backend_entries(report):
            backend = self.manager.get(entry["id"])
            models = entry["capabilities"]["models"]
            circuit_open = bool(entry["circuit"]["open"])
            summaries.append(
                BackendSummary(
                    id=backend.id,
                    name=backend.name,
                    type=backend.backend_type.value,
                    status=backend.status.value,
                    status_detail=backend.status_detail,
                    routable=backend.status.routable and not circuit_open,
                    priority=backend.priority,
                    endpoint=backend.endpoint,
                    tasks=entry["capabilities"]["tasks"],
                    models=sorted({m["id"] for m in models}),
                    loaded_models=sorted({m["id"] for m in models if m["loaded"]}),
                    in_flight=backend.metrics.in_flight,
                    queue_size=backend.queue_size(),
                    circuit_open=circuit_open,
                )
            )
        return BackendList(
            strategy=str(report["strategy"]),
            accepting=bool(report["accepting"]),
            pending_requests=self.manager.pending,
            backends=summaries,
        )

    async def get_backend_status(self, backend_id: BackendId = None) -> dict[str, Any]:
        """The node's full status report (node, routing, every backend's metrics, circuit
        breaker and details), or only one backend's part of it when backend_id is given."""
        if backend_id is None:
            return self.node_status()
        entry = self.backend_report(backend_id)
        if entry is None:
            raise tool_error(self.unknown_backend(backend_id))
        return entry

    def unknown_backend(self, backend_id: str) -> InvalidRequestError:
        known = ", ".join(b.id for b in self.manager.backends()) or "none"
        return InvalidRequestError(f"no backend with id {backend_id!r}; known backends: {known}", param="backend_id")

    def _check_backend(self, backend_id: str | None) -> None:
        if backend_id is not None and backend_id not in {b.id for b in self.manager.backends()}:
            raise self.unknown_backend(backend_id)

    def backend_report(self, backend_id: str) -> dict[str, Any] | None:
        for entry in _backend_entries(self.manager.status_report()):
            if entry["id"] == backend_id:
                return entry
        return None

    async def select_backend_for_inference(
        self,
        task: TaskName,
        model: ModelName = None,
        preferred_types: Annotated[
            list[BackendType] | None,
            Field(description="backend types to prefer; others are chosen only when none of these can serve"),
        ] = None,
    ) -> BackendChoice:
        """Which backend the node would pick now for a request, with the configured strategy
        and fallback tiers. A prediction, not a reservation: loads change, and ties are broken
        at random, so route_inference_request may be served elsewhere."""
        with as_tool_errors():
            parsed = parse_task(task)
            resolved = self.manager.resolve_model(parsed, model)
            matched: bool | None = None
            backend = None
            if preferred_types:
                wanted = set(preferred_types)
                others = frozenset(b.id for b in self.manager.backends() if b.backend_type not in wanted)
                try:
                    backend = self.manager.select(parsed, resolved, exclude=others)
                    matched = True
                except BackendUnavailableError:
                    matched = False
            if backend is None:
                backend = self.manager.select(parsed, resolved)
        candidates = [b.id for b in self.manager.backends() if b.capabilities.serves(parsed, resolved)]
        return BackendChoice(
            task=parsed.value,
            model=resolved,
            backend_id=backend.id,
            backend_type=backend.backend_type.value,
            status=backend.status.value,
            strategy=self.manager.settings.strategy.value,
            candidates=candidates,
            preferred_types_matched=matched,
        )

    async def get_supported_tasks(self) -> TaskList:
        """The tasks this node can run, each with its default model, the models that serve
        it and the backends offering them."""
        tasks = []
        for task in Task:
            models: set[str] = set()
            backends: list[str] = []
            for backend in self.manager.backends():
                served = {card.id for card in backend.capabilities.models if card.task == task}
                if served:
                    models |= served
                    backends.append(backend.id)
            if models:
                tasks.append(
                    TaskInfo(
                        task=task.value,
                        default_model=self.manager.catalog.default_for(task),
                        models=sorted(models),
                        backends=backends,
                    )
                )
        return TaskList(tasks=tasks)

    async def list_peers(self) -> PeerList:
        """The other nodes this node knows on the libp2p mesh: whether connected, round-trip
        time, the models they advertise and their load. A peer that advertises models is also
        a backend here (backend_id), so requests for its models can be served through it."""
        mesh = self.node_status().get("mesh") or {}
        if "peer_id" not in mesh:
            return PeerList(mesh_enabled=False, peer_id=None, addrs=[], peers=[])
        as_backend = {getattr(b, "peer_id", None): b.id for b in self.manager.backends() if b.is_peer}
        peers = [
            PeerInfo(
                peer_id=peer["peer_id"],
                backend_id=as_backend.get(peer["peer_id"]),
                connected=peer.get("connected", False),
                rtt_ms=peer.get("rtt_ms"),
                addrs=list(peer.get("addrs", [])),
                models=list(peer.get("models", [])),
                load=dict(peer.get("load", {})),
                version=peer.get("version"),
                advert_age_s=peer.get("advert_age_s", 0.0),
            )
            for peer in mesh.get("peers", [])
        ]
        return PeerList(mesh_enabled=True, peer_id=mesh["peer_id"], addrs=list(mesh.get("addrs", [])), peers=peers)

    # ---- models ---------------------------------------------------------------------

    async def list_models(
        self, task: Annotated[str | None, Field(description="only models for this task")] = None
    ) -> ModelList:
        """The models this node serves (and the aliases that reach them), with their tasks,
        whether they are loaded, and which backends offer them."""
        with as_tool_errors():
            wanted = parse_task(task) if task else None
        entries: dict[str, ModelEntry] = {}
        for backend in self.manager.backends():
            for card in backend.capabilities.models:
                if wanted is not None and card.task != wanted:
                    continue
                entry = entries.setdefault(card.id, ModelEntry(id=card.id, tasks=[], loaded=False, backends=[]))
                if card.task.value not in entry.tasks:
                    entry.tasks.append(card.task.value)
                if backend.id not in entry.backends:
                    entry.backends.append(backend.id)
                entry.loaded = entry.loaded or card.loaded
                entry.context_window = entry.context_window or card.context_window
                entry.dimensions = entry.dimensions or card.dimensions
        for alias, target in self.manager.catalog.aliases.items():
            if target in entries and alias not in entries:
                real = entries[target]
                entries[alias] = real.model_copy(update={"id": alias, "alias_of": target})
        defaults = {t.value: m for t, m in self.manager.catalog.defaults.items()}
        return ModelList(models=list(entries.values()), default_models=defaults)

    async def load_model(
        self,
        model_id: Annotated[str, Field(min_length=1, description="a model id or alias from list_models")],
        backend_id: BackendId = None,
    ) -> ModelAction:
        """Load a model now on every backend that offers it (or only on backend_id), so the
        first request does not wait for it. Loading an already loaded model does nothing."""
        with as_tool_errors({"model": "model_id"}):
            self._check_backend(backend_id)
            backends = await self.manager.load_model(model_id, backend_id)
        return ModelAction(status="loaded", model_id=self._concrete(model_id), backends=backends)

    async def unload_model(
        self,
        model_id: Annotated[str, Field(min_length=1, description="a model id or alias from list_models")],
        backend_id: BackendId = None,
    ) -> ModelAction:
        """Unload a model to free its memory; the next request that needs it loads it again."""
        with as_tool_errors({"model": "model_id"}):
            self._check_backend(backend_id)
            backends = await self.manager.unload_model(model_id, backend_id)
        return ModelAction(status="unloaded", model_id=self._concrete(model_id), backends=backends)

    def _concrete(self, model: str) -> str:
        return self.manager.catalog.resolve(Task.CHAT, model)

    # ---- inference ------------------------------------------------------------------

    async def route_inference_request(
        self,
        task: TaskName,
        model: ModelName = None,
        messages: Annotated[
            list[ChatMessage] | None, Field(min_length=1, description="chat: the conversation so far")
        ] = None,
        prompt: Annotated[
            str | None, Field(description="completion: the text to continue; chat: shorthand for one user message")
        ] = None,
        inputs: Annotated[
            list[str] | None, Field(min_length=1, max_length=2048, description="embedding: the texts to embed")
        ] = None,
        query: Annotated[
            str | None, Field(min_length=1, description="rerank: what the documents should answer")
        ] = None,
        documents: Annotated[
            list[str] | None, Field(min_length=1, max_length=10_000, description="rerank: the texts to order")
        ] = None,
        top_n: Annotated[int | None, Field(ge=1, description="rerank: keep only the best n")] = None,
        max_tokens: Annotated[
            int | None, Field(ge=1, le=MAX_TOKENS_LIMIT, description="chat/completion: answer length limit")
        ] = None,
        temperature: Annotated[float | None, Field(ge=0.0, le=2.0, description="0 answers deterministically")] = None,
        top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None,
        seed: int | None = None,
        stop: Annotated[list[str] | None, Field(max_length=4, description="sequences that end the answer")] = None,
        timeout_s: Annotated[
            float | None, Field(gt=0, le=3600, description="give up after this long (default: the node's)")
        ] = None,
    ) -> InferenceOutcome:
        """Run one inference through the node's router: chat (messages), completion (prompt),
        embedding (inputs) or rerank (query and documents). The node picks the backend, retries
        on another one if a backend fails before answering, and reports which one served."""
        given = {
            "messages": messages,
            "prompt": prompt,
            "inputs": inputs,
            "query": query,
            "documents": documents,
            "top_n": top_n,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop": stop,
        }
        with as_tool_errors():
            parsed = parse_task(task)
            _refuse_misplaced(parsed, {name for name, value in given.items() if value is not None})
            resolved = self.manager.resolve_model(parsed, model)
            ctx = RequestContext(request_id=f"mcp-{uuid.uuid4().hex}")
            if timeout_s is not None:
                ctx.deadline = trio.current_time() + timeout_s
            started = time.perf_counter()
            if parsed in (Task.CHAT, Task.COMPLETION):
                params = GenerationParams(
                    max_tokens=max_tokens or self.default_max_tokens,
                    temperature=1.0 if temperature is None else temperature,
                    top_p=1.0 if top_p is None else top_p,
                    seed=seed,
                    stop=tuple(stop or ()),
                )
                request = _generation_request(parsed, resolved, params, messages, prompt)
                result = await self.manager.generate(request, ctx)
                return InferenceOutcome(
                    task=parsed.value,
                    model=resolved,
                    backend_id=result.backend_id,
                    request_id=ctx.request_id,
                    latency_ms=_since(started),
                    usage=_usage(result.usage.prompt_tokens, result.usage.completion_tokens),
                    text=result.text,
                    finish_reason=result.finish_reason,
                )
            if parsed is Task.EMBEDDING:
                texts = _required(inputs, "inputs", parsed)
                if any(not text for text in texts):
                    raise InvalidRequestError("inputs must be non-empty strings", param="inputs")
                embedded = await self.manager.embed(EmbeddingRequest(tuple(texts), resolved), ctx)
                return InferenceOutcome(
                    task=parsed.value,
                    model=resolved,
                    backend_id=ctx.served_by or "",
                    request_id=ctx.request_id,
                    latency_ms=_since(started),
                    usage=_usage(embedded.usage.prompt_tokens, 0),
                    embeddings=[list(vector) for vector in embedded.vectors],
                    dimensions=len(embedded.vectors[0]) if embedded.vectors else None,
                )
            docs = tuple(_required(documents, "documents", parsed))
            question = _required(query, "query", parsed)
            ranked = await self.manager.rerank(RerankRequest(question, docs, resolved, top_n), ctx)
            return InferenceOutcome(
                task=parsed.value,
                model=resolved,
                backend_id=ctx.served_by or "",
                request_id=ctx.request_id,
                latency_ms=_since(started),
                usage=_usage(ranked.usage.prompt_tokens, 0),
                results=[
                    RankedDocument(index=hit.index, relevance_score=hit.relevance_score, document=docs[hit.index])
                    for hit in ranked.hits
                ],
            )


def _backend_entries(report: dict[str, object]) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], report["backends"])


def _refuse_misplaced(task: Task, given: set[str]) -> None:
    misplaced = sorted(name for name in given if task not in _TASK_ARGUMENTS[name])
    if misplaced:
        uses = {
            Task.CHAT: "messages (or prompt) and the sampling arguments",
            Task.COMPLETION: "prompt and the sampling arguments",
            Task.EMBEDDING: "inputs",
            Task.RERANK: "query, documents and top_n",
        }[task]
        raise InvalidRequestError(
            f"{', '.join(misplaced)} do{'es' if len(misplaced) == 1 else ''} not apply to task "
            f"{task.value!r}, which takes {uses}",
            param=misplaced[0],
        )


def _required(value: _T | None, name: str, task: Task) -> _T:
    if value is None:
        raise InvalidRequestError(f"task {task.value!r} needs {name}", param=name)
    return value


def _generation_request(
    task: Task, model: str, params: GenerationParams, messages: list[ChatMessage] | None, prompt: str | None
) -> GenerationRequest:
    if task is Task.COMPLETION:
        return CompletionRequest(_required(prompt, "prompt", task), model, params)
    if messages and prompt is not None:
        raise InvalidRequestError("give either messages or prompt for a chat, not both", param="prompt")
    if messages:
        return ChatRequest(tuple(Message(m.role, m.content) for m in messages), model, params)
    return ChatRequest((Message("user", _required(prompt, "messages", task)),), model, params)


def _usage(prompt: int, completion: int) -> TokenUsage:
    return TokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
