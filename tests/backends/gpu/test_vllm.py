"""The vLLM backend: its command line, its metrics, and its supervision end to end.

End-to-end tests run `fake_vllm.py` (a stdlib stand-in speaking vLLM's CLI and HTTP
surface) as the real supervised subprocess: `executable` is the argv prefix
`(python, fake_vllm.py)`. The stand-in echoes the last user message word by word, so
answers are exact.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from backends.catalog import ModelCatalog
from backends.errors import (
    BackendUnavailableError,
    ContextWindowExceededError,
    InferenceError,
    UnsupportedTaskError,
)
from backends.gpu.hardware import GpuInfo, HardwareInfo
from backends.gpu.supervisor import ProcessState
from backends.gpu.vllm import (
    VLLM_SUPERVISION,
    VllmBackend,
    VllmMetrics,
    VllmSettings,
    build_command,
    parse_vllm_metrics,
    resolve_settings,
)
from backends.lifecycle import LazyBackend
from backends.manager import BackendManager, ManagerSettings
from backends.types import (
    BackendStatus,
    BackendType,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationChunk,
    GenerationParams,
    GenerationRequest,
    Message,
    RequestContext,
    Task,
)

FAKE_VLLM = Path(__file__).with_name("fake_vllm.py")
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
SERVED = "qwen-small"
NO_GPU = HardwareInfo(cpu_cores=2, ram_total_bytes=8 << 30)
FAST = dataclasses.replace(
    VLLM_SUPERVISION,
    readiness_interval_s=0.05,
    liveness_interval_s=0.1,
    liveness_failures=3,
    probe_timeout_s=2.0,
    stop_grace_s=3.0,
    backoff_initial_s=0.05,
    backoff_max_s=0.5,
)


def h100s(count: int) -> HardwareInfo:
    return HardwareInfo(cuda_gpus=tuple(GpuInfo(i, "NVIDIA H100 80GB HBM3", 81559, 0) for i in range(count)))


def fake_settings(**overrides: Any) -> VllmSettings:
    options: dict[str, Any] = {
        "model": MODEL,
        "served_model_name": SERVED,
        "executable": (sys.executable, str(FAKE_VLLM)),
        "startup_timeout_s": 15.0,
        "supervision": FAST,
    }
    options.update(overrides)
    return VllmSettings(**options)


@asynccontextmanager
async def running(backend: VllmBackend, ready: bool = True) -> AsyncIterator[VllmBackend]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(15):
            await nursery.start(backend.run)
            if ready:
                await backend.wait_until(ProcessState.READY)
        yield backend
        nursery.cancel_scope.cancel()


def chat(text: str, max_tokens: int = 64) -> ChatRequest:
    return ChatRequest((Message("user", text),), SERVED, GenerationParams(max_tokens=max_tokens))


async def collect(backend: VllmBackend, request: GenerationRequest) -> list[GenerationChunk]:
    async with aclosing(backend.stream(request, RequestContext())) as chunks:
        return [chunk async for chunk in chunks]


async def info(backend: VllmBackend) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=backend.base_url, trust_env=False) as client:
        answer: dict[str, Any] = (await client.get("/_fake/info")).json()
        return answer


def gone(pid: int) -> bool:
    """Dead: reaped, or a zombie nobody reaps (PID 1 here does not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


# ---- the command line -------------------------------------------------------------------


def test_the_command_line_is_exactly_vllm_serve_with_every_configured_flag() -> None:
    settings = VllmSettings(
        model="meta-llama/Llama-3.1-70B-Instruct",
        served_model_name="llama-70b",
        host="0.0.0.0",
        port=8123,
        tensor_parallel_size=4,
        gpu_memory_utilization=0.85,
        max_model_len=32768,
        max_num_seqs=128,
        dtype="bfloat16",
        quantization="fp8",
        api_key="sk-local",
        extra_args=("--enable-prefix-caching", "--seed", "7"),
    )
    assert build_command(settings) == [
        "vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct",
        "--host", "0.0.0.0",
        "--port", "8123",
        "--served-model-name", "llama-70b",
        "--tensor-parallel-size", "4",
        "--gpu-memory-utilization", "0.85",
        "--max-model-len", "32768",
        "--max-num-seqs", "128",
        "--dtype", "bfloat16",
        "--quantization", "fp8",
        "--api-key", "sk-local",
        "--enable-prefix-caching", "--seed", "7",
    ]  # fmt: skip


def test_unset_options_are_left_to_vllm_and_the_served_name_defaults_to_the_model() -> None:
    settings = VllmSettings(
        model="/models/qwen",
        port=8000,
        tensor_parallel_size=1,
        executable=("python", "-m", "vllm.entrypoints.cli.main"),
    )
    assert build_command(settings) == [
        "python", "-m", "vllm.entrypoints.cli.main", "serve", "/models/qwen",
        "--host", "127.0.0.1",
        "--port", "8000",
        "--served-model-name", "/models/qwen",
        "--tensor-parallel-size", "1",
        "--gpu-memory-utilization", "0.9",
        "--dtype", "auto",
    ]  # fmt: skip


def test_a_command_cannot_be_built_before_port_and_tensor_parallel_size_are_resolved() -> None:
    with pytest.raises(ValueError, match="resolve"):
        build_command(VllmSettings(model="m", tensor_parallel_size=1))
    with pytest.raises(ValueError, match="resolve"):
        build_command(VllmSettings(model="m", port=8000))


@pytest.mark.parametrize(
    "bad",
    [
        {"model": ""},
        {"gpu_memory_utilization": 1.5},
        {"gpu_memory_utilization": 0},
        {"port": 70000},
        {"executable": ()},
    ],
)
def test_impossible_settings_are_refused_up_front(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="vllm"):
        VllmSettings(**{"model": "m", **bad})


def test_resolution_picks_a_free_port_and_the_tensor_parallel_size_from_gpus_and_heads(tmp_path: Path) -> None:
    resolved = resolve_settings(VllmSettings(model="m", num_attention_heads=12), h100s(8))
    assert resolved.tensor_parallel_size == 4
    assert 0 < resolved.port < 65536
    assert resolve_settings(VllmSettings(model="m", tensor_parallel_size=2, port=9000), h100s(8)) == VllmSettings(
        model="m", tensor_parallel_size=2, port=9000
    )
    assert resolve_settings(VllmSettings(model="m"), NO_GPU).tensor_parallel_size == 1
    # A local checkpoint tells its head count itself (here nested, as multimodal configs do).
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_attention_heads": 14}}))
    assert resolve_settings(VllmSettings(model=str(tmp_path)), h100s(8)).tensor_parallel_size == 2


# ---- metrics ----------------------------------------------------------------------------

# Captured from vLLM 0.10 (V1 engine), trimmed.
VLLM_V1_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-0.6B"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-0.6B"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-0.6B"} 0.4375
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="Qwen/Qwen3-0.6B"} 1822.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="Qwen/Qwen3-0.6B"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-0.6B"} 9.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen3-0.6B"} 9.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen3-0.6B"} 0.53
"""

# vLLM 0.6 (V0 engine) named the KV cache gauge differently; two data-parallel engines.
VLLM_V0_TWO_ENGINES = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m",engine="0"} 2.0
vllm:num_requests_running{model_name="m",engine="1"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m",engine="0"} 0.0
vllm:num_requests_waiting{model_name="m",engine="1"} 4.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m",engine="0"} 0.25
vllm:gpu_cache_usage_perc{model_name="m",engine="1"} 0.75
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VLLM_V1_METRICS, VllmMetrics(running=3, waiting=5, kv_cache_usage=0.4375, scraped_at=1.0)),
        (VLLM_V0_TWO_ENGINES, VllmMetrics(running=3, waiting=4, kv_cache_usage=0.75, scraped_at=1.0)),
        ("# nothing from vLLM here\n", VllmMetrics(scraped_at=1.0)),
    ],
)
def test_vllm_gauges_are_read_from_prometheus_text(text: str, expected: VllmMetrics) -> None:
    assert parse_vllm_metrics(text, scraped_at=1.0) == expected


# ---- supervision end to end -------------------------------------------------------------


async def test_ready_needs_both_health_and_the_served_model_in_the_listing() -> None:
    backend = VllmBackend(fake_settings(env={"FAKE_VLLM_MODELS_DELAY_S": "1.0"}), hardware=NO_GPU)
    async with running(backend, ready=False):
        assert backend.status is BackendStatus.INITIALIZING
        async with httpx.AsyncClient(base_url=backend.base_url, trust_env=False) as client:
            with trio.fail_after(10):
                while True:
                    try:
                        if (await client.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.02)
            assert (await client.get("/v1/models")).json()["data"] == []
        # /health is fine, the model is not listed yet: still starting, and requests fail fast.
        await trio.sleep(0.3)
        assert backend.status is BackendStatus.INITIALIZING
        assert backend.process_state is ProcessState.STARTING
        with trio.fail_after(1), pytest.raises(BackendUnavailableError, match="starting"):
            await collect(backend, chat("too early"))
        with trio.fail_after(10):
            await backend.wait_until(ProcessState.READY)
        assert backend.status is BackendStatus.HEALTHY
        assert backend.capabilities.card(Task.CHAT, SERVED) is not None
        assert backend.capabilities.context_window == 2048  # max_model_len from /v1/models
        text = "".join(c.text for c in await collect(backend, chat("now it works")))
        assert text == "now it works"


async def test_an_unknown_flag_leaves_the_backend_offline_with_vllms_complaint() -> None:
    backend = VllmBackend(fake_settings(extra_args=("--no-such-flag",)), hardware=NO_GPU)
    async with running(backend, ready=False):
        with trio.fail_after(10):
            await backend.wait_until(ProcessState.FAILED)
        assert backend.status is BackendStatus.OFFLINE
        assert "unrecognized arguments: --no-such-flag" in backend.status_detail
        assert "exited with code 2" in backend.status_detail
        assert backend.describe()["restarts"] == 0  # a usage error is not retried
        with pytest.raises(BackendUnavailableError, match="failed"):
            await collect(backend, chat("hello"))


async def test_a_missing_vllm_executable_leaves_the_backend_offline() -> None:
    backend = VllmBackend(fake_settings(executable="/nonexistent/vllm"), hardware=NO_GPU)
    async with running(backend, ready=False):
        with trio.fail_after(10):
            await backend.wait_until(ProcessState.FAILED)
        assert backend.status is BackendStatus.OFFLINE
        assert "cannot execute '/nonexistent/vllm'" in backend.status_detail


async def test_started_when_ready_reports_started_only_once_the_server_serves() -> None:
    settings = fake_settings(started_when_ready=True, env={"FAKE_VLLM_MODELS_DELAY_S": "0.5"})
    backend = VllmBackend(settings, hardware=NO_GPU)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(15):
            await nursery.start(backend.run)
        assert backend.process_state is ProcessState.READY
        assert backend.status is BackendStatus.HEALTHY
        assert "".join(c.text for c in await collect(backend, chat("at once"))) == "at once"
        nursery.cancel_scope.cancel()


async def test_started_when_ready_raises_why_the_server_could_not_start() -> None:
    settings = fake_settings(started_when_ready=True, extra_args=("--no-such-flag",))
    backend = VllmBackend(settings, hardware=NO_GPU)
    with trio.fail_after(15), pytest.raises(BackendUnavailableError, match="unrecognized arguments: --no-such-flag"):
        await backend.run()
    assert backend.status is BackendStatus.OFFLINE
    assert "unrecognized arguments: --no-such-flag" in backend.status_detail


async def test_a_lazy_vllm_starts_on_the_first_request_and_stops_when_idle() -> None:
    inner = VllmBackend(fake_settings(started_when_ready=True), hardware=NO_GPU)
    lazy = LazyBackend(inner, idle_timeout_s=0.5, start_timeout_s=15)
    manager = BackendManager(ManagerSettings(health_check_interval_s=0.2))
    manager.register(lazy)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(manager.run)
            assert inner.supervisor is None  # nothing runs before a request needs it
            first = await manager.generate(chat("wake up"), RequestContext())
            assert first.text == "wake up"
            pid = (await info(inner))["pid"]
            # Idle: the server is stopped, its GPU memory freed.
            await inner.wait_until(ProcessState.STOPPED)
            assert gone(pid)
            second = await manager.generate(chat("and again"), RequestContext())
            assert second.text == "and again"
            assert (await info(inner))["pid"] != pid
            assert lazy.starts == 2
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("code", [0, 1])
async def test_a_server_that_exits_is_restarted_and_requests_resume(code: int) -> None:
    settings = fake_settings(
        env={"FAKE_VLLM_SPAWN_ENGINE": "1"},
        # A wide enough restart window to see requests fail fast during it.
        supervision=dataclasses.replace(FAST, backoff_initial_s=0.5),
    )
    backend = VllmBackend(settings, hardware=NO_GPU)
    async with running(backend):
        before = await info(backend)
        async with httpx.AsyncClient(base_url=backend.base_url, trust_env=False) as client:
            await client.post(f"/_fault/exit?code={code}")
        with trio.fail_after(10):
            await backend.wait_until(ProcessState.RESTARTING)
        assert backend.status is BackendStatus.UNHEALTHY
        assert f"exited with code {code}" in backend.status_detail
        assert "engine core died" in backend.status_detail  # the server's last words
        details = backend.describe()
        assert details["restarts"] == 1
        assert details["last_exit_code"] == code
        with trio.fail_after(0.3), pytest.raises(BackendUnavailableError, match="restarting") as refused:
            await collect(backend, chat("during the restart"))
        assert refused.value.retryable
        with trio.fail_after(10):
            await backend.wait_until(ProcessState.READY)
        assert backend.status is BackendStatus.HEALTHY
        after = await info(backend)
        assert after["pid"] != before["pid"]
        assert gone(before["pid"])
        assert gone(before["engine_pid"])  # the orphaned engine process was killed too
        text = "".join(c.text for c in await collect(backend, chat("back in business")))
        assert text == "back in business"


async def test_a_server_whose_health_fails_is_restarted() -> None:
    backend = VllmBackend(fake_settings(), hardware=NO_GPU)
    async with running(backend):
        first = (await info(backend))["pid"]
        async with httpx.AsyncClient(base_url=backend.base_url, trust_env=False) as client:
            await client.post("/_fault/health?status=503")
        with trio.fail_after(10):
            await backend.wait_until(ProcessState.RESTARTING)
        assert "failed 3 liveness probes in a row" in backend.status_detail
        with trio.fail_after(10):
            await backend.wait_until(ProcessState.READY)
        assert gone(first)
        assert (await info(backend))["pid"] != first


async def test_metrics_are_scraped_into_queue_size_and_describe() -> None:
    settings = fake_settings(max_num_seqs=1, env={"FAKE_VLLM_TOKEN_DELAY_S": "0.2"})
    backend = VllmBackend(settings, hardware=NO_GPU)
    async with running(backend):
        assert await backend.check_health() is BackendStatus.HEALTHY
        assert backend.queue_size() == 0
        assert backend.describe()["requests_running"] == 0
        answers: list[str] = []

        async def ask(text: str) -> None:
            answers.append("".join(c.text for c in await collect(backend, chat(text))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "one two three four")
            nursery.start_soon(ask, "five six seven eight")
            with trio.fail_after(5):
                # One runs, one waits for the single sequence slot.
                while backend.metrics_snapshot.waiting != 1:
                    await trio.sleep(0.05)
                    assert await backend.check_health() is BackendStatus.HEALTHY
            assert backend.queue_size() == 1
            details = backend.describe()
            assert details["requests_running"] == 1
            assert details["requests_waiting"] == 1
            assert details["kv_cache_usage"] == 1.0
        assert sorted(answers) == ["five six seven eight", "one two three four"]
        await backend.check_health()
        assert backend.queue_size() == 0
        assert backend.describe()["requests_running"] == 0


async def test_describe_reports_the_command_without_the_api_key_and_the_gpu_facts() -> None:
    settings = fake_settings(api_key="sk-secret", tensor_parallel_size=None, num_attention_heads=12)
    backend = VllmBackend(settings, hardware=h100s(8))
    async with running(backend):
        details = backend.describe()
        argv = (await info(backend))["argv"]
        # The server received exactly the command built, with the resolved port and TP size.
        assert argv[1:] == backend.command[2:]
        assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
        assert argv[argv.index("--port") + 1] == str(backend.resolved.port if backend.resolved else None)
        assert "--api-key REDACTED" in str(details["command"])
        assert "sk-secret" not in json.dumps(details)
        assert details["tensor_parallel_size"] == 4
        hardware = details["hardware"]
        assert isinstance(hardware, dict) and hardware["gpu_count"] == 8
        assert backend.capabilities.hardware == frozenset({"cuda"})
        assert backend.endpoint == f"{backend.base_url}/v1"
        # The API key guards the server; the backend's probes and requests carry it.
        async with httpx.AsyncClient(base_url=backend.base_url, trust_env=False) as client:
            assert (await client.get("/v1/models")).status_code == 401
        assert "".join(c.text for c in await collect(backend, chat("with a key"))) == "with a key"


async def test_a_server_dying_mid_answer_is_a_retryable_error_not_a_hang() -> None:
    backend = VllmBackend(fake_settings(env={"FAKE_VLLM_TOKEN_DELAY_S": "0.2"}), hardware=NO_GPU)
    async with running(backend):
        received: list[str] = []
        with trio.fail_after(5), pytest.raises(InferenceError) as failure:
            async with aclosing(backend.stream(chat("one two three four five six"), RequestContext())) as chunks:
                async for chunk in chunks:
                    received.append(chunk.text)
                    if len(received) == 1:
                        async with httpx.AsyncClient(base_url=backend.base_url, trust_env=False) as client:
                            await client.post("/_fault/exit?code=1")
        assert failure.value.retryable
        assert received[0] == "one"
        assert "".join(received) != "one two three four five six"


async def test_closing_a_stream_early_ends_the_request_on_the_server() -> None:
    backend = VllmBackend(fake_settings(env={"FAKE_VLLM_TOKEN_DELAY_S": "0.2"}), hardware=NO_GPU)
    async with running(backend):
        async with aclosing(backend.stream(chat("one two three four five six"), RequestContext())) as chunks:
            assert (await anext(chunks)).text == "one"
            await backend.check_health()
            assert backend.describe()["requests_running"] == 1
        with trio.fail_after(5):
            while backend.describe()["requests_running"] != 0:
                await trio.sleep(0.05)
                await backend.check_health()


async def test_cancelling_the_backend_kills_the_whole_process_group() -> None:
    backend = VllmBackend(fake_settings(env={"FAKE_VLLM_SPAWN_ENGINE": "1"}), hardware=NO_GPU)
    async with running(backend):
        pids = await info(backend)
        assert not gone(pids["pid"]) and not gone(pids["engine_pid"])
    assert gone(pids["pid"])
    assert gone(pids["engine_pid"])
    assert backend.status is BackendStatus.OFFLINE
    assert backend.process_state is ProcessState.STOPPED


async def test_upstream_errors_keep_their_meaning() -> None:
    backend = VllmBackend(fake_settings(max_model_len=64), hardware=NO_GPU)
    async with running(backend):
        with pytest.raises(ContextWindowExceededError, match="maximum context length is 64"):
            await collect(backend, chat("short", max_tokens=100))
        with pytest.raises(UnsupportedTaskError):
            await backend.embed(EmbeddingRequest(("x",), SERVED), RequestContext())


async def test_a_streamed_chat_and_a_completion_through_the_backend_manager() -> None:
    manager = BackendManager(ManagerSettings(health_check_interval_s=0.2), ModelCatalog())
    backend = VllmBackend(fake_settings(), hardware=NO_GPU)
    manager.register(backend)
    assert backend.backend_type is BackendType.GPU
    async with trio.open_nursery() as nursery:
        with trio.fail_after(15):
            await nursery.start(manager.run)
            await backend.wait_until(ProcessState.READY)
            ctx = RequestContext()
            chunks: list[GenerationChunk] = []
            async with aclosing(manager.stream(chat("hello big wide world"), ctx)) as stream:
                async for chunk in stream:
                    chunks.append(chunk)
            assert [c.text for c in chunks[:-1]] == ["hello", " big", " wide", " world"]
            final = chunks[-1]
            assert final.finish_reason == "stop"
            assert final.usage is not None
            assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (8, 4)  # 4 words + 4 template
            assert ctx.served_by == "vllm"
            completion = CompletionRequest("one two three four", SERVED, GenerationParams(max_tokens=2))
            result = await manager.generate(completion, RequestContext())
            assert (result.text, result.finish_reason, result.backend_id) == ("one two", "length", "vllm")
            report = manager.status_report()["backends"]
            assert isinstance(report, list) and report[0]["status"] == "healthy"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("host", "base_url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("::1", "http://[::1]:8000"),
        ("gpu-box.lan", "http://gpu-box.lan:8000"),
    ],
)
def test_the_server_is_reached_over_loopback_when_it_binds_a_wildcard(host: str, base_url: str) -> None:
    assert VllmBackend(VllmSettings(model="m", host=host, port=8000)).base_url == base_url
