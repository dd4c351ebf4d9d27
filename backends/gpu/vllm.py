"""A vLLM server on this machine, run and watched by the node.

`VllmBackend.run` launches `vllm serve` under a `ProcessSupervisor` and reports started
at once (status INITIALIZING): loading a model takes minutes and must not hold up the
node. With `started_when_ready` it reports started only once the server serves, which is
what `LazyBackend` (start on the first request) waits for.

The server counts as ready when `GET /health` answers 200 *and* `GET /v1/models` lists
the served model (vLLM answers /health before the model is servable in some versions and
setups). Any exit, even 0, or a dead /health restarts it with backoff; meanwhile requests
fail fast with a retryable `BackendUnavailableError` so the manager can go elsewhere.
Inference itself goes through the OpenAI-compatible HTTP backend.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import socket
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from backends.base import Backend
from backends.errors import BackendUnavailableError, UnsupportedTaskError
from backends.gpu.hardware import HardwareInfo, choose_tensor_parallel_size, detect_hardware
from backends.gpu.supervisor import ProcessFailedError, ProcessState, ProcessSupervisor, SupervisorSettings
from backends.remote.openai_compat import OpenAIBackendSettings, OpenAICompatibleBackend
from backends.types import (
    BackendStatus,
    BackendType,
    Capabilities,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    RequestContext,
    RerankRequest,
    RerankResult,
    Task,
)

log = logging.getLogger(__name__)

# vLLM-specific supervision defaults: exit code 2 is an argparse usage error (a bad flag),
# which no restart can fix; shutting down frees GPU memory slowly, so the grace is long.
VLLM_SUPERVISION = SupervisorSettings(
    readiness_interval_s=1.0,
    liveness_interval_s=10.0,
    liveness_failures=3,
    probe_timeout_s=5.0,
    stop_grace_s=30.0,
    backoff_initial_s=2.0,
    backoff_max_s=120.0,
    max_start_failures=3,
    fatal_exit_codes=frozenset({2}),
)


@dataclass(frozen=True)
class VllmSettings:
    model: str  # a Hugging Face id or a local directory
    served_model_name: str | None = None  # the name clients ask for; defaults to `model`
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port when the backend starts
    tensor_parallel_size: int | None = None  # None: chosen from the detected GPUs
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None: vLLM takes it from the model's config
    max_num_seqs: int | None = None  # None: vLLM's default for the hardware
    dtype: str = "auto"
    quantization: str | None = None
    extra_args: tuple[str, ...] = ()
    # The program, or an argv prefix such as ("python", "-m", "vllm.entrypoints.cli.main").
    executable: str | tuple[str, ...] = "vllm"
    startup_timeout_s: float = 1200.0  # first start may download the weights
    api_key: str | None = None
    backend_id: str = "vllm"
    # For the tensor-parallel choice; read from `<model>/config.json` when model is a directory.
    num_attention_heads: int | None = None
    tasks: tuple[Task, ...] = (Task.CHAT, Task.COMPLETION)
    request_timeout_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES, VLLM_* knobs
    log_path: Path | None = None
    supervision: SupervisorSettings = VLLM_SUPERVISION
    # False: run() reports started at once and the node serves while the model loads.
    # True: only once the server is ready, and run() raises if it cannot start; this is
    # what LazyBackend (start on first request) needs.
    started_when_ready: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("vllm: a model is required")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm: gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"vllm: port must be 0..65535, got {self.port}")
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            raise ValueError(f"vllm: tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not self.executable:
            raise ValueError("vllm: executable must not be empty")

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model


def build_command(settings: VllmSettings) -> list[str]:
    """The `vllm serve` command line. Port and tensor-parallel size must be resolved."""
    if settings.port == 0 or settings.tensor_parallel_size is None:
        raise ValueError("resolve the port and tensor_parallel_size first (resolve_settings)")
    prefix = [settings.executable] if isinstance(settings.executable, str) else list(settings.executable)
    command = [
        *prefix,
        "serve",
        settings.model,
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--served-model-name",
        settings.served_name,
        "--tensor-parallel-size",
        str(settings.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(settings.gpu_memory_utilization),
    ]
    if settings.max_model_len is not None:
        command += ["--max-model-len", str(settings.max_model_len)]
    if settings.max_num_seqs is not None:
        command += ["--max-num-seqs", str(settings.max_num_seqs)]
    command += ["--dtype", settings.dtype]
    if settings.quantization:
        command += ["--quantization", settings.quantization]
    if settings.api_key:
        command += ["--api-key", settings.api_key]
    return [*command, *settings.extra_args]


def redact(command: list[str]) -> str:
    """The command line for logs and status reports, without the API key."""
    shown: list[str] = []
    hide_next = False
    for arg in command:
        if hide_next:
            shown.append("REDACTED")
            hide_next = False
        elif arg == "--api-key":
            shown.append(arg)
            hide_next = True
        elif arg.startswith("--api-key="):
            shown.append("--api-key=REDACTED")
        else:
            shown.append(arg)
    return shlex.join(shown)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def read_num_attention_heads(model: str) -> int | None:
    """From a local model directory's config.json (multimodal configs nest it in text_config)."""
    config_path = Path(model).expanduser() / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}, config.get("llm_config") or {}):
        heads = section.get("num_attention_heads") if isinstance(section, dict) else None
        if isinstance(heads, int) and heads > 0:
            return heads
    return None


def resolve_settings(settings: VllmSettings, hardware: HardwareInfo) -> VllmSettings:
    """Fill in what the settings leave to the machine: a free port and the TP size."""
    port = settings.port or free_port(_loopback_for(settings.host))
    tp = settings.tensor_parallel_size
    if tp is None:
        heads = settings.num_attention_heads or read_num_attention_heads(settings.model)
        tp = choose_tensor_parallel_size(hardware.gpu_count, heads)
    return dataclasses.replace(settings, port=port, tensor_parallel_size=tp)


@dataclass(frozen=True)
class VllmMetrics:
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None  # 0..1
    scraped_at: float | None = None  # time.time()


def parse_vllm_metrics(text: str, scraped_at: float | None = None) -> VllmMetrics:
    """vLLM's Prometheus gauges, summed over engines (data parallel); the KV cache figure
    is the fullest engine's. vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc."""
    sums: dict[str, float] = {}
    peaks: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
            peaks[sample.name] = max(peaks.get(sample.name, 0.0), sample.value)
    running = sums.get("vllm:num_requests_running")
    waiting = sums.get("vllm:num_requests_waiting")
    kv = peaks.get("vllm:kv_cache_usage_perc", peaks.get("vllm:gpu_cache_usage_perc"))
    return VllmMetrics(
        running=int(running) if running is not None else None,
        waiting=int(waiting) if waiting is not None else None,
        kv_cache_usage=kv,
        scraped_at=scraped_at,
    )


def _loopback_for(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard means loopback)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _url_host(host: str) -> str:
    address = _loopback_for(host)
    return f"[{address}]" if ":" in address else address  # IPv6 literals need brackets in a URL


class VllmBackend(Backend):
    backend_type = BackendType.GPU

    def __init__(self, settings: VllmSettings, *, hardware: HardwareInfo | None = None) -> None:
        super().__init__(settings.backend_id, name=f"vLLM {settings.served_name}")
        self.settings = settings
        self.hardware = hardware
        self.resolved: VllmSettings | None = None
        self.command: list[str] = []
        self.supervisor: ProcessSupervisor | None = None
        self.metrics_snapshot = VllmMetrics()
        self._port = settings.port
        self._context_window = settings.max_model_len
        self._probe_client: httpx.AsyncClient | None = None
        self._delegate: OpenAICompatibleBackend | None = None
        self._setup_error = ""
        self._changed = trio.Event()

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{_url_host(self.settings.host)}:{self._port}"

    @property
    def process_state(self) -> ProcessState:
        if self._setup_error:
            return ProcessState.FAILED
        return self.supervisor.state if self.supervisor is not None else ProcessState.STARTING

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.status = BackendStatus.INITIALIZING
        self.status_detail = "starting vLLM"
        self.supervisor, self._setup_error = None, ""  # a lazy backend runs this again after a stop
        if not self._port:
            self._port = free_port(_loopback_for(self.settings.host))
        self._probe_client = httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(5.0), trust_env=False, headers=self._auth_headers()
        )
        self._delegate = OpenAICompatibleBackend(
            OpenAIBackendSettings(
                backend_id=self.id,
                base_url=f"{self.base_url}/v1",
                api_key=self.settings.api_key,
                models=self._cards(),
                discover_models=False,
                timeout_s=self.settings.request_timeout_s,
                backend_type=BackendType.GPU,
            )
        )
        failure = ""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._delegate.run)
                nursery.start_soon(self._supervise)
                if self.settings.started_when_ready:
                    if await self.wait_until(ProcessState.READY, ProcessState.FAILED) is ProcessState.FAILED:
                        failure = self.status_detail
                        nursery.cancel_scope.cancel()
                if not failure:
                    task_status.started()
                    await trio.sleep_forever()
            # Only a failed start gets here (sleep_forever ends by cancellation), outside the
            # nursery so the caller gets this error rather than an exception group.
            raise BackendUnavailableError(f"vLLM backend {self.id} could not start: {failure}")
        finally:
            with trio.CancelScope(shield=True):
                await self._probe_client.aclose()
            self.status = BackendStatus.OFFLINE
            self.status_detail = failure or "stopped"

    async def _supervise(self) -> None:
        try:
            if self.hardware is None:
                # nvidia-smi, or a torch import as a fallback: seconds, off the event loop.
                self.hardware = await trio.to_thread.run_sync(detect_hardware, abandon_on_cancel=True)
            self.resolved = resolve_settings(dataclasses.replace(self.settings, port=self._port), self.hardware)
            self.command = build_command(self.resolved)
        except (ValueError, OSError) as exc:
            self._setup_error = f"cannot build the vLLM command: {exc}"
            self._set_status(BackendStatus.OFFLINE, self._setup_error)
            return
        supervision = dataclasses.replace(
            self.settings.supervision,
            startup_timeout_s=self.settings.startup_timeout_s,
            log_path=self.settings.log_path or self.settings.supervision.log_path,
            env={**(self.settings.supervision.env or {}), **self.settings.env},
        )
        self.supervisor = ProcessSupervisor(
            self.command,
            readiness=self._ready,
            liveness=self._alive,
            settings=supervision,
            on_state_change=self._on_state,
            name=f"vllm[{self.id}]",
            secrets=(self.settings.api_key,) if self.settings.api_key else (),
        )
        self._set_status(BackendStatus.INITIALIZING, f"starting: {redact(self.command)}")
        try:
            await self.supervisor.run()
        except ProcessFailedError as exc:
            # The backend stays registered and says why; the node keeps serving without it.
            self._set_status(BackendStatus.OFFLINE, str(exc))

    async def wait_until(self, *states: ProcessState) -> ProcessState:
        """Returns once the server's state is one of `states` (bound it with a timeout)."""
        while self.process_state not in states:
            await self._changed.wait()
        return self.process_state

    def _set_status(self, status: BackendStatus, detail: str) -> None:
        self.status = status
        self.status_detail = detail
        self._changed.set()
        self._changed = trio.Event()

    def _on_state(self, state: ProcessState) -> None:
        sup = self.supervisor
        assert sup is not None
        if state is not ProcessState.READY:
            self.metrics_snapshot = VllmMetrics()  # figures from a dead server would mislead routing
        if state is ProcessState.READY:
            self._set_status(BackendStatus.HEALTHY, "")
        elif state is ProcessState.RESTARTING:
            tail = "\n".join(sup.log_tail(10))
            detail = f"restarting (restart {sup.restart_count}) after: {sup.last_failure}"
            self._set_status(BackendStatus.UNHEALTHY, detail + (f"\nlast output:\n{tail}" if tail else ""))
        elif state is ProcessState.STOPPED:
            self._set_status(BackendStatus.OFFLINE, "stopped")
        elif state is ProcessState.FAILED:
            self._set_status(BackendStatus.OFFLINE, f"failed: {sup.last_failure}")
        else:
            self._set_status(BackendStatus.INITIALIZING, f"starting: {redact(self.command)}")

    # ---- probes ----------------------------------------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._probe_client is None:
            raise BackendUnavailableError(f"backend {self.id} is not running")
        return self._probe_client

    async def _ready(self) -> bool:
        if (await self._http.get("/health")).status_code != 200:
            return False
        response = await self._http.get("/v1/models")
        if response.status_code != 200:
            return False
        for entry in response.json().get("data", []):
            if entry.get("id") == self.settings.served_name:
                window = entry.get("max_model_len")
                if isinstance(window, int) and window > 0:
                    self._context_window = window
                return True
        return False

    async def _alive(self) -> bool:
        return (await self._http.get("/health")).status_code == 200

    async def check_health(self) -> BackendStatus:
        """Scrapes /metrics while the server is ready; otherwise reports the supervisor's view."""
        if self.process_state is not ProcessState.READY:
            return self.status
        try:
            health = await self._http.get("/health")
            if health.status_code != 200:
                self.status_detail = f"/health answered {health.status_code}"
                return BackendStatus.UNHEALTHY
            response = await self._http.get("/metrics")
            if response.status_code == 200:
                self.metrics_snapshot = parse_vllm_metrics(response.text, time.time())
            else:
                log.warning("backend %s: /metrics answered %s", self.id, response.status_code)
        except httpx.HTTPError as exc:
            self.status_detail = f"health check failed: {exc or type(exc).__name__}"
            return BackendStatus.UNHEALTHY
        except ValueError as exc:  # a /metrics body the Prometheus parser rejects
            log.warning("backend %s: unreadable /metrics: %s", self.id, exc)
        if self.process_state is not ProcessState.READY:
            return self.status  # it died while we asked: the supervisor's verdict is newer
        self.status_detail = ""
        return BackendStatus.HEALTHY

    # ---- what it offers --------------------------------------------------------------

    def _cards(self) -> tuple[ModelCard, ...]:
        loaded = self.process_state is ProcessState.READY
        name, window = self.settings.served_name, self._context_window
        tasks = self.settings.tasks
        return tuple(ModelCard(name, t, context_window=window, loaded=loaded, owned_by=self.id) for t in tasks)

    @property
    def capabilities(self) -> Capabilities:
        # The accelerators vLLM runs on ("cpu" only for its CPU build); unknown until detected.
        found = self.hardware.accelerators if self.hardware else frozenset()
        return Capabilities(
            tasks=frozenset(self.settings.tasks),
            models=self._cards(),
            streaming=True,
            batching=True,
            hardware=(found - {"cpu"}) or found,
            protocols=frozenset({"openai"}),
            context_window=self._context_window,
        )

    @property
    def endpoint(self) -> str | None:
        return f"{self.base_url}/v1" if self._port else None

    def queue_size(self) -> int:
        return self.metrics_snapshot.waiting or 0

    def describe(self) -> dict[str, object]:
        sup = self.supervisor
        m = self.metrics_snapshot
        return {
            "state": self.process_state.value,
            "pid": sup.pid if sup else None,
            "restarts": sup.restart_count if sup else 0,
            "last_exit_code": sup.last_exit_code if sup else None,
            "last_failure": sup.last_failure if sup else self._setup_error,
            "command": redact(self.command) if self.command else None,
            "served_model_name": self.settings.served_name,
            "tensor_parallel_size": self.resolved.tensor_parallel_size if self.resolved else None,
            "requests_running": m.running,
            "requests_waiting": m.waiting,
            "kv_cache_usage": m.kv_cache_usage,
            "metrics_scraped_at": m.scraped_at,
            "hardware": self.hardware.as_dict() if self.hardware else None,
            "log_tail": sup.log_tail(5) if sup else [],
        }

    # ---- inference ------------------------------------------------------------------

    def _ready_delegate(self, task: Task) -> OpenAICompatibleBackend:
        if task not in self.settings.tasks:
            raise UnsupportedTaskError(f"backend {self.id} does not serve {task.value}")
        state = self.process_state
        if self._delegate is None or state is not ProcessState.READY:
            # Fail fast, retryably: the manager can try another backend instead of waiting.
            reason = self.status_detail.splitlines()[0] if self.status_detail else state.value
            raise BackendUnavailableError(f"vLLM backend {self.id} is {state.value}: {reason}")
        return self._delegate

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        delegate = self._ready_delegate(request.task)
        async with aclosing(delegate.stream(request, ctx)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        return await self._ready_delegate(request.task).embed(request, ctx)

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        return await self._ready_delegate(request.task).rerank(request, ctx)
