"""Lazy backends: started by their first request, stopped when idle, started again on demand.

`LazyBackend` wraps any backend whose `run()` holds expensive resources (a supervised
vLLM server holding a GPU, a big model in memory). The wrapper is registered in the
manager instead; it reports the inner backend's capabilities from the start, so requests
route to it, and the first one starts the inner backend and waits for it, within
`start_timeout_s`. Concurrent first requests share one start. After `idle_timeout_s`
without requests in flight the inner backend is stopped (its `run()` cancelled), freeing
what it holds; the next request starts it again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

import trio

from backends.base import Backend
from backends.errors import BackendUnavailableError
from backends.types import (
    BackendStatus,
    Capabilities,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    RequestContext,
    RerankRequest,
    RerankResult,
)

log = logging.getLogger(__name__)


class LazyBackend(Backend):
    def __init__(self, inner: Backend, *, idle_timeout_s: float = 300.0, start_timeout_s: float = 600.0) -> None:
        super().__init__(inner.id, inner.name)
        self.backend_type = inner.backend_type
        self.inner = inner
        self.priority = inner.priority
        self.idle_timeout_s = idle_timeout_s
        self.start_timeout_s = start_timeout_s
        self.status = BackendStatus.UNKNOWN  # routable: a request will start it
        self.status_detail = "stopped; starts on the first request"
        self.starts = 0
        self._running = False
        self._nursery: trio.Nursery | None = None
        self._inner_scope: trio.CancelScope | None = None
        self._starting: trio.Event | None = None
        self._start_error: str | None = None
        self._active = 0
        self._last_used = 0.0
        self._wake_idle_watch = trio.Event()

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._stop_when_idle)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _ensure_started(self) -> None:
        if self._running:
            return
        if self._starting is None:
            if self._nursery is None:
                raise BackendUnavailableError(f"backend {self.id} is not running")
            self._starting = trio.Event()
            self._nursery.start_soon(self._start)
        starting = self._starting
        with trio.move_on_after(self.start_timeout_s):
            await starting.wait()
        if not self._running:
            reason = self._start_error or f"it did not start within {self.start_timeout_s:.0f}s"
            raise BackendUnavailableError(f"backend {self.id} could not be started: {reason}")

    async def _start(self) -> None:
        assert self._nursery is not None and self._starting is not None
        starting = self._starting
        self.status, self.status_detail = BackendStatus.INITIALIZING, "starting"
        log.info("starting backend %s on demand", self.id)
        self.starts += 1
        self._start_error = None
        try:
            with trio.fail_after(self.start_timeout_s):
                self._inner_scope = await self._nursery.start(self._run_inner)
            self._running = True
            self.status, self.status_detail = self.inner.status, self.inner.status_detail
            self._last_used = trio.current_time()
            self._wake_idle_watch.set()
        except Exception as exc:  # a start failure is reported to the waiting requests
            if isinstance(exc, trio.TooSlowError):
                self._start_error = f"it did not become ready within {self.start_timeout_s:.0f}s"
            else:
                self._start_error = str(exc) or type(exc).__name__
            self.status, self.status_detail = BackendStatus.UNHEALTHY, f"start failed: {self._start_error}"
            log.warning("backend %s failed to start: %s", self.id, self._start_error)
        finally:
            self._starting = None
            starting.set()

    async def _run_inner(self, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        scope = trio.CancelScope()
        reporter = _ScopeReporter(task_status, scope)
        try:
            with scope:
                await self.inner.run(task_status=reporter)  # type: ignore[arg-type]
            self.status, self.status_detail = BackendStatus.UNKNOWN, "stopped; starts on the first request"
        except Exception as exc:
            if not reporter.reported:
                raise  # nursery.start hands it to _start, which tells the waiting requests
            # It died while serving: say so; the next request starts it again.
            log.warning("backend %s stopped with an error: %s", self.id, exc)
            self.status, self.status_detail = BackendStatus.UNHEALTHY, f"stopped with an error: {exc}"
        finally:
            self._running = False
            self._inner_scope = None

    async def _stop_when_idle(self) -> None:
        while True:
            if not self._running:
                await self._wake_idle_watch.wait()
                self._wake_idle_watch = trio.Event()
                continue
            idle_for = trio.current_time() - self._last_used
            if self._active == 0 and idle_for >= self.idle_timeout_s:
                log.info("stopping backend %s after %.0fs idle", self.id, idle_for)
                self._running = False
                if self._inner_scope is not None:
                    self._inner_scope.cancel()
                continue
            await trio.sleep(max(self.idle_timeout_s - idle_for, 0.5))

    async def check_health(self) -> BackendStatus:
        if not self._running:
            return self.status
        status = await self.inner.check_health()
        self.status_detail = self.inner.status_detail
        return status

    # ---- what it offers --------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    @property
    def endpoint(self) -> str | None:
        return self.inner.endpoint

    def queue_size(self) -> int:
        return self.inner.queue_size() if self._running else 0

    def describe(self) -> dict[str, object]:
        return {
            **(self.inner.describe() if self._running else {}),
            "lifecycle": {
                "lazy": True,
                "running": self._running,
                "starts": self.starts,
                "idle_timeout_s": self.idle_timeout_s,
                "idle_for_s": round(trio.current_time() - self._last_used, 1) if self._running else None,
            },
        }

    # ---- inference ------------------------------------------------------------------

    def _enter(self) -> None:
        self._active += 1
        self._last_used = trio.current_time()

    def _leave(self) -> None:
        self._active -= 1
        self._last_used = trio.current_time()

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        self._enter()
        try:
            await self._ensure_started()
            async with aclosing(self.inner.stream(request, ctx)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._leave()

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        self._enter()
        try:
            await self._ensure_started()
            return await self.inner.embed(request, ctx)
        finally:
            self._leave()

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        self._enter()
        try:
            await self._ensure_started()
            return await self.inner.rerank(request, ctx)
        finally:
            self._leave()

    async def load_model(self, model: str) -> None:
        self._enter()
        try:
            await self._ensure_started()
            await self.inner.load_model(model)
        finally:
            self._leave()

    async def unload_model(self, model: str) -> None:
        if self._running:
            await self.inner.unload_model(model)


class _ScopeReporter:
    """The inner backend's task_status: when it is ready, report our cancel scope for it."""

    def __init__(self, outer: trio.TaskStatus[trio.CancelScope], scope: trio.CancelScope) -> None:
        self._outer = outer
        self._scope = scope
        self.reported = False

    def started(self, value: object = None) -> None:
        self.reported = True
        self._outer.started(self._scope)
