"""The thread batcher gathers concurrent callers into one blocking call."""

from __future__ import annotations

import threading

import pytest
import trio

from backends.errors import BackendFailedError, ShuttingDownError
from backends.local._batcher import ThreadBatcher


async def test_concurrent_submissions_share_one_call_and_get_their_own_results() -> None:
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [x * x for x in items]

    batcher = ThreadBatcher(square, max_items=64, wait_s=0.05, name="square")
    results: dict[int, list[int]] = {}

    async def submit(i: int) -> None:
        results[i] = await batcher.submit([i, i + 100])

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as clients:
            for i in range(5):
                clients.start_soon(submit, i)
        nursery.cancel_scope.cancel()
    assert results == {i: [i * i, (i + 100) ** 2] for i in range(5)}
    assert len(calls) == 1 and len(calls[0]) == 10
    assert batcher.stats.max_batch_items == 10


async def test_batches_never_exceed_max_items_unless_one_request_is_larger() -> None:
    sizes: list[int] = []

    def identity(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return items

    batcher = ThreadBatcher(identity, max_items=4, wait_s=0.05, name="identity")
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as clients:
            for _ in range(6):
                clients.start_soon(batcher.submit, [1, 2])
        assert await batcher.submit(list(range(10))) == list(range(10))
        nursery.cancel_scope.cancel()
    assert sizes[:-1] and all(size <= 4 for size in sizes[:-1])
    assert sizes[-1] == 10


async def test_a_failing_batch_fails_its_callers_and_the_batcher_keeps_serving() -> None:
    fail = threading.Event()
    fail.set()

    def flaky(items: list[int]) -> list[int]:
        if fail.is_set():
            fail.clear()
            raise RuntimeError("out of memory")
        return items

    batcher = ThreadBatcher(flaky, max_items=8, wait_s=0, name="flaky")
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        with pytest.raises(BackendFailedError, match="out of memory"):
            await batcher.submit([1])
        assert await batcher.submit([2]) == [2]
        nursery.cancel_scope.cancel()


async def test_shutdown_fails_waiting_callers_instead_of_leaving_them_hanging() -> None:
    release = threading.Event()

    def blocked(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    batcher = ThreadBatcher(blocked, max_items=1, wait_s=0, name="blocked")
    outcomes: list[str] = []

    async def waiter(item: int) -> None:
        try:
            await batcher.submit([item])
            outcomes.append("ok")
        except ShuttingDownError:
            outcomes.append("refused")

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            outer.start_soon(waiter, 1)
            outer.start_soon(waiter, 2)
            await trio.sleep(0.2)
            release.set()
            nursery.cancel_scope.cancel()
    assert sorted(outcomes) == ["ok", "refused"]
    with pytest.raises(ShuttingDownError):
        await batcher.submit([3])
