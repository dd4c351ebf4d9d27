"""Hedged first tokens: a late stream is raced against a second backend and the faster
answer kept, within a budget, with nothing left in flight."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import outcome
import pytest
import trio

from backends.base import Backend
from backends.errors import BackendFailedError, DeadlineExceededError
from backends.hedging import HedgeBudget, hedge_delay_s, race_first_chunk
from backends.manager import BackendManager
from backends.strategies import STALE_AFTER_S, Candidate, Strategy
from backends.types import BackendStatus, RequestContext
from tests.backends.test_manager import ScriptedBackend, chat, manager_with


def measured(backend_id: str, ttft_s: float | None, samples: int = 1, age_s: float = 0.0) -> Candidate:
    return Candidate(
        backend_id, in_flight=0, queue_size=0, ttft_s=ttft_s, samples=samples if ttft_s else 0, sample_age_s=age_s
    )


FAST, SLOW, NEW = measured("fast", 0.05), measured("slow", 0.2), measured("new", None)


def test_a_backend_is_hedged_when_later_than_its_own_record() -> None:
    assert hedge_delay_s(SLOW, [FAST, SLOW, NEW]) == pytest.approx(0.4)
    assert hedge_delay_s(FAST, [FAST, SLOW], factor=3) == pytest.approx(0.15)


def test_an_unmeasured_or_stale_backend_is_hedged_against_the_best() -> None:
    assert hedge_delay_s(NEW, [FAST, SLOW, NEW]) == pytest.approx(0.1)
    stale = measured("slow", 0.2, age_s=STALE_AFTER_S + 1)
    assert hedge_delay_s(stale, [FAST, stale]) == pytest.approx(0.1)


def test_no_hedge_without_a_second_candidate_or_any_measurement() -> None:
    assert hedge_delay_s(FAST, [FAST]) is None
    assert hedge_delay_s(NEW, [NEW, measured("other", None)]) is None


def test_the_budget_allows_about_its_ratio_of_requests_after_the_burst() -> None:
    budget = HedgeBudget(ratio=0.1, burst=2)
    spent = 0
    for _ in range(1000):
        budget.earn()
        spent += budget.spend()
    assert 100 <= spent <= 102
    never = HedgeBudget(ratio=0.0)
    never.earn()
    assert not never.spend()


async def tokens(delay: float, *items: str, fail: bool = False) -> AsyncGenerator[str, None]:
    await trio.sleep(delay)
    if fail:
        raise BackendFailedError("broke before output")
    for item in items:
        yield item


async def test_a_primary_that_answers_before_the_hedge_time_starts_no_hedge(autojump_clock: trio.abc.Clock) -> None:
    async def start_hedge() -> AsyncGenerator[str, None]:
        raise AssertionError("no hedge expected")

    race = await race_first_chunk(tokens(0.5, "a"), trio.current_time() + 1.0, start_hedge)
    assert race.first.unwrap() == "a" and race.hedge is None and not race.hedge_won


async def test_the_first_to_answer_wins_the_race(autojump_clock: trio.abc.Clock) -> None:
    hedge = tokens(0.5, "from the hedge")

    async def start_hedge() -> AsyncGenerator[str, None]:
        return hedge

    race = await race_first_chunk(tokens(5.0, "from the primary"), trio.current_time() + 1.0, start_hedge)
    assert race.hedge_won and race.winner is hedge and race.first.unwrap() == "from the hedge"


async def test_a_failure_does_not_win_while_the_other_may_still_answer(autojump_clock: trio.abc.Clock) -> None:
    async def start_hedge() -> AsyncGenerator[str, None]:
        return tokens(1.0, "from the hedge")

    race = await race_first_chunk(tokens(1.5, fail=True), trio.current_time() + 1.0, start_hedge)
    assert race.hedge_won and race.first.unwrap() == "from the hedge"

    async def failing_hedge() -> AsyncGenerator[str, None]:
        return tokens(0.1, fail=True)

    race = await race_first_chunk(tokens(3.0, "late but sure"), trio.current_time() + 1.0, failing_hedge)
    assert not race.hedge_won and race.first.unwrap() == "late but sure"
    both_fail = await race_first_chunk(tokens(2.0, fail=True), trio.current_time() + 1.0, failing_hedge)
    assert isinstance(both_fail.first, outcome.Error) and not both_fail.hedge_won


# ---- through the manager ---------------------------------------------------------------


async def hedging_manager(
    slow_delay: float, **settings: object
) -> tuple[BackendManager, ScriptedBackend, ScriptedBackend]:
    """`fast` measured by one request; `slow` registered after, unmeasured, so
    best_performance explores it with the next request."""
    fast = ScriptedBackend("fast", delay=0.1)
    slow = ScriptedBackend("slow", delay=slow_delay)
    manager = manager_with(fast, strategy=Strategy.BEST_PERFORMANCE, **settings)
    await manager.generate(chat(), RequestContext())
    manager.register(slow)
    return manager, fast, slow


def in_flight(*backends: Backend) -> list[int]:
    return [b.metrics.in_flight for b in backends]


async def test_a_late_first_token_is_hedged_and_the_faster_answer_kept(autojump_clock: trio.abc.Clock) -> None:
    manager, fast, slow = await hedging_manager(slow_delay=5.0)
    ctx = RequestContext()
    began = trio.current_time()
    result = await manager.generate(chat(), ctx)
    assert result.text == "Hello!"
    assert ctx.served_by == "fast"
    assert trio.current_time() - began < 1.0  # not the 5 s the slow backend takes to start
    assert slow.calls == 1 and slow.closed_streams == 1  # asked, then cancelled and closed
    assert in_flight(fast, slow) == [0, 0] and manager.pending == 0
    # What the loser showed is remembered: at least this slow to a first token.
    assert slow.metrics.model("m").ttft_s.value >= 0.2
    assert slow.metrics.requests_failed == 0  # losing a race is no fault


async def test_a_primary_that_answers_first_after_the_hedge_started_is_kept(autojump_clock: trio.abc.Clock) -> None:
    manager, fast, slow = await hedging_manager(slow_delay=0.25)  # hedge at 0.2 s, fast answers at 0.3 s
    ctx = RequestContext()
    result = await manager.generate(chat(), ctx)
    assert result.text == "Hello!" and ctx.served_by == "slow"
    assert fast.calls == 2 and fast.closed_streams == 2  # the hedge was started, then closed
    assert in_flight(fast, slow) == [0, 0]


async def test_a_primary_failing_during_the_race_is_rescued_by_the_hedge(autojump_clock: trio.abc.Clock) -> None:
    manager, fast, slow = await hedging_manager(slow_delay=0.25)  # fails after the hedge began at 0.2 s
    slow.fail_before_output = BackendFailedError("slow broke")
    ctx = RequestContext()
    began = trio.current_time()
    result = await manager.generate(chat(), ctx)
    assert result.text == "Hello!" and ctx.served_by == "fast"
    # The hedge had started before the failure: no backoff, no fresh start after it.
    assert trio.current_time() - began == pytest.approx(0.2 + 4 * 0.1)
    assert slow.metrics.requests_failed == 1  # the failure still counts against it
    assert in_flight(fast, slow) == [0, 0]


async def test_without_budget_a_late_request_waits_for_its_backend(autojump_clock: trio.abc.Clock) -> None:
    manager, fast, _ = await hedging_manager(slow_delay=2.0, hedge_ratio=0.0)
    ctx = RequestContext()
    await manager.generate(chat(), ctx)
    assert ctx.served_by == "slow" and fast.calls == 1


async def test_a_streamed_answer_is_never_hedged_after_its_first_token(autojump_clock: trio.abc.Clock) -> None:
    manager, fast, slow = await hedging_manager(slow_delay=0.15)  # first token in time, then slow tokens
    slow.tokens = ["a", "b", "c", "d"]
    slow.delay = 0.15
    ctx = RequestContext()
    result = await manager.generate(chat(), ctx)
    assert result.text == "abcd" and ctx.served_by == "slow" and fast.calls == 1


async def test_a_client_leaving_mid_race_leaves_nothing_in_flight(autojump_clock: trio.abc.Clock) -> None:
    manager, fast, slow = await hedging_manager(slow_delay=5.0)
    fast.delay = 3.0  # the hedge starts at 0.2 s and is still waiting for its first token
    with trio.move_on_after(1.0):
        await manager.generate(chat(), RequestContext())
    assert fast.calls == 2  # the hedge did start
    assert in_flight(fast, slow) == [0, 0] and manager.pending == 0
    assert fast.closed_streams == 2 and slow.closed_streams == 1


async def test_a_deadline_passing_mid_race_is_a_deadline_error_with_nothing_in_flight(
    autojump_clock: trio.abc.Clock,
) -> None:
    manager, fast, slow = await hedging_manager(slow_delay=5.0)
    fast.delay = 3.0
    with pytest.raises(DeadlineExceededError):
        await manager.generate(chat(), RequestContext(deadline=trio.current_time() + 1.0))
    assert in_flight(fast, slow) == [0, 0] and manager.pending == 0


async def test_an_ejected_backends_old_speed_does_not_shorten_the_wait_for_a_hedge(
    autojump_clock: trio.abc.Clock,
) -> None:
    # `down` was fast (0.1 s) and is now unhealthy; `steady` takes 1 s; `new` is unmeasured,
    # explored, and answers in 0.5 s. Judged against `steady`, the only backend a hedge could
    # go to, 0.5 s is not late (hedge after 2 x 1 s); judged against `down`'s old 0.1 s it was.
    down, steady, new = ScriptedBackend("down"), ScriptedBackend("steady", delay=1.0), ScriptedBackend("new", delay=0.5)
    manager = manager_with(down, steady, new, strategy=Strategy.BEST_PERFORMANCE)
    for backend, ttft in ((down, 0.1), (steady, 1.0)):
        performance = backend.metrics.model("m")
        performance.ttft_s.update(ttft, trio.current_time())
        performance.tpot_s.update(0.01, trio.current_time())
        performance.samples = 10
    down.status = BackendStatus.UNHEALTHY
    ctx = RequestContext()
    await manager.generate(chat(), ctx)
    assert ctx.served_by == "new"
    assert (steady.calls, down.calls, manager.hedges_started) == (0, 0, 0)
