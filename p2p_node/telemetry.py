"""Prometheus metrics for the node.

Histograms and counters are fed per request through the manager's `RequestObserver`
hooks; gauges (running, waiting, batching) are read from the manager's status report
at scrape time, so they can never disagree with `/status`. Names follow vLLM's where
they mean the same thing (`time_to_first_token_seconds`, `inter_token_latency_seconds`,
`e2e_request_latency_seconds`, `num_requests_running`, `num_requests_waiting`), under
our own `p2p_node:` prefix. Each node has its own registry, so several nodes can live
in one process (tests do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "p2p_node:"

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)


class Telemetry:
    def __init__(self, status_source: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        labels = ["backend", "model"]
        self.requests = Counter(
            f"{PREFIX}requests", "Requests dispatched to a backend", [*labels, "task"], registry=self.registry
        )
        self.successes = Counter(
            f"{PREFIX}request_success", "Requests that completed", [*labels, "task"], registry=self.registry
        )
        self.errors = Counter(
            f"{PREFIX}request_errors",
            "Requests that failed, by error code",
            [*labels, "task", "code"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}prompt_tokens", "Prompt tokens processed", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            f"{PREFIX}generation_tokens", "Tokens generated", labels, registry=self.registry
        )
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Time to first token",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Time between streamed chunks",
            labels,
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "End-to-end request latency",
            [*labels, "task"],
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StatusCollector(status_source))
        self._itl_children: dict[tuple[str, str], Any] = {}

    # ---- RequestObserver ------------------------------------------------------------

    def request_started(self, backend_id: str, model: str, task: str) -> None:
        self.requests.labels(backend_id, model, task).inc()

    def first_token(self, backend_id: str, model: str, ttft_s: float) -> None:
        self.ttft.labels(backend_id, model).observe(ttft_s)

    def token_gap(self, backend_id: str, model: str, gap_s: float) -> None:
        # Once per streamed token: keep the labelled child rather than look it up each time.
        child = self._itl_children.get((backend_id, model))
        if child is None:
            child = self._itl_children[(backend_id, model)] = self.itl.labels(backend_id, model)
        child.observe(gap_s)

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
    ) -> None:
        if error_code is None:
            self.successes.labels(backend_id, model, task).inc()
            self.e2e.labels(backend_id, model, task).observe(latency_s)
        else:
            self.errors.labels(backend_id, model, task, error_code).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(backend_id, model).inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.labels(backend_id, model).inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatusCollector(Collector):
    def __init__(self, status_source: Callable[[], dict[str, Any]]) -> None:
        self._status = status_source

    def collect(self) -> Iterator[Any]:
        report = self._status()
        manager = report.get("manager", {})
        running = GaugeMetricFamily(f"{PREFIX}num_requests_running", "Requests in flight", labels=["backend"])
        waiting = GaugeMetricFamily(f"{PREFIX}num_requests_waiting", "Requests queued in a backend", labels=["backend"])
        healthy = GaugeMetricFamily(
            f"{PREFIX}backend_up", "1 when the backend is routable", labels=["backend", "type", "status"]
        )
        loaded = GaugeMetricFamily(f"{PREFIX}model_loaded", "1 when the model is loaded", labels=["backend", "model"])
        passes = CounterMetricFamily(
            f"{PREFIX}batch_forward_passes", "Decode steps run by a batching engine", labels=["backend", "model"]
        )
        rows = CounterMetricFamily(
            f"{PREFIX}batch_rows",
            "Sequences processed summed over decode steps (rows/passes = mean batch size)",
            labels=["backend", "model"],
        )
        max_batch = GaugeMetricFamily(
            f"{PREFIX}batch_size_max", "Largest batch a model's engine has run", labels=["backend", "model"]
        )
        for backend in manager.get("backends", []):
            bid = backend["id"]
            metrics = backend["metrics"]
            running.add_metric([bid], metrics["in_flight"])
            waiting.add_metric([bid], metrics["queue_size"])
            up = 1.0 if backend["status"] in ("healthy", "degraded", "initializing", "unknown") else 0.0
            healthy.add_metric([bid, backend["type"], backend["status"]], up)
            for card in backend["capabilities"]["models"]:
                loaded.add_metric([bid, f"{card['id']}:{card['task']}"], 1.0 if card["loaded"] else 0.0)
            for model_id, detail in backend.get("details", {}).get("loaded_models", {}).items():
                engine = detail.get("engine") or {}
                batcher = detail.get("batcher") or {}
                if engine:
                    passes.add_metric([bid, model_id], engine["forward_passes"])
                    rows.add_metric([bid, model_id], engine["rows_processed"])
                    max_batch.add_metric([bid, model_id], engine["max_batch_seen"])
                elif batcher:
                    passes.add_metric([bid, model_id], batcher["batches"])
                    rows.add_metric([bid, model_id], batcher["items"])
                    max_batch.add_metric([bid, model_id], batcher["max_batch_items"])
        pending = GaugeMetricFamily(f"{PREFIX}pending_requests", "Requests held by the node")
        pending.add_metric([], manager.get("pending_requests", 0))
        yield from (running, waiting, healthy, loaded, passes, rows, max_batch, pending)
        yield from _mesh_metrics(report.get("mesh", {}))


def _mesh_metrics(mesh: dict[str, Any]) -> Iterator[Any]:
    if "peer_id" not in mesh:
        return
    peers = GaugeMetricFamily(f"{PREFIX}mesh_peers", "Peers known to the mesh", labels=["state"])
    connected = sum(1 for p in mesh.get("peers", []) if p.get("connected"))
    peers.add_metric(["connected"], connected)
    peers.add_metric(["reconnecting"], len(mesh.get("peers", [])) - connected)
    rtt = GaugeMetricFamily(f"{PREFIX}mesh_peer_rtt_seconds", "Smoothed round trip to a peer", labels=["peer"])
    for peer in mesh.get("peers", []):
        if peer.get("rtt_ms") is not None:
            rtt.add_metric([peer["peer_id"]], peer["rtt_ms"] / 1000.0)
    adverts = CounterMetricFamily(f"{PREFIX}mesh_adverts_sent", "Capability adverts this node has sent")
    adverts.add_metric([], mesh.get("adverts_sent", 0))
    yield from (peers, rtt, adverts)
