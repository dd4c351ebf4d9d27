"""Hedged requests: when a stream's first token is late, ask a second backend too and keep
whichever answers first (the other is cancelled).

Late means: later than the chosen backend's own expected first-token time, by a factor
(or than the best candidate's, when the chosen one is unmeasured or its figures are
stale). So a request that went to a backend that just turned slow (its figures not
caught up yet), to an unmeasured one (exploration) or to one re-probed after a while
costs about `factor` x the expected TTFT plus the hedge's own, instead of the slow
backend's whole answer. Only the first token is raced: once a
token has reached the client the answer belongs to that backend (failover after that is
`backends.failover`'s job).

A budget bounds the extra load: hedges are at most `ratio` of requests (plus a small
burst), so when everything is slow (overload) hedging does not double the load.

The policy is pure functions over `Candidate` snapshots; `race_first_chunk` does the race
and knows nothing of the manager's bookkeeping (it takes a callback that starts the hedge).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import outcome
import trio

from backends.errors import InferenceError
from backends.strategies import EXPLORATION_SAMPLES, STALE_AFTER_S, Candidate

T = TypeVar("T")

HEDGE_AFTER_FACTOR = 2.0  # x the best expected TTFT
MIN_HEDGE_DELAY_S = 0.01  # below this, timer noise would trigger hedges for nothing


def hedge_delay_s(
    chosen: Candidate, candidates: Sequence[Candidate], factor: float = HEDGE_AFTER_FACTOR
) -> float | None:
    """How long to wait for the chosen backend's first token before hedging; None: don't
    (no other candidate, or nothing measured to compare with).

    Late is judged against what the chosen backend itself is expected to do, when that is
    known and fresh: a backend the strategy picked knowing it is slower is not second-
    guessed, one that turns slower than its record is. An unmeasured or stale one (an
    exploration, a re-probe) is judged against the best candidate: finding out how slow it
    is should not cost the client its whole answer.
    """
    others = [c for c in candidates if c.backend_id != chosen.backend_id]
    measured = [c.ttft_s for c in candidates if c.ttft_s is not None and c.samples > 0]
    if not others or not measured:
        return None
    known = chosen.ttft_s is not None and chosen.samples >= EXPLORATION_SAMPLES and chosen.sample_age_s <= STALE_AFTER_S
    expected = chosen.ttft_s if known and chosen.ttft_s is not None else min(measured)
    return max(factor * expected, MIN_HEDGE_DELAY_S)


class HedgeLost(InferenceError):
    """Ends the attempt that lost a race; never reaches a client. Not a backend fault,
    unless the loser had `failed` meanwhile (then that failure is what counts)."""

    code = "hedge_lost"

    def __init__(self, message: str, failed: Exception | None = None) -> None:
        super().__init__(message)
        self.failed = failed


class HedgeBudget:
    """A token bucket: every request earns `ratio` of a hedge, a hedge spends one; at most
    `burst` saved. Keeps hedges near `ratio` of requests however late answers get."""

    def __init__(self, ratio: float = 0.1, burst: float = 5.0) -> None:
        self.ratio = ratio
        self.burst = burst
        self._tokens = burst if ratio > 0 else 0.0

    def earn(self) -> None:
        self._tokens = min(self.burst, self._tokens + self.ratio)

    def spend(self) -> bool:
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


@dataclass
class RaceResult(Generic[T]):
    winner: AsyncGenerator[T, None]
    first: outcome.Outcome[T]  # the winner's first step: a chunk, StopAsyncIteration or an error
    hedge: AsyncGenerator[T, None] | None  # started (winner or loser), None if not needed
    hedge_won: bool
    loser_failure: Exception | None = None  # the other side's first step, if it failed


async def race_first_chunk(
    primary: AsyncGenerator[T, None],
    hedge_at: float,
    start_hedge: Callable[[], Awaitable[AsyncGenerator[T, None] | None]],
) -> RaceResult[T]:
    """Takes the primary's first step; if it hasn't come by `hedge_at` (trio clock), starts
    the hedge and takes the first step of whichever comes first. A step that fails does not
    win while the other may still answer: the hedge is there to rescue the request.

    The loser's pending step is cancelled (its generator ends); the caller closes both.
    Generators are stepped in child tasks here and by the caller afterwards, so a backend's
    stream must not hold task-bound state (a lock, a cancel scope) across a yield.
    """
    steps: dict[int, outcome.Outcome[T]] = {}
    hedge: AsyncGenerator[T, None] | None = None
    decided = trio.Event()
    running = 1

    async def step(index: int, generator: AsyncGenerator[T, None]) -> None:
        nonlocal running
        steps[index] = await outcome.acapture(anext, generator)
        running -= 1
        if isinstance(steps[index], outcome.Value) or running == 0:
            decided.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(step, 0, primary)
        with trio.move_on_at(hedge_at):
            await decided.wait()
        if not decided.is_set():
            hedge = await start_hedge()
            if hedge is not None:
                running += 1
                nursery.start_soon(step, 1, hedge)
        await decided.wait()
        nursery.cancel_scope.cancel()
    # A success beats a failure; between two successes (same scheduler tick) the primary.
    won = next((i for i in (0, 1) if isinstance(steps.get(i), outcome.Value)), 0)
    lost = steps.get(1 - won)
    failure = lost.error if isinstance(lost, outcome.Error) and isinstance(lost.error, Exception) else None
    if won == 1 and hedge is not None:
        return RaceResult(hedge, steps[1], hedge, hedge_won=True, loser_failure=failure)
    return RaceResult(primary, steps[0], hedge, hedge_won=False, loser_failure=failure)
