"""A backend's own task, kept running: one that fails after it started is restarted with
backoff instead of taking the node (and every other backend) down with it. And its
active health check, which always ends in a verdict.

A backend that fails to *start* still raises: that is a configuration error the node
reports at start (an unreachable URL is not one: backends wait for those themselves)."""

from __future__ import annotations

import logging

import trio

from backends.base import Backend
from backends.types import BackendStatus

log = logging.getLogger(__name__)

MAX_RESTART_BACKOFF_S = 60.0


class _StartedOnce:
    """Passes the first `started()` on; a restarted run calls it again, harmlessly."""

    def __init__(self, task_status: trio.TaskStatus[None]) -> None:
        self._task_status = task_status
        self.done = False

    def started(self, value: None = None) -> None:
        if not self.done:
            self.done = True
            self._task_status.started()


async def run_restarting(
    backend: Backend,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    initial_backoff_s: float = 1.0,
) -> None:
    started = _StartedOnce(task_status)
    backoff = initial_backoff_s
    while True:
        try:
            await backend.run(task_status=started)
            return
        except Exception as exc:  # a bug in one backend must not stop the node
            if not started.done:
                raise
            log.exception("backend %s stopped on an internal error; restarting in %gs", backend.id, backoff)
            backend.status = BackendStatus.UNHEALTHY
            backend.status_detail = f"restarting after an internal error: {exc!r}"
        await trio.sleep(backoff)
        backoff = min(backoff * 2, MAX_RESTART_BACKOFF_S)


async def run_in_scope(backend: Backend, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]) -> None:
    """`run_restarting` under `scope`, which the manager cancels to remove the backend."""
    with scope:
        await run_restarting(backend, task_status=task_status)


async def probe_health(backend: Backend, timeout_s: float) -> None:
    """One active check; its verdict becomes `backend.status`. A probe that raises or takes
    longer than `timeout_s` is a verdict too (unhealthy, with the reason), not a crash."""
    with trio.move_on_after(timeout_s) as scope:
        try:
            status = await backend.check_health()
        except Exception as exc:
            backend.status_detail = f"health check failed: {exc}"
            status = BackendStatus.UNHEALTHY
    if scope.cancelled_caught:
        backend.status_detail = f"health check timed out after {timeout_s}s"
        status = BackendStatus.UNHEALTHY
    if status != backend.status:
        log.info("backend %s is now %s", backend.id, status.value)
    backend.status = status
