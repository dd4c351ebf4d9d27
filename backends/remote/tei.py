"""Hugging Face text-embeddings-inference (TEI): one embedding or reranker model per server.

`GET /info` says which model the server runs and what kind it is (`model_type` has an
`embedding`, `reranker` or `classifier` key) and how many inputs one request may carry
(`max_client_batch_size`; more is refused with 422). Larger requests are split into
batches of that size, sent concurrently, and put back together in order.

TEI ignores model names in requests, so this adapter checks them itself: a request for a
model the server does not run must fail here, not be answered by the wrong model.

Token counts: TEI sends them in the `x-compute-tokens` response header (with
`x-compute-characters`, `x-inference-time`...), summed over a request's inputs. When a
proxy in between strips the header, usage is reported as 0 rather than guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import httpx
import trio

from backends.base import Backend
from backends.errors import (
    BackendFailedError,
    BackendUnavailableError,
    InferenceError,
    ModelNotFoundError,
    UnsupportedTaskError,
)
from backends.remote._http import make_client, raise_for_status, translate_errors
from backends.types import (
    BackendStatus,
    BackendType,
    Capabilities,
    EmbeddingRequest,
    EmbeddingResult,
    ModelCard,
    RequestContext,
    RerankHit,
    RerankRequest,
    RerankResult,
    Task,
    Usage,
)

log = logging.getLogger(__name__)

_DEADLINE_GRACE_S = 1.0

T = TypeVar("T")

DEFAULT_TEI_URL = "http://127.0.0.1:8080"

# /info's model_type key -> the task we serve with it. Classifiers (sequence
# classification with several labels) have no task here.
_KINDS = {"embedding": Task.EMBEDDING, "reranker": Task.RERANK}


@dataclass(frozen=True)
class TEISettings:
    backend_id: str = "tei"
    base_url: str = DEFAULT_TEI_URL
    api_key: str | None = None  # TEI's --api-key, sent as a bearer token
    # The id the model is served under; None: the server's model_id from /info.
    model_name: str | None = None
    normalize: bool = True  # unit-length embedding vectors, as OpenAI's are
    truncate: bool = True  # cut inputs at max_input_length instead of refusing them
    # Batches of one request in flight at once: TEI refuses (429) beyond its
    # max_concurrent_requests, so one large request must not take them all.
    max_parallel_batches: int = 4
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    name: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TEIInfo:
    model_id: str
    kind: str  # "embedding", "reranker", "classifier"
    max_input_length: int | None
    max_client_batch_size: int
    raw: dict[str, Any]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> TEIInfo:
        model_type = body["model_type"]
        kind = next(iter(model_type)) if isinstance(model_type, dict) and model_type else str(model_type)
        return cls(
            model_id=str(body.get("served_model_name") or body["model_id"]),
            kind=kind.lower(),
            max_input_length=int(body["max_input_length"]) if body.get("max_input_length") else None,
            max_client_batch_size=max(1, int(body.get("max_client_batch_size") or 32)),
            raw=body,
        )


class TEIBackend(Backend):
    backend_type = BackendType.API

    def __init__(self, settings: TEISettings) -> None:
        super().__init__(settings.backend_id, settings.name or f"{settings.backend_id} (tei)")
        self.settings = settings
        self._base_url = settings.base_url.rstrip("/")
        self.info: TEIInfo | None = None
        self._dimensions: int | None = None
        self._client: httpx.AsyncClient | None = None
        self._limiter = trio.CapacityLimiter(max(1, settings.max_parallel_batches))

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._client = make_client(self._base_url, s.api_key, s.headers, s.timeout_s, s.connect_timeout_s)
        # A server that is down at start does not stop the node: the health loop keeps
        # probing, and the first probe that reaches it learns the model from /info.
        self.status = await self.check_health()
        if self.status != BackendStatus.HEALTHY:
            log.warning("backend %s not healthy at start: %s", self.id, self.status_detail)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def check_health(self) -> BackendStatus:
        probe = self.settings.connect_timeout_s + 5
        try:
            with translate_errors(self.id):
                # Re-read every time: the server may have been redeployed with another model.
                response = await self._http.get("/info", timeout=probe)
                raise_for_status(response, self.id)
                info = TEIInfo.parse(response.json())
                if info.kind not in _KINDS and (self.info is None or self.info.kind != info.kind):
                    log.warning("backend %s runs a %s model, which serves no task here", self.id, info.kind)
                if self.info is not None and self.info.model_id != info.model_id:
                    self._dimensions = None
                self.info = info
                response = await self._http.get("/health", timeout=probe)
                raise_for_status(response, self.id)
        except InferenceError as exc:
            self.status_detail = exc.message
            return BackendStatus.UNHEALTHY
        self.status_detail = ""
        return BackendStatus.HEALTHY

    # ---- what it offers --------------------------------------------------------------

    @property
    def model_id(self) -> str | None:
        if self.settings.model_name:
            return self.settings.model_name
        return self.info.model_id if self.info else None

    @property
    def capabilities(self) -> Capabilities:
        info, model_id = self.info, self.model_id
        task = _KINDS.get(info.kind) if info else None
        if info is None or task is None or model_id is None:
            return Capabilities(tasks=frozenset(), streaming=False, protocols=frozenset({"tei"}))
        dims = self._dimensions if task is Task.EMBEDDING else None
        card = ModelCard(model_id, task, info.max_input_length, loaded=True, owned_by=self.id, dimensions=dims)
        return Capabilities(
            tasks=frozenset({task}),
            models=(card,),
            streaming=False,
            batching=True,
            protocols=frozenset({"tei"}),
            context_window=info.max_input_length,
        )

    @property
    def endpoint(self) -> str | None:
        return self._base_url

    def describe(self) -> dict[str, object]:
        details: dict[str, object] = {"base_url": self._base_url, "model": self.model_id}
        if self.info is not None:
            raw = self.info.raw
            details.update(
                kind=self.info.kind,
                model_id=raw.get("model_id"),
                model_sha=raw.get("model_sha"),
                model_dtype=raw.get("model_dtype"),
                max_input_length=self.info.max_input_length,
                max_client_batch_size=self.info.max_client_batch_size,
                max_concurrent_requests=raw.get("max_concurrent_requests"),
                version=raw.get("version"),
                dimensions=self._dimensions,
            )
        return details

    # ---- inference ------------------------------------------------------------------

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise BackendUnavailableError(f"backend {self.id} is not running")
        return self._client

    def _timeout(self, ctx: RequestContext) -> httpx.Timeout:
        total = self.settings.timeout_s
        if ctx.deadline is not None:
            # A little past the deadline: the manager's cancel scope should end the request
            # (as DeadlineExceededError); this only bounds a caller without one.
            total = max(0.001, min(total, ctx.deadline - trio.current_time() + _DEADLINE_GRACE_S))
        return httpx.Timeout(total, connect=min(total, self.settings.connect_timeout_s))

    def _require(self, task: Task, model: str) -> TEIInfo:
        info = self.info
        if info is None:
            raise BackendUnavailableError(f"backend {self.id} has not answered /info yet")
        if model != self.model_id:
            raise ModelNotFoundError(
                f"backend {self.id} serves {self.model_id!r}, not {model!r}",
                param="model",
            )
        if _KINDS.get(info.kind) is not task:
            raise UnsupportedTaskError(
                f"backend {self.id}'s model {model!r} is a {info.kind} model; it does not serve {task.value}",
                param="model",
            )
        return info

    async def _post(self, path: str, body: dict[str, Any], ctx: RequestContext) -> tuple[Any, int]:
        """One request; returns the decoded reply and the token count TEI reported (0 if none)."""
        async with self._limiter:
            with translate_errors(self.id):
                response = await self._http.post(
                    path, json=body, headers={"x-request-id": ctx.request_id}, timeout=self._timeout(ctx)
                )
                raise_for_status(response, self.id)
                tokens = int(response.headers.get("x-compute-tokens", "0") or 0)
                return response.json(), tokens

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        info = self._require(Task.EMBEDDING, request.model)
        if not request.inputs:
            return EmbeddingResult((), Usage(0), request.model, self.id)

        async def embed_batch(texts: Sequence[str]) -> tuple[list[tuple[float, ...]], int]:
            body = {"inputs": list(texts), "normalize": self.settings.normalize, "truncate": self.settings.truncate}
            answer, tokens = await self._post("/embed", body, ctx)
            with translate_errors(self.id):
                vectors = [tuple(float(x) for x in vector) for vector in answer]
            if len(vectors) != len(texts):
                raise BackendFailedError(f"backend {self.id} returned {len(vectors)} vectors for {len(texts)}")
            return vectors, tokens

        results = await _gather([partial(embed_batch, batch) for batch in _batches(request.inputs, info)])
        vectors = tuple(v for batch, _ in results for v in batch)
        self._dimensions = len(vectors[0])
        return EmbeddingResult(vectors, Usage(sum(t for _, t in results)), request.model, self.id)

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        info = self._require(Task.RERANK, request.model)
        if not request.documents:
            return RerankResult((), Usage(0), request.model, self.id)

        async def rerank_batch(offset: int, texts: Sequence[str]) -> tuple[list[RerankHit], int]:
            body = {
                "query": request.query,
                "texts": list(texts),
                "raw_scores": False,
                "return_text": False,
                "truncate": self.settings.truncate,
            }
            answer, tokens = await self._post("/rerank", body, ctx)
            with translate_errors(self.id):
                hits = [RerankHit(offset + int(r["index"]), float(r["score"])) for r in answer]
            if sorted(h.index - offset for h in hits) != list(range(len(texts))):
                raise BackendFailedError(f"backend {self.id} ranked other texts than the {len(texts)} it was sent")
            return hits, tokens

        size = info.max_client_batch_size
        batches = _batches(request.documents, info)
        results = await _gather([partial(rerank_batch, i * size, batch) for i, batch in enumerate(batches)])
        # Scores of separate batches compare: TEI scores each (query, text) pair on its own.
        hits = sorted((h for batch, _ in results for h in batch), key=lambda h: (-h.relevance_score, h.index))
        if request.top_n is not None:
            hits = hits[: request.top_n]
        return RerankResult(tuple(hits), Usage(sum(t for _, t in results)), request.model, self.id)


def _batches(items: Sequence[str], info: TEIInfo) -> list[Sequence[str]]:
    size = info.max_client_batch_size
    return [items[i : i + size] for i in range(0, len(items), size)]


async def _gather(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Runs the calls concurrently; results in call order. The first failure cancels the
    rest and is raised as itself, not wrapped in an exception group."""
    if len(calls) == 1:
        return [await calls[0]()]
    results: list[T | None] = [None] * len(calls)
    failure: BaseException | None = None

    async def run(index: int, call: Callable[[], Awaitable[T]], cancel: trio.CancelScope) -> None:
        nonlocal failure
        try:
            results[index] = await call()
        except InferenceError as exc:
            if failure is None:
                failure = exc
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        for index, call in enumerate(calls):
            nursery.start_soon(run, index, call, nursery.cancel_scope)
    if failure is not None:
        raise failure
    return [r for r in results if r is not None]
