"""The backend manager: one registry, one place that decides where a request runs.

API layers (HTTP, WebSocket, MCP) call this and nothing below it. It resolves the model,
picks a backend with the configured strategy, counts the request as in flight from
dispatch until its stream is closed (so load figures never drift), enforces the
request's deadline, retries elsewhere when a backend fails before producing output,
and reports what happened to the metrics and the observer.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

import outcome
import trio

from backends.base import Backend
from backends.catalog import ModelCatalog
from backends.errors import (
    BackendUnavailableError,
    DeadlineExceededError,
    InferenceError,
    ModelNotFoundError,
    OverloadedError,
    ShuttingDownError,
    UnsupportedTaskError,
)
from backends.failover import AnswerSoFar, may_fail_over
from backends.hedging import HEDGE_AFTER_FACTOR, HedgeBudget, HedgeLost, race_first_chunk
from backends.metrics import RequestObserver, StreamTiming
from backends.reporting import backend_report
from backends.resilience import CircuitBreaker, RetryState, backoff_s, is_backend_fault, may_retry
from backends.running import probe_health, run_in_scope
from backends.selection import Selector, context_window
from backends.strategies import Strategy
from backends.types import (
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    ModelCard,
    RequestContext,
    RerankRequest,
    RerankResult,
    Task,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ManagerSettings:
    strategy: Strategy = Strategy.LEAST_LOADED
    max_pending_requests: int = 256
    max_attempts: int = 3
    # Circuit breaker: this many consecutive failures eject a backend for a cooldown that
    # doubles on each repeated trip, up to the maximum.
    failure_threshold: int = 3
    base_cooldown_s: float = 5.0
    max_cooldown_s: float = 300.0
    health_check_interval_s: float = 30.0
    health_check_timeout_s: float = 5.0
    default_timeout_s: float = 300.0
    # best_performance hedges a stream whose first token is later than this many times the
    # best expected TTFT (backends/hedging.py), for at most this share of requests.
    hedge_after_factor: float = HEDGE_AFTER_FACTOR
    hedge_ratio: float = 0.1


class BackendManager:
    def __init__(
        self,
        settings: ManagerSettings | None = None,
        catalog: ModelCatalog | None = None,
        observer: RequestObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or ManagerSettings()
        self.catalog = catalog or ModelCatalog()
        self.observer = observer
        self._rng = rng or random.Random()
        self._backends: dict[str, Backend] = {}
        self._pending = 0
        self._accepting = True
        self._started_at = time.monotonic()
        self._idle = trio.Event()
        self._idle.set()
        # Set by stop_accepting(drain_s=...): in-flight requests still running then fail
        # with ShuttingDownError instead of being cut off without a word.
        self._drain_deadline: float | None = None
        self._deadline_scopes: set[trio.CancelScope] = set()
        self._nursery: trio.Nursery | None = None
        self._backend_scopes: dict[str, trio.CancelScope] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._selector = Selector(self._backends, self._breakers, lambda: self.settings.strategy, self._rng)
        self.select = self._selector.select  # the backend for a request (`backends.selection`)
        self._hedge_budget = HedgeBudget(self.settings.hedge_ratio)
        self.hedges_started = 0
        self.hedges_won = 0  # the hedge's answer was kept

    # ---- registry -------------------------------------------------------------------

    def register(self, backend: Backend) -> None:
        if backend.id in self._backends:
            raise ValueError(f"a backend with id {backend.id!r} is already registered")
        self._backends[backend.id] = backend
        self._breakers[backend.id] = CircuitBreaker(
            self.settings.failure_threshold, self.settings.base_cooldown_s, self.settings.max_cooldown_s
        )
        log.info("registered backend %s (%s)", backend.id, backend.backend_type.value)

    def backends(self) -> list[Backend]:
        return list(self._backends.values())

    def get(self, backend_id: str) -> Backend:
        try:
            return self._backends[backend_id]
        except KeyError:
            raise BackendUnavailableError(f"no backend with id {backend_id!r}") from None

    @property
    def pending(self) -> int:
        return self._pending

    # ---- models ---------------------------------------------------------------------

    def resolve_model(self, task: Task, model: str | None) -> str:
        resolved = self.catalog.resolve(task, model)
        if not resolved:
            raise ModelNotFoundError(f"no model given and no default {task.value} model is configured")
        if not any(b.capabilities.serves(task, resolved) for b in self._backends.values()):
            known = sorted({c.id for c in self.list_models() if c.task == task})
            raise ModelNotFoundError(
                f"model {model or resolved!r} is not served for {task.value} by this node; "
                f"available: {', '.join(known) or 'none'}",
                param="model",
            )
        return resolved

    def list_models(self) -> list[ModelCard]:
        seen: dict[tuple[str, Task], ModelCard] = {}
        for backend in self._backends.values():
            for card in backend.capabilities.models:
                key = (card.id, card.task)
                if key not in seen or (card.loaded and not seen[key].loaded):
                    seen[key] = card
        return list(seen.values())

    async def load_model(self, model: str, backend_id: str | None = None) -> list[str]:
        """Loads `model` (an alias is fine) on every backend that offers it and can load
        models on demand; returns their ids."""
        return await self._on_each(model, backend_id, lambda b, m: b.load_model(m))

    async def unload_model(self, model: str, backend_id: str | None = None) -> list[str]:
        return await self._on_each(model, backend_id, lambda b, m: b.unload_model(m))

    async def _on_each(
        self, model: str, backend_id: str | None, action: Callable[[Backend, str], Awaitable[None]]
    ) -> list[str]:
        resolved = self.catalog.resolve(Task.CHAT, model)
        done: list[str] = []
        unsupported: UnsupportedTaskError | None = None
        for backend in self._backends_offering(model, backend_id):
            try:
                await action(backend, resolved)
            except UnsupportedTaskError as exc:
                # A peer or remote API offers the model but manages its own memory: skip it
                # unless it was the one asked for, or nobody could do it.
                unsupported = exc
                continue
            done.append(backend.id)
        if not done and unsupported is not None:
            raise unsupported
        return done

    def _backends_offering(self, model: str, backend_id: str | None) -> list[Backend]:
        resolved = self.catalog.resolve(Task.CHAT, model)
        pool = [self.get(backend_id)] if backend_id else list(self._backends.values())
        targets = [b for b in pool if any(c.id == resolved for c in b.capabilities.models)]
        if not targets:
            raise ModelNotFoundError(f"no backend offers model {model!r}", param="model")
        return targets

    # ---- dispatch -------------------------------------------------------------------

    def _admit(self, ctx: RequestContext) -> None:
        if not self._accepting:
            raise ShuttingDownError("the node is shutting down and accepts no new requests")
        if self._pending >= self.settings.max_pending_requests:
            raise OverloadedError(
                f"the node already holds {self._pending} requests "
                f"(limit {self.settings.max_pending_requests}); retry shortly",
                retry_after_s=1.0,
            )
        if ctx.deadline is None:
            ctx.deadline = trio.current_time() + self.settings.default_timeout_s

    def _enter(self, backend: Backend, task: Task, model: str) -> None:
        self._pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        backend.metrics.in_flight += 1
        backend.metrics.requests_total += 1
        if self.observer:
            self.observer.request_started(backend.id, model, task.value)

    def _exit(
        self,
        backend: Backend,
        task: Task,
        model: str,
        started: float,
        error: BaseException | None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()
        metrics = backend.metrics
        metrics.in_flight -= 1
        latency = trio.current_time() - started
        code: str | None = None
        self._update_breaker(backend, error)
        if error is None:
            metrics.requests_ok += 1
            metrics.consecutive_failures = 0
            metrics.latency_s.update(latency)
            metrics.model(model).latency_s.update(latency)
        elif isinstance(error, (trio.Cancelled, GeneratorExit)):
            code = "cancelled"  # the client went away: no fault of the backend's
        elif isinstance(error, InferenceError) and not is_backend_fault(error):
            # The request's fault (bad input, deadline) or a busy backend, not a broken
            # one: don't count it against the backend's health.
            code = error.code
        else:
            metrics.requests_failed += 1
            metrics.consecutive_failures += 1
            code = error.code if isinstance(error, InferenceError) else "internal_error"
        if self.observer:
            self.observer.request_finished(
                backend.id,
                model,
                task.value,
                latency_s=latency,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                error_code=code,
            )

    def _update_breaker(self, backend: Backend, error: BaseException | None) -> None:
        breaker = self._breakers.get(backend.id)
        if breaker is None:  # removed while the request ran
            return
        now = trio.current_time()
        if error is None:
            breaker.record_success()
        elif isinstance(error, OverloadedError):
            breaker.hold(now + error.retry_after_s)
        elif is_backend_fault(error) and breaker.record_failure(now):
            log.warning("backend %s ejected for %.0fs after repeated failures", backend.id, breaker.cooldown_s())

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        """Yields chunks of the answer. Callers must close it (`aclosing`)."""
        self._admit(ctx)
        task = request.task
        original = request
        shown = AnswerSoFar()
        tried: set[str] = set()
        retry = RetryState()
        hedge: _Hedge | None = None  # a hedge that answered first: the next attempt, already running
        while True:
            first: outcome.Outcome[GenerationChunk] | None = None
            if hedge is not None:
                backend, opened, started, first = hedge.backend, hedge.chunks, hedge.started, hedge.first
                hedge = None
                tried.add(backend.id)
                ctx.served_by = backend.id
            else:
                backend = await self._select_for_attempt(
                    task, request.model, tried, retry, ctx, need_continuation=shown.handed_over
                )
                started = trio.current_time()
                self._enter(backend, task, request.model)
                opened = backend.stream(request, ctx)
            timing = StreamTiming(backend.metrics, backend.id, request.model, started, self.observer)
            usage_prompt = usage_completion = 0
            error: BaseException | None = None
            try:
                async with aclosing(opened) as chunks:
                    racing = first is None and not shown.tokens
                    if racing and (hedge_at := self._hedge_at(backend, request, ctx, tried)) is not None:
                        hedge, first, failed = await self._race(backend, chunks, hedge_at, request, ctx, tried)
                        if hedge is not None:
                            raise HedgeLost(f"{hedge.backend.id} answered first", failed)
                    while True:
                        if first is not None:
                            chunk, first = _unwrap_step(first), None
                        else:
                            chunk = await self._next_before_deadline(chunks, ctx)
                        if chunk is None:
                            break
                        if chunk.text:
                            timing.token(trio.current_time())
                        if chunk.usage is not None:
                            usage_prompt = chunk.usage.prompt_tokens
                            usage_completion = chunk.usage.completion_tokens
                            chunk = replace(chunk, usage=shown.merged(chunk.usage))
                        shown.add(chunk)
                        yield chunk
                timing.finish(usage_completion)
                return
            except HedgeLost as exc:
                error = exc.failed or exc
                if exc.failed is None:
                    self._record_lost_race(backend, request.model, started)
                continue
            except BaseException as exc:
                error = exc
                if self._may_retry(exc, timing.emitted, len(tried)):
                    retry.failed(exc, context_window(backend, task, request.model))
                    log.warning("backend %s failed before output (%s); retrying elsewhere", backend.id, exc)
                    continue
                if timing.emitted and may_fail_over(exc, attempts=len(tried), max_attempts=self.settings.max_attempts):
                    continued = shown.continued(original)
                    if continued is None:
                        yield shown.final_chunk()
                        return
                    request = continued
                    retry.failed(exc, 0)
                    log.warning(
                        "backend %s broke after %d tokens (%s); continuing the answer elsewhere",
                        backend.id,
                        shown.tokens,
                        exc,
                    )
                    continue
                raise
            finally:
                self._exit(backend, task, request.model, started, error, usage_prompt, usage_completion)

    # ---- hedging --------------------------------------------------------------------

    def _hedge_at(
        self, backend: Backend, request: GenerationRequest, ctx: RequestContext, tried: set[str]
    ) -> float | None:
        """When to hedge this request's first token on `backend` (trio clock), or None."""
        if self.settings.strategy is not Strategy.BEST_PERFORMANCE or self.settings.hedge_ratio <= 0:
            return None
        self._hedge_budget.earn()
        delay = self._selector.hedge_delay_s(
            backend, request.task, request.model, frozenset(tried), not ctx.hops, self.settings.hedge_after_factor
        )
        return None if delay is None else trio.current_time() + delay

    async def _race(
        self,
        backend: Backend,
        chunks: AsyncGenerator[GenerationChunk, None],
        hedge_at: float,
        request: GenerationRequest,
        ctx: RequestContext,
        tried: set[str],
    ) -> tuple[_Hedge | None, outcome.Outcome[GenerationChunk], Exception | None]:
        """The primary's first step, or a hedge's if that comes first: (the hedge if it won,
        the winner's first step, how the primary failed if it did). A hedge that lost is
        closed and accounted for here."""
        started: list[_Hedge] = []

        async def start_hedge() -> AsyncGenerator[GenerationChunk, None] | None:
            try:
                other = self.select(request.task, request.model, frozenset(tried), allow_peers=not ctx.hops)
            except BackendUnavailableError:
                return None
            if not self._hedge_budget.spend():
                return None
            log.debug("request %s: no first token from %s yet, hedging on %s", ctx.request_id, backend.id, other.id)
            self.hedges_started += 1
            self._enter(other, request.task, request.model)
            chunks = other.stream(request, ctx)
            started.append(_Hedge(other, chunks, trio.current_time()))
            return chunks

        try:
            with self._deadline_scope(ctx) as scope:
                race = await race_first_chunk(chunks, hedge_at, start_hedge)
        except BaseException:  # the client went away mid-race: the hedge must not outlive it
            for lost in started:
                await self._close_lost(lost, request.task, request.model, HedgeLost("the request ended"))
            raise
        if scope.cancelled_caught:
            for lost in started:
                await self._close_lost(lost, request.task, request.model, HedgeLost("the request's deadline passed"))
            raise self._deadline_error(ctx)
        if not started:
            return None, race.first, None
        hedge = started[0]
        if race.hedge_won:
            self.hedges_won += 1
            hedge.first = race.first
            return hedge, race.first, race.loser_failure
        beaten = HedgeLost(f"{backend.id} answered first", race.loser_failure)
        await self._close_lost(hedge, request.task, request.model, beaten)
        return None, race.first, None

    async def _close_lost(self, hedge: _Hedge, task: Task, model: str, error: HedgeLost) -> None:
        with trio.CancelScope(shield=True):
            await hedge.chunks.aclose()
        if error.failed is None:
            self._record_lost_race(hedge.backend, model, hedge.started)
        self._exit(hedge.backend, task, model, hedge.started, error.failed or error)

    def _record_lost_race(self, backend: Backend, model: str, started: float) -> None:
        """A backend that lost a race is at least this slow to its first token: a censored
        sample, enough to stop routing to it as if it were fast (or unmeasured)."""
        now = trio.current_time()
        elapsed = now - started
        perf = backend.metrics.model(model)
        if perf.ttft_s.value is None or elapsed > perf.ttft_s.value:
            perf.ttft_s.update(elapsed, now)
        perf.samples += 1

    async def generate(self, request: GenerationRequest, ctx: RequestContext) -> GenerationResult:
        parts: list[str] = []
        final: GenerationChunk | None = None
        async with aclosing(self.stream(request, ctx)) as chunks:
            async for chunk in chunks:
                parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    final = chunk
        if final is None or final.usage is None:
            raise BackendUnavailableError("the backend ended the answer without a final chunk")
        return GenerationResult(
            text="".join(parts),
            finish_reason=final.finish_reason or "stop",
            usage=final.usage,
            model=request.model,
            backend_id=ctx.served_by or "",
        )

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        result = await self._call(request.task, request.model, ctx, lambda backend: backend.embed(request, ctx))
        return result

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        return await self._call(request.task, request.model, ctx, lambda backend: backend.rerank(request, ctx))

    async def _call(
        self,
        task: Task,
        model: str,
        ctx: RequestContext,
        call: Callable[[Backend], Awaitable[T]],
    ) -> T:
        self._admit(ctx)
        tried: set[str] = set()
        retry = RetryState()
        while True:
            backend = await self._select_for_attempt(task, model, tried, retry, ctx)
            started = trio.current_time()
            error: BaseException | None = None
            prompt_tokens = 0
            self._enter(backend, task, model)
            try:
                with self._deadline_scope(ctx) as scope:
                    result = await call(backend)
                if scope.cancelled_caught:
                    raise self._deadline_error(ctx)
                prompt_tokens = getattr(getattr(result, "usage", None), "prompt_tokens", 0)
                backend.metrics.model(model).samples += 1
                return result
            except BaseException as exc:
                error = exc
                if self._may_retry(exc, False, len(tried)):
                    retry.failed(exc, context_window(backend, task, model))
                    log.warning("backend %s failed (%s); retrying elsewhere", backend.id, exc)
                    continue
                raise
            finally:
                self._exit(backend, task, model, started, error, prompt_tokens)

    async def _next_before_deadline(
        self, chunks: AsyncGenerator[GenerationChunk, None], ctx: RequestContext
    ) -> GenerationChunk | None:
        # The cancel scope wraps one await, never a yield: safe inside an async generator.
        # Spelled out rather than `with self._deadline_scope(ctx)`: this runs once per
        # streamed token, and a generator-based context manager costs as much as the rest.
        scope = trio.CancelScope(deadline=self._deadline_of(ctx))
        self._deadline_scopes.add(scope)
        try:
            with scope:
                try:
                    return await anext(chunks)
                except StopAsyncIteration:
                    return None
        finally:
            self._deadline_scopes.discard(scope)
        raise self._deadline_error(ctx)

    def _deadline_of(self, ctx: RequestContext) -> float:
        return min(ctx.deadline or math.inf, self._drain_deadline or math.inf)

    @contextmanager
    def _deadline_scope(self, ctx: RequestContext) -> Iterator[trio.CancelScope]:
        with trio.move_on_at(self._deadline_of(ctx)) as scope:
            self._deadline_scopes.add(scope)
            try:
                yield scope
            finally:
                self._deadline_scopes.discard(scope)

    def _deadline_error(self, ctx: RequestContext) -> InferenceError:
        if self._drain_deadline is not None and trio.current_time() >= self._drain_deadline:
            return ShuttingDownError(f"the node shut down before request {ctx.request_id} finished")
        return DeadlineExceededError(f"request {ctx.request_id} exceeded its deadline")

    def _may_retry(self, exc: BaseException, emitted: bool, attempts: int) -> bool:
        return may_retry(exc, emitted=emitted, attempts=attempts, max_attempts=self.settings.max_attempts)

    async def _select_for_attempt(
        self,
        task: Task,
        model: str,
        tried: set[str],
        retry: RetryState,
        ctx: RequestContext,
        need_continuation: bool = False,
    ) -> Backend:
        """The backend for the next attempt. A retry waits a jittered backoff (within the
        deadline) and, if no other backend can take it, re-raises the failure it retries."""
        if retry.last_error is not None:
            with self._deadline_scope(ctx) as scope:
                await trio.sleep(backoff_s(len(tried), self._rng))
            if scope.cancelled_caught:
                raise self._deadline_error(ctx)
        try:
            # A request that came from a peer is served here, never forwarded again: no loops.
            backend = self.select(
                task,
                model,
                frozenset(tried),
                retry.min_context_window,
                allow_peers=not ctx.hops,
                need_continuation=need_continuation,
            )
        except BackendUnavailableError:
            if retry.last_error is not None:
                raise retry.last_error from None
            raise
        tried.add(backend.id)
        ctx.served_by = backend.id
        return backend

    # ---- running --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs every registered backend and the health checks until cancelled.

        Each backend's `run` task lives in this nursery; cancelling `run` stops them all
        (backends close themselves in their own `finally`).
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for backend in list(self._backends.values()):
                    await self._start_backend(backend)
                nursery.start_soon(self._health_loop)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def add(self, backend: Backend) -> None:
        """Registers a backend while the manager runs, and starts it."""
        self.register(backend)
        if self._nursery is not None:
            await self._start_backend(backend)

    async def remove(self, backend_id: str) -> None:
        self._backends.pop(backend_id, None)
        self._breakers.pop(backend_id, None)
        scope = self._backend_scopes.pop(backend_id, None)
        if scope is not None:
            scope.cancel()

    async def _start_backend(self, backend: Backend) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._backend_scopes[backend.id] = scope
        await self._nursery.start(run_in_scope, backend, scope)

    async def _health_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.health_check_interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for backend in list(self._backends.values()):
                nursery.start_soon(probe_health, backend, self.settings.health_check_timeout_s)

    def stop_accepting(self, drain_s: float | None = None) -> None:
        """Refuse new requests. With `drain_s`, requests still in flight that long from now
        fail with ShuttingDownError (streams get an error event, not a silent cut)."""
        self._accepting = False
        if drain_s is not None:
            self._drain_deadline = trio.current_time() + drain_s
            for scope in self._deadline_scopes:
                scope.deadline = min(scope.deadline, self._drain_deadline)

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def wait_idle(self) -> None:
        """Returns once no request is in flight (used for graceful shutdown)."""
        await self._idle.wait()

    # ---- reporting ------------------------------------------------------------------

    def status_report(self) -> dict[str, object]:
        return {
            "strategy": self.settings.strategy.value,
            "accepting": self._accepting,
            "pending_requests": self._pending,
            "max_pending_requests": self.settings.max_pending_requests,
            "default_models": {task.value: model for task, model in self.catalog.defaults.items()},
            "aliases": dict(self.catalog.aliases),
            "backends": [backend_report(b, self._breakers[b.id]) for b in self._backends.values()],
            "hedges": {"started": self.hedges_started, "won": self.hedges_won},
        }


@dataclass
class _Hedge:
    backend: Backend
    chunks: AsyncGenerator[GenerationChunk, None]
    started: float
    first: outcome.Outcome[GenerationChunk] | None = None


def _unwrap_step(step: outcome.Outcome[GenerationChunk]) -> GenerationChunk | None:
    """A first step taken by the race, as `anext` would have given it (None: the end)."""
    try:
        return step.unwrap()
    except StopAsyncIteration:
        return None
