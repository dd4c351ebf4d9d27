"""The manager's dispatch rules, against in-process backends with scripted behaviour.

These are not mocks of inference: they are real `Backend` implementations whose
output is a fixed token script, so routing, accounting and failure handling can be
observed exactly (the autojump clock makes their delays free).
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator
from contextlib import aclosing

import pytest
import trio
import trio.lowlevel
import trio.testing

from backends.base import Backend
from backends.catalog import ModelCatalog
from backends.errors import (
    BackendFailedError,
    BackendUnavailableError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    ShuttingDownError,
)
from backends.manager import BackendManager, ManagerSettings
from backends.strategies import Strategy
from backends.types import (
    BackendStatus,
    BackendType,
    Capabilities,
    ChatRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationParams,
    GenerationRequest,
    Message,
    ModelCard,
    RequestContext,
    Task,
    Usage,
)


class ScriptedBackend(Backend):
    backend_type = BackendType.API

    def __init__(
        self,
        backend_id: str,
        tokens: list[str] | None = None,
        *,
        delay: float = 0.1,
        token_delay: float | None = None,
        fail_before_output: BaseException | None = None,
        fail_after: int | None = None,
    ) -> None:
        super().__init__(backend_id)
        self.tokens = tokens or ["Hel", "lo", "!"]
        self.delay = delay
        self.token_delay = delay if token_delay is None else token_delay
        self.fail_before_output = fail_before_output
        self.fail_after = fail_after
        self.calls = 0
        self.closed_streams = 0
        self.status = BackendStatus.HEALTHY

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            tasks=frozenset({Task.CHAT, Task.EMBEDDING}),
            models=(ModelCard("m", Task.CHAT), ModelCard("m", Task.EMBEDDING)),
        )

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        self.calls += 1
        try:
            await trio.sleep(self.delay)
            if self.fail_before_output is not None:
                raise self.fail_before_output
            for i, token in enumerate(self.tokens):
                if self.fail_after is not None and i == self.fail_after:
                    raise BackendFailedError(f"{self.id} broke mid-stream")
                yield GenerationChunk(token)
                await trio.sleep(self.token_delay)
            yield GenerationChunk("", finish_reason="stop", usage=Usage(3, len(self.tokens)))
        finally:
            self.closed_streams += 1

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        self.calls += 1
        await trio.sleep(self.delay)
        if self.fail_before_output is not None:
            raise self.fail_before_output
        return EmbeddingResult(vectors=((1.0, 0.0),) * len(request.inputs), usage=Usage(len(request.inputs)))


def chat(max_tokens: int = 8) -> ChatRequest:
    return ChatRequest((Message("user", "hi"),), "m", GenerationParams(max_tokens=max_tokens))


def manager_with(*backends: Backend, **settings: object) -> BackendManager:
    manager = BackendManager(
        ManagerSettings(**settings),  # type: ignore[arg-type]
        ModelCatalog(defaults={Task.CHAT: "m"}, aliases={"alias-of-m": "m"}),
        rng=random.Random(7),
    )
    for backend in backends:
        manager.register(backend)
    return manager


async def test_generate_concatenates_the_stream_and_reports_usage(autojump_clock: trio.abc.Clock) -> None:
    manager = manager_with(ScriptedBackend("a"))
    result = await manager.generate(chat(), RequestContext())
    assert result.text == "Hello!"
    assert result.usage == Usage(3, 3)
    assert result.backend_id == "a"


async def test_in_flight_is_held_for_the_whole_stream_and_released_after(autojump_clock: trio.abc.Clock) -> None:
    backend = ScriptedBackend("a")
    manager = manager_with(backend)
    seen: list[int] = []
    async with aclosing(manager.stream(chat(), RequestContext())) as chunks:
        async for _ in chunks:
            seen.append(backend.metrics.in_flight)
    assert seen and all(n == 1 for n in seen)
    assert backend.metrics.in_flight == 0
    assert manager.pending == 0
    assert backend.metrics.requests_ok == 1


async def test_client_abandoning_a_stream_releases_its_slot_and_closes_the_backend_stream(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = ScriptedBackend("a", tokens=["x"] * 50)
    manager = manager_with(backend)
    async with aclosing(manager.stream(chat(), RequestContext())) as chunks:
        async for _ in chunks:
            break
    assert backend.metrics.in_flight == 0
    assert backend.closed_streams == 1
    assert backend.metrics.requests_failed == 0  # a client leaving is not the backend's fault


async def test_cancelled_caller_releases_its_slot(autojump_clock: trio.abc.Clock) -> None:
    backend = ScriptedBackend("a", tokens=["x"] * 50)
    manager = manager_with(backend)
    with trio.move_on_after(1.0):
        async with aclosing(manager.stream(chat(), RequestContext())) as chunks:
            async for _ in chunks:
                pass
    assert backend.metrics.in_flight == 0
    assert manager.pending == 0


async def test_failure_before_first_token_is_retried_on_another_backend(autojump_clock: trio.abc.Clock) -> None:
    broken = ScriptedBackend("broken", fail_before_output=BackendFailedError("connection refused"))
    healthy = ScriptedBackend("healthy")
    manager = manager_with(broken, healthy, strategy=Strategy.ROUND_ROBIN)
    result = await manager.generate(chat(), RequestContext())
    assert result.text == "Hello!"
    assert result.backend_id == "healthy"
    assert broken.calls == 1
    assert broken.metrics.requests_failed == 1
    assert broken.metrics.in_flight == 0


async def test_failure_after_output_is_not_retried(autojump_clock: trio.abc.Clock) -> None:
    flaky = ScriptedBackend("flaky", fail_after=1)
    other = ScriptedBackend("other")
    manager = manager_with(flaky, other, strategy=Strategy.ROUND_ROBIN)
    received: list[str] = []
    with pytest.raises(BackendFailedError):
        async with aclosing(manager.stream(chat(), RequestContext())) as chunks:
            async for chunk in chunks:
                received.append(chunk.text)
    assert received == ["Hel"]
    assert other.calls == 0


async def test_input_errors_are_never_retried_elsewhere(autojump_clock: trio.abc.Clock) -> None:
    picky = ScriptedBackend("picky", fail_before_output=InvalidRequestError("prompt too odd"))
    other = ScriptedBackend("other")
    manager = manager_with(picky, other, strategy=Strategy.ROUND_ROBIN)
    with pytest.raises(InvalidRequestError):
        await manager.generate(chat(), RequestContext())
    assert other.calls == 0
    assert picky.metrics.requests_failed == 0


async def test_deadline_cuts_a_slow_stream_with_a_clear_error(autojump_clock: trio.abc.Clock) -> None:
    slow = ScriptedBackend("slow", tokens=["x"] * 100, delay=1.0)
    manager = manager_with(slow)
    ctx = RequestContext(deadline=trio.current_time() + 5.5)
    with pytest.raises(DeadlineExceededError):
        await manager.generate(chat(), ctx)
    assert slow.metrics.in_flight == 0
    assert slow.closed_streams == 1


async def test_deadline_applies_to_one_shot_calls(autojump_clock: trio.abc.Clock) -> None:
    slow = ScriptedBackend("slow", delay=10.0)
    manager = manager_with(slow)
    with pytest.raises(DeadlineExceededError):
        await manager.embed(EmbeddingRequest(("a",), "m"), RequestContext(deadline=trio.current_time() + 1))
    assert slow.metrics.in_flight == 0


async def test_requests_beyond_the_pending_limit_are_refused_as_overload(autojump_clock: trio.abc.Clock) -> None:
    backend = ScriptedBackend("a", delay=1.0)
    manager = manager_with(backend, max_pending_requests=2)
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await manager.generate(chat(), RequestContext())
            outcomes.append("ok")
        except OverloadedError as exc:
            assert exc.retry_after_s > 0
            outcomes.append("overloaded")

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    assert sorted(outcomes) == ["ok", "ok", "overloaded", "overloaded"]
    assert manager.pending == 0


async def test_unknown_model_is_reported_with_what_is_available() -> None:
    manager = manager_with(ScriptedBackend("a"))
    with pytest.raises(ModelNotFoundError) as info:
        manager.resolve_model(Task.CHAT, "gpt-9")
    assert "gpt-9" in info.value.message and "m" in info.value.message


async def test_missing_model_uses_the_default_and_aliases_resolve() -> None:
    manager = manager_with(ScriptedBackend("a"))
    assert manager.resolve_model(Task.CHAT, None) == "m"
    assert manager.resolve_model(Task.CHAT, "alias-of-m") == "m"


async def test_least_loaded_spreads_concurrent_streams(autojump_clock: trio.abc.Clock) -> None:
    backends = [ScriptedBackend(name, delay=1.0) for name in ("a", "b", "c")]
    manager = manager_with(*backends, strategy=Strategy.LEAST_LOADED)
    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(manager.generate, chat(), RequestContext())
            await trio.lowlevel.checkpoint()
    assert [b.calls for b in backends] == [2, 2, 2]


async def test_round_robin_cycles_through_backends(autojump_clock: trio.abc.Clock) -> None:
    backends = [ScriptedBackend(name) for name in ("a", "b")]
    manager = manager_with(*backends, strategy=Strategy.ROUND_ROBIN)
    served = [(await manager.generate(chat(), RequestContext())).backend_id for _ in range(4)]
    assert served == ["a", "b", "a", "b"]


async def test_unhealthy_backends_are_skipped_but_tried_when_nothing_else_is_left(
    autojump_clock: trio.abc.Clock,
) -> None:
    down = ScriptedBackend("down")
    up = ScriptedBackend("up")
    down.status = BackendStatus.UNHEALTHY
    manager = manager_with(down, up, strategy=Strategy.ROUND_ROBIN)
    assert {(await manager.generate(chat(), RequestContext())).backend_id for _ in range(3)} == {"up"}
    up.status = BackendStatus.OFFLINE
    assert (await manager.generate(chat(), RequestContext())).backend_id in {"up", "down"}


async def test_no_backend_for_a_task_is_a_clear_unavailable_error() -> None:
    manager = manager_with()
    with pytest.raises(BackendUnavailableError):
        manager.select(Task.CHAT, "m")


async def test_after_stop_accepting_new_requests_are_refused_and_idle_is_signalled(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = ScriptedBackend("a", delay=1.0)
    manager = manager_with(backend)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.generate, chat(), RequestContext())
        await trio.sleep(0.5)
        manager.stop_accepting()
        with pytest.raises(ShuttingDownError):
            await manager.generate(chat(), RequestContext())
        with trio.fail_after(30):
            await manager.wait_idle()
    assert backend.metrics.requests_ok == 1


async def test_fallback_tier_serves_only_when_the_preferred_tier_fails() -> None:
    primary = ScriptedBackend("primary", ["p"], fail_before_output=BackendUnavailableError("primary down"))
    fallback = ScriptedBackend("fallback", ["f"])
    fallback.priority = 1
    manager = manager_with(primary, fallback)
    result = await manager.generate(chat(), RequestContext())
    assert (result.backend_id, result.text) == ("fallback", "f")
    assert primary.calls == 1
    primary.fail_before_output = None
    assert {(await manager.generate(chat(), RequestContext())).backend_id for _ in range(5)} == {"primary"}
    assert fallback.calls == 1


async def test_a_stream_still_running_after_the_drain_period_fails_as_shutting_down(
    autojump_clock: trio.abc.Clock,
) -> None:
    quick = ScriptedBackend("quick", ["a", "b"], delay=1.0)
    slow = ScriptedBackend("slow", ["x"] * 100, delay=1.0)
    outcomes: dict[str, object] = {}

    async def consume(manager: BackendManager, name: str) -> None:
        try:
            outcomes[name] = (await manager.generate(chat(), RequestContext())).text
        except ShuttingDownError as exc:
            outcomes[name] = exc

    quick_manager, slow_manager = manager_with(quick), manager_with(slow)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume, quick_manager, "quick")
        nursery.start_soon(consume, slow_manager, "slow")
        await trio.sleep(0.5)
        quick_manager.stop_accepting(drain_s=10)
        slow_manager.stop_accepting(drain_s=10)
        started = trio.current_time()
        with trio.fail_after(30):
            await slow_manager.wait_idle()
        assert trio.current_time() - started == pytest.approx(10, abs=0.01)
    assert outcomes["quick"] == "ab"
    assert isinstance(outcomes["slow"], ShuttingDownError)
    assert slow.metrics.requests_failed == 0  # the node left, the backend did nothing wrong


async def test_health_checks_update_status_and_a_hanging_probe_counts_as_unhealthy(
    autojump_clock: trio.abc.Clock,
) -> None:
    class Hanging(ScriptedBackend):
        async def check_health(self) -> BackendStatus:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    hanging = Hanging("hanging")
    manager = manager_with(hanging, health_check_timeout_s=2.0)
    await manager.check_all()
    assert hanging.status is BackendStatus.UNHEALTHY
    assert "timed out" in hanging.status_detail


async def test_manager_runs_backends_and_stops_them_when_cancelled(autojump_clock: trio.abc.Clock) -> None:
    events: list[str] = []

    class Lifecycle(ScriptedBackend):
        async def start(self) -> None:
            events.append("start")

        async def aclose(self) -> None:
            events.append("close")

    manager = manager_with(Lifecycle("a"))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        late = Lifecycle("late")
        await manager.add(late)
        assert events == ["start", "start"]
        nursery.cancel_scope.cancel()
    assert events == ["start", "start", "close", "close"]


async def test_status_report_shows_metrics_per_backend(autojump_clock: trio.abc.Clock) -> None:
    manager = manager_with(ScriptedBackend("a"))
    await manager.generate(chat(), RequestContext())
    report = manager.status_report()
    (entry,) = report["backends"]  # type: ignore[misc]
    assert entry["id"] == "a"
    assert entry["metrics"]["requests_ok"] == 1
    assert entry["metrics"]["ttft_ewma_ms"] is not None
    assert entry["capabilities"]["tasks"] == ["chat", "embedding"]


class Loadable(ScriptedBackend):
    def __init__(self, backend_id: str) -> None:
        super().__init__(backend_id)
        self.loaded: list[str] = []

    async def load_model(self, model: str) -> None:
        self.loaded.append(model)


async def test_load_model_skips_backends_that_manage_their_own_memory() -> None:
    from backends.errors import UnsupportedTaskError

    remote, local = ScriptedBackend("remote"), Loadable("local")
    assert await manager_with(remote, local).load_model("alias-of-m") == ["local"]
    assert local.loaded == ["m"]
    with pytest.raises(UnsupportedTaskError):
        await manager_with(ScriptedBackend("only-remote")).load_model("m")
