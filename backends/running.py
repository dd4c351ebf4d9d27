"""A backend's own task, kept running: one that fails after it started is restarted with
backoff instead of taking the node (and every other backend) down with it.

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
