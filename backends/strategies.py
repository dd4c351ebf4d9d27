"""Balancing as pure functions: given a snapshot of candidates, pick one.

The manager builds `Candidate` snapshots and owns any state a strategy needs (the
round-robin cursor); nothing here touches a backend, so each strategy can be tested
and benchmarked with plain data.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class Strategy(enum.StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    BEST_PERFORMANCE = "best_performance"

    @classmethod
    def parse(cls, name: str) -> Strategy:
        key = name.strip().lower().replace("-", "_")
        try:
            return cls(key)
        except ValueError:
            raise ValueError(
                f"unknown load-balancing strategy {name!r}; expected one of {[s.value for s in cls]}"
            ) from None


@dataclass(frozen=True)
class Candidate:
    backend_id: str
    in_flight: int  # counted by the manager from dispatch to release, so never stale
    queue_size: int  # as reported by the backend itself
    ttft_s: float | None = None  # EWMA for this (backend, model); None = never measured
    tpot_s: float | None = None
    samples: int = 0
    sample_age_s: float = 0.0  # since the last TTFT sample

    @property
    def load(self) -> int:
        # Our in-flight count covers what we dispatched, including what still sits in the
        # backend's queue; the backend's own queue figure may include other clients' work.
        # The larger of the two never double counts and never misses dispatched requests.
        return max(self.in_flight, self.queue_size)


def round_robin(candidates: Sequence[Candidate], cursor: int, rng: random.Random) -> tuple[Candidate, int]:
    """Returns the pick and the next cursor. Candidates must come in a stable order."""
    index = cursor % len(candidates)
    return candidates[index], index + 1


def least_loaded(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    lowest = min(c.load for c in candidates)
    return rng.choice([c for c in candidates if c.load == lowest])


# An unmeasured backend gets this many requests first, so it is measured at all; more
# would put unknown (possibly slow) backends in the latency tail.
EXPLORATION_SAMPLES = 1
# A backend not measured for this long is probed again when idle: its peak figures
# only move when it serves, and a backend that was slow once may have recovered.
STALE_AFTER_S = 30.0
# Inference servers batch: up to about this many requests in flight don't slow each
# other much. Weighting load by it keeps a busy fast backend ahead of an idle slow one.
ASSUMED_PARALLELISM = 4
# A candidate whose expected cost is more than this many times the cheapest one's is left
# out of the two choices (see best_performance).
OUTLIER_FACTOR = 3.0


def best_performance(
    candidates: Sequence[Candidate],
    rng: random.Random,
    expected_tokens: int = 64,
    parallelism: int = ASSUMED_PARALLELISM,
) -> Candidate:
    """Power of two choices over expected latency.

    Cost of a candidate = (TTFT + expected_tokens * TPOT) * max(1, (load + 1) / parallelism), from
    peak EWMAs: first-token and per-token times stay separate figures, combined only for
    the decision at hand. The measured times already contain the effect of the load they
    were measured under, so load counts only beyond what a batching server absorbs.
    Unmeasured candidates are explored first; stale idle ones are re-probed; the two
    choices are drawn from the candidates within `OUTLIER_FACTOR` of the cheapest.
    """
    unexplored = [c for c in candidates if c.samples < EXPLORATION_SAMPLES]
    if unexplored:
        return min(unexplored, key=lambda c: (c.samples, c.load, rng.random()))
    stale = [c for c in candidates if c.sample_age_s > STALE_AFTER_S and c.load == 0]
    if stale:
        return max(stale, key=lambda c: (c.sample_age_s, rng.random()))
    if len(candidates) == 1:
        return candidates[0]
    # A candidate measured only up to its first token (a hedge it lost, a one-token
    # answer) is assumed as slow per token as the slowest known, not free.
    unknown_tpot = max((c.tpot_s for c in candidates if c.tpot_s is not None), default=0.0)
    costs = {c.backend_id: _cost(c, expected_tokens, parallelism, unknown_tpot) for c in candidates}
    # Latency outliers sit out: with two of five backends far slower, two random choices
    # would pair them (and send them a request) one time in ten, which is the p99. They
    # come back as soon as load makes the fast ones as costly, or when stale (re-probed).
    cheapest = min(costs.values())
    pool = [c for c in candidates if costs[c.backend_id] <= OUTLIER_FACTOR * cheapest]
    if len(pool) == 1:
        return pool[0]
    first, second = rng.sample(pool, 2)
    return min((first, second), key=lambda c: (costs[c.backend_id], c.load, rng.random()))


def _cost(candidate: Candidate, expected_tokens: int, parallelism: int, unknown_tpot_s: float = 0.0) -> float:
    ttft = candidate.ttft_s or 0.0
    tpot = candidate.tpot_s if candidate.tpot_s is not None else unknown_tpot_s
    # This request joins `load` others: within what the server batches, none waits.
    return (ttft + expected_tokens * tpot) * max(1.0, (candidate.load + 1) / parallelism)


Picker = Callable[[Sequence[Candidate]], Candidate]
