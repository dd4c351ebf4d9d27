"""A backend's task is kept running: a bug in one backend never stops the node."""

from __future__ import annotations

import pytest
import trio

from backends.base import Backend
from backends.running import run_restarting
from backends.types import BackendStatus, BackendType, Capabilities


class Crashing(Backend):
    """Starts, then raises after `crash_after_s`; the `runs`-th run and later stay up."""

    backend_type = BackendType.API

    def __init__(self, crashes: int, *, before_start: bool = False) -> None:
        super().__init__("crashing")
        self.crashes = crashes
        self.before_start = before_start
        self.runs = 0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(tasks=frozenset(), models=())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        if self.before_start:
            raise ValueError("bad configuration")
        self.status = BackendStatus.HEALTHY
        task_status.started()
        if self.runs <= self.crashes:
            await trio.sleep(1)
            raise KeyError("a bug")
        await trio.sleep_forever()


async def test_a_backend_that_crashes_after_starting_is_restarted_with_backoff(autojump_clock: trio.abc.Clock) -> None:
    backend = Crashing(crashes=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_restarting, backend)
        await trio.sleep(1.5)  # crashed once, waiting out its first backoff
        assert backend.status is BackendStatus.UNHEALTHY
        assert "KeyError" in backend.status_detail and backend.runs == 1
        await trio.sleep(1 + 1 + 2 + 1 + 4)  # three crashes, backoffs of 1, 2 and 4 s
        assert backend.runs == 4
        assert backend.status is BackendStatus.HEALTHY
        nursery.cancel_scope.cancel()


async def test_a_backend_that_fails_to_start_raises(autojump_clock: trio.abc.Clock) -> None:
    backend = Crashing(crashes=0, before_start=True)
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="bad configuration")):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_restarting, backend)
    assert backend.runs == 1
