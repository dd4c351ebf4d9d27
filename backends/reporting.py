"""One backend as the status report shows it (`/status`, `p2p-node status`, `/metrics`)."""

from __future__ import annotations

import trio

from backends.base import Backend
from backends.resilience import CircuitBreaker


def backend_report(backend: Backend, breaker: CircuitBreaker) -> dict[str, object]:
    caps = backend.capabilities
    loaded = sum(1 for c in caps.models if c.loaded)
    reopens_in = breaker.open_until - trio.current_time()
    return {
        "id": backend.id,
        "name": backend.name,
        "type": backend.backend_type.value,
        "priority": backend.priority,
        "status": backend.status.value,
        "status_detail": backend.status_detail,
        "endpoint": backend.endpoint,
        "capabilities": {
            "tasks": sorted(t.value for t in caps.tasks),
            "models": [
                {"id": c.id, "task": c.task.value, "loaded": c.loaded, "context_window": c.context_window}
                for c in caps.models
            ],
            "streaming": caps.streaming,
            "batching": caps.batching,
            "hardware": sorted(caps.hardware),
            "protocols": sorted(caps.protocols),
            "context_window": caps.context_window,
            "continuation": caps.continuation,
        },
        "metrics": backend.metrics.snapshot(backend.queue_size(), loaded),
        "circuit": {"open": reopens_in > 0, "reopens_in_s": round(max(reopens_in, 0.0), 1), "trips": breaker.trips},
        "details": backend.describe(),
    }
