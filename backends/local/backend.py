"""The local backend: models running in this process on the detected device.

Text generation goes through a continuous-batching engine per loaded causal LM (its
own worker thread); embeddings and rerank scoring go through thread batchers. Models
load lazily on first use (or at start when preloaded), never on the event loop, and
live in an LRU cache of bounded size.
"""

from __future__ import annotations

import gc
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from backends.base import Backend
from backends.errors import (
    BackendFailedError,
    ContextWindowExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ShuttingDownError,
)
from backends.local._batcher import ThreadBatcher
from backends.local._encoders import CrossEncoderScorer, Embedded, SentenceEncoder, minilm_path
from backends.local._engine import Finished, GenerationEngine, GenerationEvent, SamplingParams
from backends.local._models import build_tiny_llama, detect_device, load_causal_lm, prepare_smollm2
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
)

log = logging.getLogger(__name__)

SMOLLM2_ID = "SmolLM2-135M-Instruct"
TINY_ID = "tiny-random-llama"
MINILM_ID = "all-MiniLM-L6-v2"


@dataclass
class LocalBackendSettings:
    cache_dir: Path
    device: str = "auto"
    max_batch_size: int = 8
    batch_wait_s: float = 0.01
    embed_max_batch: int = 64
    max_loaded_models: int = 3
    # model id -> source: "builtin:smollm2", "builtin:tiny-random", or a local HF directory
    chat_models: dict[str, str] = field(default_factory=lambda: {SMOLLM2_ID: "builtin:smollm2"})
    # model id -> source: "builtin:minilm" or a local sentence-transformers directory
    embedding_models: dict[str, str] = field(default_factory=lambda: {MINILM_ID: "builtin:minilm"})
    # model id -> "embedding:<embedding model id>" (cosine) or a local cross-encoder directory
    rerank_models: dict[str, str] = field(default_factory=lambda: {MINILM_ID: f"embedding:{MINILM_ID}"})
    preload: list[str] = field(default_factory=list)
    # Models loaded on demand (not preloaded) are unloaded after this long unused; None: never.
    idle_unload_s: float | None = 300.0


@dataclass
class _Generator:
    engine: GenerationEngine
    tokenizer: Any
    context_window: int


@dataclass
class _Encoder:
    encoder: SentenceEncoder
    batcher: ThreadBatcher[str, Embedded]
    scope: trio.CancelScope


@dataclass
class _CrossEncoder:
    scorer: CrossEncoderScorer
    batcher: ThreadBatcher[tuple[str, str], float]
    scope: trio.CancelScope


_Loaded = _Generator | _Encoder | _CrossEncoder


class LocalBackend(Backend):
    backend_type = BackendType.LOCAL

    def __init__(
        self,
        settings: LocalBackendSettings,
        backend_id: str = "local",
        on_model_loaded: Callable[[str], object] | None = None,
    ) -> None:
        """`on_model_loaded(model)` runs in the event loop once a model is ready (the node
        freezes the new long-lived objects out of the garbage collector's passes there)."""
        super().__init__(backend_id, name="local models")
        self.settings = settings
        self._on_model_loaded = on_model_loaded
        self.device = detect_device() if settings.device == "auto" else settings.device
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._locks: dict[str, trio.Lock] = {}
        # One model loads at a time: transformers' loading is not thread-safe. In a CI run
        # (2026-11-23) SmolLM2 and MiniLM preloading side by side left SmolLM2's tied
        # lm_head on the meta device ("Cannot copy out of meta tensor").
        self._loading = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closing = False
        self._last_used: dict[str, float] = {}
        self._in_use: dict[str, int] = {}

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.status = BackendStatus.HEALTHY
                task_status.started()
                for model in self.settings.preload:
                    nursery.start_soon(self._preload, model)
                if self.settings.idle_unload_s is not None:
                    nursery.start_soon(self._unload_idle_models, self.settings.idle_unload_s)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._closing = True
            with trio.CancelScope(shield=True):
                await self._unload_all()
            self.status = BackendStatus.OFFLINE

    async def _unload_idle_models(self, idle_s: float) -> None:
        """Lazily loaded models give their memory back when unused; preloaded ones stay."""
        while True:
            await trio.sleep(min(idle_s / 4, 30.0))
            now = trio.current_time()
            for model in list(self._loaded):
                if model in self.settings.preload or self._in_use.get(model, 0):
                    continue
                if now - self._last_used.get(model, now) >= idle_s:
                    log.info("unloading %s after %.0fs unused", model, now - self._last_used[model])
                    await self.unload_model(model)

    async def _preload(self, model: str) -> None:
        try:
            await self.load_model(model)
        except Exception as exc:
            self.status = BackendStatus.DEGRADED
            self.status_detail = f"preloading {model} failed: {exc}"
            log.error("preloading %s failed: %s", model, exc)

    async def check_health(self) -> BackendStatus:
        if self._closing:
            return BackendStatus.OFFLINE
        return self.status if self.status != BackendStatus.INITIALIZING else BackendStatus.HEALTHY

    # ---- what it offers --------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        cards: list[ModelCard] = []
        for model_id in self.settings.chat_models:
            loaded = self._loaded.get(model_id)
            window = loaded.context_window if isinstance(loaded, _Generator) else None
            for task in (Task.CHAT, Task.COMPLETION):
                cards.append(ModelCard(model_id, task, context_window=window, loaded=loaded is not None))
        for model_id in self.settings.embedding_models:
            loaded = self._loaded.get(model_id)
            dims = loaded.encoder.dimensions if isinstance(loaded, _Encoder) else None
            cards.append(ModelCard(model_id, Task.EMBEDDING, loaded=loaded is not None, dimensions=dims))
        for model_id, source in self.settings.rerank_models.items():
            target = source.removeprefix("embedding:") if source.startswith("embedding:") else model_id
            cards.append(ModelCard(model_id, Task.RERANK, loaded=target in self._loaded))
        windows = [c.context_window for c in cards if c.context_window]
        return Capabilities(
            tasks=frozenset(c.task for c in cards),
            models=tuple(cards),
            streaming=True,
            batching=True,
            hardware=frozenset({self.device}),
            protocols=frozenset({"in-process"}),
            context_window=max(windows) if windows else None,
            continuation=True,
        )

    def queue_size(self) -> int:
        total = 0
        for loaded in self._loaded.values():
            if isinstance(loaded, _Generator):
                total += loaded.engine.stats.queued
            else:
                total += loaded.batcher.stats.queued_jobs
        return total

    def describe(self) -> dict[str, object]:
        models: dict[str, object] = {}
        for model_id, loaded in self._loaded.items():
            if isinstance(loaded, _Generator):
                stats = loaded.engine.stats
                models[model_id] = {
                    "kind": "causal-lm",
                    "context_window": loaded.context_window,
                    "engine": {
                        "queued": stats.queued,
                        "active": stats.active,
                        "forward_passes": stats.forward_passes,
                        "rows_processed": stats.rows_processed,
                        "max_batch_seen": stats.max_batch_seen,
                        "last_batch_size": stats.last_batch_size,
                        "tokens_generated": stats.tokens_generated,
                    },
                }
            else:
                b = loaded.batcher.stats
                models[model_id] = {
                    "kind": "sentence-encoder" if isinstance(loaded, _Encoder) else "cross-encoder",
                    "batcher": {
                        "batches": b.batches,
                        "items": b.items,
                        "max_batch_items": b.max_batch_items,
                        "last_batch_items": b.last_batch_items,
                        "queued": b.queued_jobs,
                    },
                }
        return {
            "device": self.device,
            "max_batch_size": self.settings.max_batch_size,
            "batch_wait_ms": round(self.settings.batch_wait_s * 1000, 3),
            "max_loaded_models": self.settings.max_loaded_models,
            "loaded_models": models,  # least recently used first
        }

    # ---- model management ------------------------------------------------------------

    async def load_model(self, model: str) -> None:
        await self._ensure_loaded(model)

    async def unload_model(self, model: str) -> None:
        if model not in self._known_models():
            raise ModelNotFoundError(f"the local backend has no model {model!r}", param="model")
        async with self._lock(model):
            loaded = self._loaded.pop(model, None)
            if loaded is not None:
                await self._release(model, loaded)

    def _known_models(self) -> set[str]:
        s = self.settings
        cross = {m for m, src in s.rerank_models.items() if not src.startswith("embedding:")}
        return set(s.chat_models) | set(s.embedding_models) | cross

    def _lock(self, model: str) -> trio.Lock:
        lock = self._locks.get(model)
        if lock is None:
            lock = self._locks[model] = trio.Lock()
        return lock

    async def _ensure_loaded(self, model: str) -> _Loaded:
        if self._closing:
            raise ShuttingDownError("the local backend is shutting down")
        self._last_used[model] = trio.current_time()
        loaded = self._loaded.get(model)
        if loaded is not None:
            self._loaded.move_to_end(model)
            return loaded
        if model not in self._known_models():
            raise ModelNotFoundError(f"the local backend has no model {model!r}", param="model")
        async with self._lock(model):
            loaded = self._loaded.get(model)
            if loaded is None:
                await self._make_room()
                loaded = await self._load(model)
                self._loaded[model] = loaded
                if self._on_model_loaded is not None:
                    self._on_model_loaded(model)
            self._loaded.move_to_end(model)
            return loaded

    async def _make_room(self) -> None:
        while len(self._loaded) >= self.settings.max_loaded_models:
            victim, loaded = self._loaded.popitem(last=False)
            log.info("evicting %s (least recently used) to make room", victim)
            await self._release(victim, loaded)

    async def _load(self, model: str) -> _Loaded:
        async with self._loading:
            log.info("loading %s on %s", model, self.device)
            return await self._load_one(model)

    async def _load_one(self, model: str) -> _Loaded:
        s = self.settings
        try:
            if model in s.chat_models:
                return await trio.to_thread.run_sync(self._load_generator, model, s.chat_models[model])
            if model in s.embedding_models:
                encoder = await trio.to_thread.run_sync(self._load_encoder, s.embedding_models[model])
                batcher = ThreadBatcher(
                    encoder.encode, max_items=s.embed_max_batch, wait_s=s.batch_wait_s, name=f"embeddings[{model}]"
                )
                return _Encoder(encoder, batcher, await self._spawn(batcher))
            scorer = await trio.to_thread.run_sync(CrossEncoderScorer, Path(s.rerank_models[model]), self.device)
            pair_batcher = ThreadBatcher(
                scorer.score, max_items=s.embed_max_batch, wait_s=s.batch_wait_s, name=f"rerank[{model}]"
            )
            return _CrossEncoder(scorer, pair_batcher, await self._spawn(pair_batcher))
        except (OSError, ValueError, RuntimeError) as exc:
            raise BackendFailedError(f"loading model {model!r} failed: {exc}") from exc

    async def _spawn(self, batcher: ThreadBatcher[Any, Any]) -> trio.CancelScope:
        if self._nursery is None:
            raise ShuttingDownError("the local backend is not running")
        scope = trio.CancelScope()

        async def run_batcher(*, task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await batcher.run(task_status=task_status)

        await self._nursery.start(run_batcher)
        return scope

    def _load_generator(self, model: str, source: str) -> _Generator:
        if source == "builtin:smollm2":
            lm, tokenizer = load_causal_lm(prepare_smollm2(self.settings.cache_dir), self.device)
        elif source == "builtin:tiny-random":
            lm, tokenizer = build_tiny_llama(prepare_smollm2(self.settings.cache_dir))
        else:
            lm, tokenizer = load_causal_lm(Path(source), self.device)
        window = int(getattr(lm.config, "max_position_embeddings", 2048))
        engine = GenerationEngine(
            lm,
            tokenizer,
            max_batch_size=self.settings.max_batch_size,
            batch_wait_s=self.settings.batch_wait_s,
            max_context=window,
            name=model,
        )
        engine.start()
        return _Generator(engine, tokenizer, window)

    def _load_encoder(self, source: str) -> SentenceEncoder:
        path = minilm_path() if source == "builtin:minilm" else Path(source)
        return SentenceEncoder(path, self.device)

    async def _release(self, model: str, loaded: _Loaded) -> None:
        if isinstance(loaded, _Generator):
            await trio.to_thread.run_sync(loaded.engine.stop)
        else:
            loaded.scope.cancel()
        del loaded
        await trio.to_thread.run_sync(_free_memory)
        log.info("unloaded %s", model)

    async def _unload_all(self) -> None:
        while self._loaded:
            model, loaded = self._loaded.popitem(last=False)
            await self._release(model, loaded)

    # ---- inference ------------------------------------------------------------------

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        model = request.model
        self._in_use[model] = self._in_use.get(model, 0) + 1
        try:
            async with aclosing(self._stream(request, ctx)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._in_use[model] -= 1
            self._last_used[model] = trio.current_time()

    async def _stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        loaded = await self._ensure_loaded(request.model)
        assert isinstance(loaded, _Generator)
        prompt_ids = self._prompt_ids(loaded, request)
        params = request.params
        if len(prompt_ids) + params.max_tokens > loaded.context_window:
            raise ContextWindowExceededError(
                f"this model's context window is {loaded.context_window} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens asks for {params.max_tokens} more",
                param="max_tokens",
            )
        send, receive = trio.open_memory_channel[GenerationEvent](math.inf)
        token = self._token
        assert token is not None

        def deliver(event: GenerationEvent) -> None:
            try:
                send.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the consumer went away; the handle is being cancelled

        def emit(event: GenerationEvent) -> None:  # runs on the engine thread
            try:
                token.run_sync_soon(deliver, event)
            except trio.RunFinishedError:
                pass

        handle = loaded.engine.submit(
            prompt_ids,
            SamplingParams(
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                stop=params.stop,
            ),
            emit,
        )
        try:
            async with receive:
                async for event in receive:
                    if isinstance(event, Finished):
                        yield self._final_chunk(event)
                        return
                    yield GenerationChunk(text=event.text, token_ids=event.token_ids)
        finally:
            handle.cancel()

    def _final_chunk(self, event: Finished) -> GenerationChunk:
        if event.finish_reason == "cancelled":
            raise ShuttingDownError("generation was cancelled because the model is being unloaded")
        if event.finish_reason == "error":
            raise BackendFailedError(f"generation failed: {event.error}")
        reason: FinishReason = "length" if event.finish_reason == "length" else "stop"
        return GenerationChunk(text="", finish_reason=reason, usage=Usage(event.prompt_tokens, event.completion_tokens))

    def _prompt_ids(self, loaded: _Generator, request: GenerationRequest) -> list[int]:
        tokenizer = loaded.tokenizer
        if isinstance(request, ChatRequest):
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # jinja errors on odd role orders and the like
                raise InvalidRequestError(
                    f"the chat template rejected these messages: {exc}", param="messages"
                ) from exc
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = request.prompt
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        continuation = request.continuation
        if continuation is not None:
            if continuation.token_ids:
                return [*ids, *continuation.token_ids]
            return list(tokenizer(text + continuation.text, add_special_tokens=False)["input_ids"])
        return list(ids)

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        loaded = await self._ensure_loaded(request.model)
        assert isinstance(loaded, _Encoder)
        embedded = await loaded.batcher.submit(list(request.inputs))
        return EmbeddingResult(
            vectors=tuple(e.vector for e in embedded),
            usage=Usage(prompt_tokens=sum(e.tokens for e in embedded)),
            model=request.model,
            backend_id=self.id,
        )

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        source = self.settings.rerank_models.get(request.model)
        if source is None:
            raise ModelNotFoundError(f"the local backend has no rerank model {request.model!r}", param="model")
        if source.startswith("embedding:"):
            scores, tokens = await self._cosine_scores(source.removeprefix("embedding:"), request)
        else:
            loaded = await self._ensure_loaded(request.model)
            assert isinstance(loaded, _CrossEncoder)
            pairs = [(request.query, doc) for doc in request.documents]
            scores = await loaded.batcher.submit(pairs)
            tokens = loaded.scorer.count_tokens(pairs)
        ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if request.top_n is not None:
            ranked = ranked[: request.top_n]
        return RerankResult(
            hits=tuple(RerankHit(i, scores[i]) for i in ranked),
            usage=Usage(prompt_tokens=tokens),
            model=request.model,
            backend_id=self.id,
        )

    async def _cosine_scores(self, embedding_model: str, request: RerankRequest) -> tuple[list[float], int]:
        loaded = await self._ensure_loaded(embedding_model)
        assert isinstance(loaded, _Encoder)
        embedded = await loaded.batcher.submit([request.query, *request.documents])
        query = embedded[0].vector
        scores = [sum(q * d for q, d in zip(query, doc.vector, strict=True)) for doc in embedded[1:]]
        return scores, sum(e.tokens for e in embedded)


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
