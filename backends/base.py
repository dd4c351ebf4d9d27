"""The one narrow interface every backend implements.

Streaming is the primitive for text generation: `stream` yields `GenerationChunk`s and
a non-streamed answer is just a consumed stream. Cancellation is trio cancellation:
when the caller's scope is cancelled (client gone, deadline hit), the backend's
generator is closed and must free whatever it holds in its `finally`. Deadlines travel
in the `RequestContext`; the manager enforces them with a cancel scope, and a backend
that crosses a process or network boundary forwards them.

Callers must close streams deterministically (`contextlib.aclosing`) — trio does not
guarantee finalization of abandoned async generators.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncGenerator

import trio

from backends.errors import UnsupportedTaskError
from backends.metrics import BackendMetrics
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


class Backend(abc.ABC):
    """A place that can run inference: this process, a GPU server, an API, a peer..."""

    backend_type: BackendType

    def __init__(self, backend_id: str, name: str | None = None) -> None:
        self.id = backend_id
        self.name = name or backend_id
        self.status = BackendStatus.INITIALIZING
        self.status_detail = ""
        self.metrics = BackendMetrics()
        self.created_at = time.time()
        # Fallback tier: the manager only routes to a higher number when every backend
        # with a lower one has failed this request or can't serve the model.
        self.priority = 0

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. The manager runs this in its nursery.

        The default prepares with `start`, reports ready, and closes with `aclose` on the
        way out. Backends with background work (batchers, supervisors, connections)
        override it and open their own nursery here.
        """
        try:
            await self.start()
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def start(self) -> None:
        """Prepare to serve. May return before models are loaded (lazy backends)."""

    async def aclose(self) -> None:
        """Release everything. Runs shielded from cancellation, so keep it bounded."""

    async def check_health(self) -> BackendStatus:
        """Actively probe the backend; the manager calls this on an interval."""
        return self.status

    # ---- what it offers --------------------------------------------------------------

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @property
    def endpoint(self) -> str | None:
        return None

    @property
    def is_peer(self) -> bool:
        """Reaches another node of the mesh. A request that came from a peer is never sent
        to one again: that is what keeps forwarding free of loops."""
        return self.backend_type is BackendType.P2P

    def queue_size(self) -> int:
        """Requests accepted by the backend but not yet being served."""
        return 0

    def describe(self) -> dict[str, object]:
        """Backend-specific facts for the status report (device, engine stats...)."""
        return {}

    # ---- inference ------------------------------------------------------------------

    def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        """The answer, chunk by chunk; the last chunk carries finish_reason and usage.

        The manager may take the first step in one task and the rest in another (a hedged
        request races first chunks in child tasks), so an implementation must not hold
        task-bound state across a yield: no trio.Lock, CapacityLimiter, cancel scope or
        nursery open over a `yield` (memory channels and plain context managers are fine).
        """
        raise UnsupportedTaskError(f"backend {self.id} does not generate text")

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        raise UnsupportedTaskError(f"backend {self.id} does not compute embeddings")

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        raise UnsupportedTaskError(f"backend {self.id} does not rerank")

    # ---- model management ------------------------------------------------------------

    async def load_model(self, model: str) -> None:
        raise UnsupportedTaskError(f"backend {self.id} cannot load models on demand")

    async def unload_model(self, model: str) -> None:
        raise UnsupportedTaskError(f"backend {self.id} cannot unload models")
