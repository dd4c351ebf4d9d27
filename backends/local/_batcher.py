"""Dynamic batching for one-shot work (embeddings, rerank scoring) under trio.

Concurrent callers' items are gathered into one call of a blocking function that runs
on a worker thread. Whatever is queued when the worker frees up goes in the next batch,
and an idle batcher waits up to `wait_s` for company before it starts, as seed 004's
MAX_BATCH_SIZE / BATCH_TIMEOUT_MS describe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from backends.errors import BackendFailedError, ShuttingDownError

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Job(Generic[In, Out]):
    items: Sequence[In]
    done: trio.Event = field(default_factory=trio.Event)
    result: list[Out] | None = None
    error: BaseException | None = None
    abandoned: bool = False


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    max_batch_items: int = 0
    last_batch_items: int = 0
    queued_jobs: int = 0


class ThreadBatcher(Generic[In, Out]):
    def __init__(
        self,
        fn: Callable[[list[In]], list[Out]],
        *,
        max_items: int,
        wait_s: float,
        name: str,
    ) -> None:
        self._fn = fn
        self._max_items = max(1, max_items)
        self._wait_s = max(0.0, wait_s)
        self.name = name
        self.stats = BatcherStats()
        self._send, self._receive = trio.open_memory_channel[_Job[In, Out]](math.inf)
        self._closed = False

    async def submit(self, items: Sequence[In]) -> list[Out]:
        """Returns one output per item, in order. Raises what the batch function raised."""
        if self._closed:
            raise ShuttingDownError(f"{self.name} is shut down")
        if not items:
            return []
        job: _Job[In, Out] = _Job(items)
        self._send.send_nowait(job)
        self.stats.queued_jobs += 1
        try:
            await job.done.wait()
        except BaseException:
            job.abandoned = True  # its items are skipped if the batch has not started yet
            raise
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        batch: list[_Job[In, Out]] = []
        try:
            while True:
                batch = []
                await self._collect(batch)
                await self._execute(batch)
        finally:
            self._closed = True
            self._fail(batch)
            self._fail_queued()

    async def _collect(self, batch: list[_Job[In, Out]]) -> None:
        batch.append(await self._receive.receive())
        count = len(batch[0].items)
        with trio.move_on_after(self._wait_s):
            while count < self._max_items:
                job = await self._receive.receive()
                batch.append(job)
                count += len(job.items)
        # Anything that arrived meanwhile and still fits rides along at no extra wait.
        while count < self._max_items:
            try:
                job = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            batch.append(job)
            count += len(job.items)

    async def _execute(self, batch: list[_Job[In, Out]]) -> None:
        self.stats.queued_jobs -= len(batch)
        live = [job for job in batch if not job.abandoned]
        items = [item for job in live for item in job.items]
        if not items:
            return
        try:
            # Shielded: a batch in a worker thread cannot be interrupted, so shutdown waits
            # for it (bounded by one batch) rather than abandoning the callers' results.
            with trio.CancelScope(shield=True):
                outputs = await trio.to_thread.run_sync(self._fn, items)
        except Exception as exc:
            error = BackendFailedError(f"{self.name} failed: {exc}")
            for job in live:
                job.error = error
                job.done.set()
            return
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.last_batch_items = len(items)
        self.stats.max_batch_items = max(self.stats.max_batch_items, len(items))
        offset = 0
        for job in live:
            job.result = outputs[offset : offset + len(job.items)]
            offset += len(job.items)
            job.done.set()

    def _fail_queued(self) -> None:
        leftovers: list[_Job[In, Out]] = []
        while True:
            try:
                leftovers.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._fail(leftovers)

    def _fail(self, jobs: list[_Job[In, Out]]) -> None:
        for job in jobs:
            if not job.done.is_set():
                job.error = ShuttingDownError(f"{self.name} shut down before the request ran")
                job.done.set()
