"""Balancing strategies are pure functions: checked on plain data."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from backends.strategies import (
    EXPLORATION_SAMPLES,
    Candidate,
    Strategy,
    best_performance,
    least_loaded,
    round_robin,
)


def test_round_robin_visits_each_candidate_in_turn() -> None:
    candidates = [Candidate("a", 0, 0), Candidate("b", 5, 0), Candidate("c", 0, 0)]
    cursor, picks = 0, []
    for _ in range(6):
        chosen, cursor = round_robin(candidates, cursor, random.Random(0))
        picks.append(chosen.backend_id)
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_prefers_the_smallest_load_and_breaks_ties_at_random() -> None:
    rng = random.Random(1)
    candidates = [Candidate("busy", 4, 0), Candidate("x", 1, 0), Candidate("y", 1, 0)]
    picks = Counter(least_loaded(candidates, rng).backend_id for _ in range(200))
    assert set(picks) == {"x", "y"}
    assert min(picks.values()) > 60


def test_load_counts_a_backend_queue_we_did_not_fill() -> None:
    rng = random.Random(0)
    queued_elsewhere = Candidate("queued", in_flight=0, queue_size=5)
    assert least_loaded([queued_elsewhere, Candidate("idle", 1, 0)], rng).backend_id == "idle"


def test_best_performance_explores_unmeasured_backends_first() -> None:
    measured = Candidate("old", 0, 0, ttft_s=0.01, tpot_s=0.01, samples=50)
    fresh = Candidate("new", 0, 0, samples=0)
    assert best_performance([measured, fresh], random.Random(0)).backend_id == "new"


def test_best_performance_mostly_picks_the_faster_backend() -> None:
    rng = random.Random(3)
    fast = Candidate("fast", 0, 0, ttft_s=0.05, tpot_s=0.01, samples=EXPLORATION_SAMPLES)
    slow = Candidate("slow", 0, 0, ttft_s=0.20, tpot_s=0.04, samples=EXPLORATION_SAMPLES)
    picks = Counter(best_performance([fast, slow], rng).backend_id for _ in range(100))
    assert picks["fast"] == 100


def test_best_performance_weighs_outstanding_requests() -> None:
    rng = random.Random(3)
    fast_but_busy = Candidate("busy", 9, 0, ttft_s=0.05, tpot_s=0.01, samples=10)
    slower_idle = Candidate("idle", 0, 0, ttft_s=0.10, tpot_s=0.02, samples=10)
    assert best_performance([fast_but_busy, slower_idle], rng).backend_id == "idle"


@pytest.mark.parametrize("name", ["round_robin", "round-robin", "LEAST_LOADED", "best_performance"])
def test_strategy_names_parse_in_the_spellings_users_write(name: str) -> None:
    assert Strategy.parse(name) in set(Strategy)


def test_unknown_strategy_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown load-balancing strategy 'fastest'"):
        Strategy.parse("fastest")


def test_best_performance_keeps_a_busy_fast_backend_ahead_of_an_idle_slow_one() -> None:
    from backends.strategies import Candidate, best_performance

    fast_busy = Candidate("fast", in_flight=3, queue_size=0, ttft_s=0.05, tpot_s=0.01, samples=10)
    slow_idle = Candidate("slow", in_flight=0, queue_size=0, ttft_s=0.25, tpot_s=0.05, samples=10)
    rng = random.Random(3)
    picks = [best_performance([fast_busy, slow_idle], rng).backend_id for _ in range(50)]
    assert picks.count("fast") == 50


def test_best_performance_reprobes_a_stale_idle_backend_once_in_a_while() -> None:
    from backends.strategies import STALE_AFTER_S, Candidate, best_performance

    fresh = Candidate("fresh", in_flight=0, queue_size=0, ttft_s=0.05, tpot_s=0.01, samples=10, sample_age_s=1)
    stale = Candidate(
        "stale", in_flight=0, queue_size=0, ttft_s=5.0, tpot_s=1.0, samples=10, sample_age_s=STALE_AFTER_S + 1
    )
    assert best_performance([fresh, stale], random.Random(1)).backend_id == "stale"
    busy_stale = Candidate(
        "stale", in_flight=1, queue_size=0, ttft_s=5.0, tpot_s=1.0, samples=10, sample_age_s=STALE_AFTER_S + 1
    )
    assert best_performance([fresh, busy_stale], random.Random(1)).backend_id == "fresh"


def pool_of_five(fast_load: int) -> list[Candidate]:
    def c(name: str, ttft: float, tpot: float, load: int = 0) -> Candidate:
        return Candidate(name, in_flight=load, queue_size=0, ttft_s=ttft, tpot_s=tpot, samples=10)

    return [
        c("fast-a", 0.05, 0.01, fast_load),
        c("fast-b", 0.05, 0.01, fast_load),
        c("slow-2x", 0.10, 0.02),
        c("slow-4x", 0.20, 0.04),
        c("slow-5x", 0.25, 0.05),
    ]


def test_best_performance_leaves_latency_outliers_out_of_the_two_choices() -> None:
    # Two random choices out of five pair the two slowest one time in ten.
    rng = random.Random(5)
    picks = Counter(best_performance(pool_of_five(fast_load=0), rng).backend_id for _ in range(1000))
    assert picks["slow-4x"] == picks["slow-5x"] == 0
    assert picks["fast-a"] + picks["fast-b"] == 1000  # slow-2x is in, but loses every pair it can draw


def test_best_performance_brings_outliers_back_when_load_makes_the_fast_ones_as_costly() -> None:
    rng = random.Random(5)
    picks = Counter(best_performance(pool_of_five(fast_load=20), rng).backend_id for _ in range(1000))
    assert picks["slow-4x"] > 0 and picks["slow-5x"] > 0
