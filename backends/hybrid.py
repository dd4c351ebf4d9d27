"""One remote node reachable over several protocols, registered once.

A `HybridBackend` holds one child backend per protocol (HTTP, WebSocket, libp2p...) for the
same remote node. Per request it tries the children in order of preference: routable ones
first, then by the answer's expected duration over each protocol, its measured time to
first token plus, for a generation, the requested tokens at its measured time per token
(the protocols' relay costs differ per token, and a long answer is decided by them, a
short one by the first token; an unmeasured child is tried before a measured slow one,
so every protocol gets measured), and moves to the next protocol when one fails before
output. The manager sees one backend, with the capabilities of the
children together, so routing strategies weigh the node once, not once per protocol.

A failover continuation (a request that carries the answer so far) only goes to children
that can take one. When `capabilities_from` names a child, what that child says the node
serves is what the hybrid offers (a peer's advert: the node's own models, not everything
its HTTP API would forward elsewhere); the other protocols are ways to reach it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import TypeVar

import trio

from backends.base import Backend
from backends.errors import BackendUnavailableError, InferenceError
from backends.metrics import Ewma
from backends.resilience import is_backend_fault
from backends.strategies import STALE_AFTER_S
from backends.types import (
    BackendStatus,
    BackendType,
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
T = TypeVar("T")


class HybridBackend(Backend):
    backend_type = BackendType.HYBRID

    def __init__(
        self,
        backend_id: str,
        children: Sequence[Backend],
        name: str | None = None,
        capabilities_from: Backend | None = None,
    ) -> None:
        if not children:
            raise ValueError(f"hybrid backend {backend_id!r} needs at least one protocol")
        if capabilities_from is not None and capabilities_from not in children:
            raise ValueError(f"hybrid backend {backend_id!r}: capabilities_from must be one of its protocols")
        super().__init__(backend_id, name)
        self.children = list(children)
        self._authority = capabilities_from
        self._ttft = {child.id: Ewma(tau_s=30.0, peak=True) for child in self.children}
        # Each sample is already a whole answer's mean; a short time constant lets a few
        # answers through a protocol correct its first (often cold) sample.
        self._tpot = {child.id: Ewma(tau_s=2.0) for child in self.children}
        self._failures = {child.id: 0 for child in self.children}

    # ---- lifecycle: the children run inside this backend's nursery --------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            # Side by side: a protocol that is slow to connect (a firewalled port waits out
            # its connect timeout) must not hold back the others, nor the caller.
            async with trio.open_nursery() as starting:
                for child in self.children:
                    starting.start_soon(nursery.start, child.run)
            self.status = self._combined_status()
            task_status.started()
            await trio.sleep_forever()

    async def check_health(self) -> BackendStatus:
        async with trio.open_nursery() as nursery:
            for child in self.children:
                nursery.start_soon(self._check_child, child)
        return self._combined_status()

    @staticmethod
    async def _check_child(child: Backend) -> None:
        child.status = await child.check_health()

    def _combined_status(self) -> BackendStatus:
        statuses = [c.status for c in self.children]
        if all(s is BackendStatus.HEALTHY for s in statuses):
            self.status_detail = ""
            return BackendStatus.HEALTHY
        down = [c.id for c in self.children if not c.status.routable]
        self.status_detail = f"down: {', '.join(down)}" if down else ""
        if any(s.routable for s in statuses):
            return BackendStatus.DEGRADED if down else BackendStatus.HEALTHY
        return BackendStatus.UNHEALTHY

    # ---- what it offers ----------------------------------------------------------------

    @property
    def is_peer(self) -> bool:
        return any(child.is_peer for child in self.children)

    @property
    def capabilities(self) -> Capabilities:
        caps = [c.capabilities for c in self.children]
        served = [self._authority.capabilities] if self._authority is not None else caps
        cards = {(card.id, card.task): card for cap in served for card in cap.models}
        windows = [cap.context_window for cap in served if cap.context_window]
        return Capabilities(
            tasks=frozenset(t for cap in served for t in cap.tasks),
            models=tuple(cards.values()),
            streaming=any(cap.streaming for cap in caps),
            batching=any(cap.batching for cap in caps),
            hardware=frozenset(h for cap in caps for h in cap.hardware),
            protocols=frozenset(p for cap in caps for p in cap.protocols),
            context_window=max(windows) if windows else None,
            continuation=any(cap.continuation for cap in caps),
        )

    def queue_size(self) -> int:
        return max((c.queue_size() for c in self.children), default=0)

    def describe(self) -> dict[str, object]:
        return {"protocols": [self._describe_child(child) for child in self.children]}

    def _describe_child(self, child: Backend) -> dict[str, object]:
        ttft, tpot = self._ttft[child.id].value, self._tpot[child.id].value
        return {
            "id": child.id,
            "type": child.backend_type.value,
            "status": child.status.value,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 2),
            "tpot_ms": None if tpot is None else round(tpot * 1000, 3),
            "failures": self._failures[child.id],
            "endpoint": child.endpoint,
        }

    def preference(self, task: object, model: str, continuation: bool = False, tokens: int = 1) -> list[Backend]:
        """Children able to serve, best first: routable, then the shortest expected answer of
        `tokens` tokens (unmeasured first). A continuation goes only to children that can take one."""
        able = [
            c
            for c in self.children
            if c.capabilities.serves(task, model)  # type: ignore[arg-type]
            and (c.capabilities.continuation or not continuation)
        ]

        now = trio.current_time()

        def key(child: Backend) -> tuple[int, float]:
            ttft, tpot = self._ttft[child.id], self._tpot[child.id]
            measured = ttft.value is not None and (tokens == 1 or tpot.value is not None)
            if not measured or now - max(ttft.updated_at, tpot.updated_at) > STALE_AFTER_S:
                expected = -math.inf  # measure it (again): figures of a protocol not used lately are stale
            else:
                expected = (ttft.value or 0.0) + (tokens - 1) * (tpot.value or 0.0)
            return (0 if child.status.routable else 1, expected)

        return sorted(able, key=key)

    # ---- inference: first protocol that works --------------------------------------------

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        last: BaseException | None = None
        wanted = request.params.max_tokens
        for child in self.preference(request.task, request.model, request.continuation is not None, wanted):
            started = trio.current_time()
            emitted = False
            first_at = last_at = 0.0
            pieces = 0
            try:
                async with aclosing(child.stream(request, ctx)) as chunks:
                    async for chunk in chunks:
                        if chunk.text:
                            last_at = trio.current_time()
                            pieces += 1
                            if not emitted:
                                emitted, first_at = True, last_at
                                self._ttft[child.id].update(last_at - started, last_at)
                        if chunk.finish_reason is not None:
                            # Accounted before the last yield: a consumer closes the stream
                            # once it has the finish, so nothing after that yield runs.
                            self._failures[child.id] = 0
                            if pieces > 1:
                                self._tpot[child.id].update((last_at - first_at) / (pieces - 1), last_at)
                        yield chunk
                return
            except InferenceError as exc:
                if emitted or not is_backend_fault(exc):
                    raise  # output reached the client (the manager may continue it), or the input's fault
                last = exc
                self._protocol_failed(child, exc)
        raise self._none_left(request.model, last)

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        return await self._first_that_works(request.task, request.model, lambda c: c.embed(request, ctx))

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        return await self._first_that_works(request.task, request.model, lambda c: c.rerank(request, ctx))

    async def _first_that_works(self, task: object, model: str, call: Callable[[Backend], Awaitable[T]]) -> T:
        last: BaseException | None = None
        for child in self.preference(task, model):
            started = trio.current_time()
            try:
                result = await call(child)
            except InferenceError as exc:
                if not is_backend_fault(exc):
                    raise
                last = exc
                self._protocol_failed(child, exc)
                continue
            self._ttft[child.id].update(trio.current_time() - started, trio.current_time())
            self._failures[child.id] = 0
            return result
        raise self._none_left(model, last)

    def _protocol_failed(self, child: Backend, exc: BaseException) -> None:
        self._failures[child.id] += 1
        log.warning("hybrid %s: %s failed (%s); trying the next protocol", self.id, child.id, exc)

    def _none_left(self, model: str, last: BaseException | None) -> BaseException:
        if last is not None:
            return last
        return BackendUnavailableError(f"no protocol of {self.id} serves {model!r}")
