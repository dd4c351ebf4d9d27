"""Lazy backends: started by the first request, stopped when idle, started again on demand."""

from __future__ import annotations

import pytest
import trio

from backends.errors import BackendUnavailableError
from backends.lifecycle import LazyBackend
from backends.types import BackendStatus, RequestContext
from tests.backends.test_manager import ScriptedBackend, chat, manager_with


class ExpensiveBackend(ScriptedBackend):
    """Takes a while to start (like a vLLM server loading weights) and records its runs."""

    def __init__(self, backend_id: str, start_delay: float = 20.0, fail_start: str | None = None) -> None:
        super().__init__(backend_id)
        self.start_delay = start_delay
        self.fail_start = fail_start
        self.runs = 0
        self.stops = 0
        self.running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        await trio.sleep(self.start_delay)
        if self.fail_start:
            raise RuntimeError(self.fail_start)
        self.running = True
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.running = False
            self.stops += 1


async def test_first_request_starts_the_backend_and_waits_for_it(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    inner = ExpensiveBackend("gpu", start_delay=20)
    lazy = LazyBackend(inner, idle_timeout_s=300)
    manager = manager_with(lazy)
    await nursery.start(manager.run)
    assert inner.runs == 0 and lazy.status.routable
    started = trio.current_time()
    results = []

    async def ask() -> None:
        results.append(await manager.generate(chat(), RequestContext()))

    async with trio.open_nursery() as requests:
        for _ in range(3):
            requests.start_soon(ask)
    assert inner.runs == 1  # concurrent first requests share one start
    assert [r.text for r in results] == ["Hello!"] * 3
    assert trio.current_time() - started >= 20
    assert lazy.describe()["lifecycle"]["running"] is True  # type: ignore[index]


async def test_idle_backend_is_stopped_and_started_again_on_demand(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    inner = ExpensiveBackend("gpu", start_delay=5)
    lazy = LazyBackend(inner, idle_timeout_s=300)
    manager = manager_with(lazy)
    await nursery.start(manager.run)
    await manager.generate(chat(), RequestContext())
    await trio.sleep(299)
    assert inner.running
    await trio.sleep(2)
    assert not inner.running and inner.stops == 1
    assert lazy.status == BackendStatus.UNKNOWN and lazy.status.routable
    assert (await manager.generate(chat(), RequestContext())).text == "Hello!"
    assert inner.runs == 2 and inner.running


async def test_a_long_stream_keeps_the_backend_alive_past_the_idle_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    inner = ExpensiveBackend("gpu", start_delay=1)
    inner.tokens = ["x"] * 100
    inner.delay = 5.0  # 500 s of streaming
    lazy = LazyBackend(inner, idle_timeout_s=60)
    manager = manager_with(lazy)
    await nursery.start(manager.run)
    result = await manager.generate(chat(), RequestContext(deadline=trio.current_time() + 10_000))
    assert len(result.text) == 100
    assert inner.stops == 0


async def test_a_failed_start_is_a_clear_error_and_the_next_request_tries_again(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    inner = ExpensiveBackend("gpu", start_delay=1, fail_start="CUDA out of memory")
    lazy = LazyBackend(inner)
    manager = manager_with(lazy)
    await nursery.start(manager.run)
    with pytest.raises(BackendUnavailableError, match="could not be started: CUDA out of memory"):
        await manager.generate(chat(), RequestContext())
    assert "CUDA out of memory" in lazy.status_detail
    inner.fail_start = None
    assert (await manager.generate(chat(), RequestContext())).text == "Hello!"
    assert inner.runs == 2


async def test_a_start_that_takes_too_long_fails_within_the_bound(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    inner = ExpensiveBackend("gpu", start_delay=10_000)
    lazy = LazyBackend(inner, start_timeout_s=60)
    manager = manager_with(lazy)
    await nursery.start(manager.run)
    started = trio.current_time()
    with pytest.raises(BackendUnavailableError, match="within 60s"):
        await manager.generate(chat(), RequestContext(deadline=trio.current_time() + 10_000))
    assert trio.current_time() - started == pytest.approx(60, abs=1)
