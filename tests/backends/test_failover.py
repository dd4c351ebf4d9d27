"""Failover mid-answer: another backend continues after what the client already saw."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

import pytest
import trio

from backends.errors import BackendFailedError, BackendUnavailableError, InvalidRequestError
from backends.types import (
    Capabilities,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    RequestContext,
    Task,
    Usage,
)
from tests.backends.test_manager import ScriptedBackend, chat, manager_with

WORDS = [f"w{i} " for i in range(10)]


class Counting(ScriptedBackend):
    """Generates WORDS (ids 0..9) from wherever the request's continuation says to start."""

    def __init__(self, backend_id: str, break_after: int | None = None, error: Exception | None = None) -> None:
        super().__init__(backend_id, delay=0.01)
        self.break_after = break_after
        self.error = error or BackendUnavailableError(f"{backend_id} died")
        self.requests: list[GenerationRequest] = []

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(tasks=frozenset({Task.CHAT}), models=(ModelCard("m", Task.CHAT),), continuation=True)

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        self.requests.append(request)
        start = len(request.continuation.token_ids) if request.continuation else 0
        produced = 0
        for i in range(start, min(len(WORDS), start + request.params.max_tokens)):
            if self.break_after is not None and produced == self.break_after:
                raise self.error
            await trio.sleep(self.delay)
            produced += 1
            yield GenerationChunk(WORDS[i], token_ids=(i,))
        prompt = 3 + start
        reason = "length" if start + produced < len(WORDS) else "stop"
        yield GenerationChunk("", finish_reason=reason, usage=Usage(prompt, produced))


async def collect(manager: object, max_tokens: int = 10) -> list[GenerationChunk]:
    async with aclosing(manager.stream(chat(max_tokens), RequestContext())) as chunks:  # type: ignore[attr-defined]
        return [c async for c in chunks]


async def test_a_backend_dying_mid_stream_is_continued_elsewhere_without_loss_or_repeat(
    autojump_clock: trio.abc.Clock,
) -> None:
    dying = Counting("dying", break_after=4)
    spare = Counting("spare")
    spare.priority = 1  # only used when the first one fails
    manager = manager_with(dying, spare)
    chunks = await collect(manager)
    assert "".join(c.text for c in chunks) == "".join(WORDS)
    continuation = spare.requests[0].continuation
    assert continuation is not None
    assert continuation.text == "".join(WORDS[:4]) and continuation.token_ids == (0, 1, 2, 3)
    assert spare.requests[0].params.max_tokens == 6
    assert chunks[-1].usage == Usage(3, 10)  # one answer's usage, as if nothing happened
    assert dying.metrics.requests_failed == 1


async def test_failover_only_goes_to_backends_that_can_continue(autojump_clock: trio.abc.Clock) -> None:
    dying = Counting("dying", break_after=2)
    plain = ScriptedBackend("plain", tokens=["should", "not", "appear"])  # can't take a continuation
    plain.priority = 1
    manager = manager_with(dying, plain)
    with pytest.raises(BackendUnavailableError, match="dying died"):
        await collect(manager)
    assert plain.calls == 0


async def test_input_errors_mid_stream_are_not_failed_over(autojump_clock: trio.abc.Clock) -> None:
    dying = Counting("dying", break_after=2, error=InvalidRequestError("bad stop sequence"))
    spare = Counting("spare")
    spare.priority = 1
    manager = manager_with(dying, spare)
    with pytest.raises(InvalidRequestError):
        await collect(manager)
    assert spare.requests == []


async def test_chained_failures_continue_on_the_next_backend_each_time(autojump_clock: trio.abc.Clock) -> None:
    first = Counting("first", break_after=3, error=BackendFailedError("boom"))
    second = Counting("second", break_after=3)
    third = Counting("third")
    second.priority, third.priority = 1, 2
    manager = manager_with(first, second, third, max_attempts=3)
    chunks = await collect(manager)
    assert "".join(c.text for c in chunks) == "".join(WORDS)
    assert third.requests[0].continuation is not None
    assert third.requests[0].continuation.token_ids == tuple(range(6))
