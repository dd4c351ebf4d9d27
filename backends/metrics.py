"""Live per-backend figures that routing reads and the status report shows.

These are plain numbers updated on the trio thread; the Prometheus view of the same
events lives in the node (`p2p_node.telemetry`), fed through `RequestObserver`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Ewma:
    """Exponentially weighted moving average with a time constant, not a fixed alpha,
    so a backend that answers rarely is not judged by stale samples for ever."""

    tau_s: float = 10.0
    value: float | None = None
    updated_at: float = 0.0
    # Peak EWMA (Finagle, Linkerd): a sample above the average replaces it at once and
    # decays only slowly, so a backend that just turned slow stops getting traffic now,
    # not after many slow answers.
    peak: bool = False

    def update(self, sample: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.value is None or (self.peak and sample > self.value):
            self.value = sample
        else:
            weight = math.exp(-max(now - self.updated_at, 0.0) / self.tau_s)
            self.value = self.value * weight + sample * (1.0 - weight)
        self.updated_at = now


@dataclass
class ModelPerformance:
    """What we measured for one (backend, model): first-token time and per-token time
    are kept apart on purpose — a long answer must not make a fast starter look slow."""

    ttft_s: Ewma = field(default_factory=lambda: Ewma(peak=True))
    tpot_s: Ewma = field(default_factory=lambda: Ewma(peak=True))
    latency_s: Ewma = field(default_factory=Ewma)
    samples: int = 0


@dataclass
class BackendMetrics:
    requests_total: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    in_flight: int = 0
    tokens_generated: int = 0
    latency_s: Ewma = field(default_factory=Ewma)
    ttft_s: Ewma = field(default_factory=Ewma)
    tokens_per_s: Ewma = field(default_factory=Ewma)
    consecutive_failures: int = 0
    started_at: float = field(default_factory=time.monotonic)
    per_model: dict[str, ModelPerformance] = field(default_factory=dict)

    def model(self, model: str) -> ModelPerformance:
        perf = self.per_model.get(model)
        if perf is None:
            perf = self.per_model[model] = ModelPerformance()
        return perf

    def snapshot(self, queue_size: int, models_loaded: int) -> dict[str, object]:
        return {
            "requests_total": self.requests_total,
            "requests_ok": self.requests_ok,
            "requests_failed": self.requests_failed,
            "in_flight": self.in_flight,
            "queue_size": queue_size,
            "latency_ewma_ms": _ms(self.latency_s.value),
            "ttft_ewma_ms": _ms(self.ttft_s.value),
            "tokens_per_s_ewma": _round(self.tokens_per_s.value),
            "tokens_generated": self.tokens_generated,
            "models_loaded": models_loaded,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class RequestObserver(Protocol):
    """Told about every request the manager dispatches (the node feeds Prometheus from it)."""

    def request_started(self, backend_id: str, model: str, task: str) -> None: ...

    def first_token(self, backend_id: str, model: str, ttft_s: float) -> None: ...

    def token_gap(self, backend_id: str, model: str, gap_s: float) -> None: ...

    def request_finished(
        self,
        backend_id: str,
        model: str,
        task: str,
        *,
        latency_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        error_code: str | None,
    ) -> None: ...


# Per-token time is sampled as the mean gap over this many tokens: single gaps mostly
# measure how chunks were batched on their way here (a 30 ms gap, then three of 0 ms),
# and a peak EWMA would keep the spikes.
TPOT_WINDOW_TOKENS = 8


class StreamTiming:
    """The timing of one streamed attempt: its first token (TTFT) and its per-token time,
    recorded into the backend's figures as tokens arrive."""

    __slots__ = ("_backend_id", "_gaps", "_last", "_metrics", "_model", "_observer", "_perf", "_window_from", "started")

    def __init__(
        self, metrics: BackendMetrics, backend_id: str, model: str, started: float, observer: RequestObserver | None
    ) -> None:
        self._metrics = metrics
        self._perf = metrics.model(model)
        self._backend_id = backend_id
        self._model = model
        self._observer = observer
        self.started = started
        self._last: float | None = None  # the previous token's arrival; None before the first
        self._window_from = started
        self._gaps = 0

    @property
    def emitted(self) -> bool:
        return self._last is not None

    def token(self, now: float) -> None:
        last = self._last
        self._last = now
        if last is None:
            ttft = now - self.started
            self._metrics.ttft_s.update(ttft, now)
            self._perf.ttft_s.update(ttft, now)
            self._perf.samples += 1
            self._window_from = now
            if self._observer:
                self._observer.first_token(self._backend_id, self._model, ttft)
            return
        if self._observer:
            self._observer.token_gap(self._backend_id, self._model, now - last)
        self._gaps += 1
        if self._gaps >= TPOT_WINDOW_TOKENS:
            self._flush(now)

    def finish(self, completion_tokens: int) -> None:
        """The stream ended normally: the last window, and the attempt's token rate."""
        if self._last is None:
            return
        if self._gaps:
            self._flush(self._last)
        self._metrics.tokens_generated += completion_tokens
        elapsed = self._last - self.started
        if completion_tokens > 1 and elapsed > 0:
            self._metrics.tokens_per_s.update(completion_tokens / elapsed)

    def _flush(self, now: float) -> None:
        self._perf.tpot_s.update((now - self._window_from) / self._gaps, now)
        self._window_from = now
        self._gaps = 0
