"""Circuit breaking, retry classification and backoff: the pure pieces, then the manager
using them against scripted backends (autojump clock: cooldowns cost no real time)."""

from __future__ import annotations

import random

import pytest
import trio

from backends.errors import (
    BackendFailedError,
    BackendUnavailableError,
    ContextWindowExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    ShuttingDownError,
    UnsupportedTaskError,
)
from backends.resilience import CircuitBreaker, backoff_s, may_retry
from backends.strategies import Strategy
from backends.types import Capabilities, ModelCard, RequestContext, Task
from tests.backends.test_manager import ScriptedBackend, chat, manager_with


def test_breaker_opens_after_the_threshold_and_cooldowns_double_until_a_success() -> None:
    breaker = CircuitBreaker(failure_threshold=3, base_cooldown_s=5, max_cooldown_s=12)
    assert not breaker.record_failure(0) and not breaker.record_failure(0)
    assert breaker.record_failure(0) and breaker.is_open(4.9) and not breaker.is_open(5.0)
    # Back from a cooldown without a success: one failure re-opens it, for longer.
    assert breaker.record_failure(6) and breaker.open_until == 16
    assert breaker.record_failure(17) and breaker.open_until == 17 + 12  # capped
    breaker.record_success()
    assert not breaker.record_failure(30) and not breaker.record_failure(30)


def test_breaker_hold_keeps_traffic_away_without_a_trip() -> None:
    breaker = CircuitBreaker()
    breaker.hold(7.0)
    assert breaker.is_open(6.9) and not breaker.is_open(7.0) and breaker.trips == 0


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (BackendUnavailableError("down"), True),
        (BackendFailedError("500"), True),
        (OverloadedError("429", retry_after_s=3), True),
        (ContextWindowExceededError("too long"), True),
        (InvalidRequestError("bad temperature"), False),
        (ModelNotFoundError("no such model"), False),
        (UnsupportedTaskError("no embeddings"), False),
        (ShuttingDownError("bye"), False),
        (RuntimeError("adapter bug"), False),
    ],
)
def test_only_failures_another_backend_could_fix_are_retried(error: Exception, retry: bool) -> None:
    assert may_retry(error, emitted=False, attempts=1, max_attempts=3) is retry
    assert not may_retry(error, emitted=True, attempts=1, max_attempts=3)
    assert not may_retry(error, emitted=False, attempts=3, max_attempts=3)


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(1, 10):
        delays = [backoff_s(attempt, rng, base_s=0.05, cap_s=1.0) for _ in range(200)]
        assert all(0 <= d <= min(1.0, 0.05 * 2 ** (attempt - 1)) for d in delays)
        assert len(set(delays)) > 100


class WindowedBackend(ScriptedBackend):
    def __init__(self, backend_id: str, window: int, **kwargs: object) -> None:
        super().__init__(backend_id, **kwargs)  # type: ignore[arg-type]
        self.window = window

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            tasks=frozenset({Task.CHAT}), models=(ModelCard("m", Task.CHAT, context_window=self.window),)
        )


async def test_repeatedly_failing_backend_is_ejected_then_probed_again_after_cooldown(
    autojump_clock: trio.abc.Clock,
) -> None:
    flaky = ScriptedBackend("flaky", fail_before_output=BackendFailedError("500"))
    steady = ScriptedBackend("steady")
    manager = manager_with(flaky, steady, failure_threshold=2, base_cooldown_s=60, max_attempts=2)
    served = [(await manager.generate(chat(), RequestContext())).backend_id for _ in range(20)]
    assert served == ["steady"] * 20  # failures before output were retried on steady
    assert flaky.calls == 2  # then the breaker kept traffic away
    assert manager.status_report()["backends"][0]["circuit"]["open"] is True  # type: ignore[index]
    await trio.sleep(61)
    flaky.fail_before_output = None
    served = [(await manager.generate(chat(), RequestContext())).backend_id for _ in range(20)]
    assert "flaky" in served


async def test_when_every_backend_is_ejected_they_are_tried_anyway(autojump_clock: trio.abc.Clock) -> None:
    only = ScriptedBackend("only", fail_before_output=BackendFailedError("500"))
    manager = manager_with(only, failure_threshold=1, base_cooldown_s=600)
    with pytest.raises(BackendFailedError):
        await manager.generate(chat(), RequestContext())
    only.fail_before_output = None
    assert (await manager.generate(chat(), RequestContext())).backend_id == "only"


async def test_context_window_overflow_moves_to_a_backend_with_a_larger_window(autojump_clock: trio.abc.Clock) -> None:
    small = WindowedBackend("small", 512, fail_before_output=ContextWindowExceededError("prompt too long"))
    tiny = WindowedBackend("tiny", 256)
    large = WindowedBackend("large", 8192)
    tiny.priority, large.priority = 1, 2  # fallbacks, but only the large one can take this prompt
    manager = manager_with(small, tiny, large, max_attempts=3)
    result = await manager.generate(chat(), RequestContext())
    assert result.backend_id == "large"
    assert (small.calls, tiny.calls) == (1, 0)
    assert small.metrics.requests_failed == 0  # the input's fault, not the backend's


async def test_context_window_overflow_with_no_larger_backend_is_the_original_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    small = WindowedBackend("small", 512, fail_before_output=ContextWindowExceededError("prompt too long"))
    same = WindowedBackend("same", 512)
    same.priority = 1
    manager = manager_with(small, same)
    with pytest.raises(ContextWindowExceededError, match="prompt too long"):
        await manager.generate(chat(), RequestContext())
    assert same.calls == 0


async def test_upstream_rate_limit_is_retried_elsewhere_and_honoured(autojump_clock: trio.abc.Clock) -> None:
    limited = ScriptedBackend("limited", fail_before_output=OverloadedError("429", retry_after_s=30))
    other = ScriptedBackend("other")
    manager = manager_with(limited, other, strategy=Strategy.ROUND_ROBIN)
    assert (await manager.generate(chat(), RequestContext())).backend_id == "other"
    limited.fail_before_output = None
    # For the Retry-After period the limited backend gets nothing, round-robin or not.
    served = {(await manager.generate(chat(), RequestContext())).backend_id for _ in range(6)}
    assert served == {"other"}
    await trio.sleep(30)
    served = {(await manager.generate(chat(), RequestContext())).backend_id for _ in range(6)}
    assert served == {"other", "limited"}
    assert limited.metrics.requests_failed == 0


async def test_rate_limit_everywhere_reaches_the_client_with_retry_after(autojump_clock: trio.abc.Clock) -> None:
    manager = manager_with(ScriptedBackend("a", fail_before_output=OverloadedError("429", retry_after_s=9)))
    with pytest.raises(OverloadedError) as caught:
        await manager.generate(chat(), RequestContext())
    assert caught.value.retry_after_s == 9


async def test_retries_wait_a_jittered_backoff_within_the_deadline(autojump_clock: trio.abc.Clock) -> None:
    down = ScriptedBackend("down", delay=0, fail_before_output=BackendUnavailableError("refused"))
    up = ScriptedBackend("up", delay=0)
    manager = manager_with(down, up, strategy=Strategy.ROUND_ROBIN)
    started = trio.current_time()
    assert (await manager.generate(chat(), RequestContext())).backend_id == "up"
    assert 0 < trio.current_time() - started <= 0.05
