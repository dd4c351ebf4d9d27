"""Failure handling as small pure pieces: the circuit breaker that ejects a failing backend
for a while, and the retry policy (what may be retried, how long to wait before it).

Time is always passed in (`now`), so the manager uses trio's clock and tests can use
an autojump clock or plain numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from backends.errors import (
    ContextWindowExceededError,
    InferenceError,
    OverloadedError,
    ShuttingDownError,
    UnsupportedTaskError,
)


@dataclass
class CircuitBreaker:
    """Passive ejection. `failure_threshold` consecutive failures open the circuit for a
    cooldown that doubles each time it trips again without a success in between (capped).
    When the cooldown ends, the backend gets traffic again, but one more failure re-opens
    it at once: it has not proved itself yet."""

    failure_threshold: int = 3
    base_cooldown_s: float = 5.0
    max_cooldown_s: float = 300.0
    consecutive_failures: int = 0
    trips: int = 0
    open_until: float = 0.0

    def is_open(self, now: float) -> bool:
        return now < self.open_until

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.trips = 0

    def record_failure(self, now: float) -> bool:
        """Count a failure; True if this one opened the circuit."""
        self.consecutive_failures += 1
        threshold = 1 if self.trips else self.failure_threshold
        if self.consecutive_failures < threshold:
            return False
        self.trips += 1
        self.consecutive_failures = 0
        self.open_until = now + self.cooldown_s()
        return True

    def hold(self, until: float) -> None:
        """Keep traffic away until `until` (an upstream's Retry-After), without a trip."""
        self.open_until = max(self.open_until, until)

    def cooldown_s(self) -> float:
        return min(self.max_cooldown_s, self.base_cooldown_s * 2 ** max(self.trips - 1, 0))


def may_retry(exc: BaseException, *, emitted: bool, attempts: int, max_attempts: int) -> bool:
    """Whether another backend may take over a request that failed with `exc`.

    Never once output reached the client (a retry would repeat or contradict it). Never for
    errors caused by the input, except a context window too small: a backend with a larger
    one may serve it. An upstream's 429 is retried elsewhere.
    """
    if emitted or attempts >= max_attempts or not isinstance(exc, InferenceError):
        return False
    if isinstance(exc, (ShuttingDownError, UnsupportedTaskError)):
        return False
    if isinstance(exc, (ContextWindowExceededError, OverloadedError)):
        return True
    return exc.retryable


def is_backend_fault(exc: BaseException) -> bool:
    """Failures that count against a backend's health (the circuit breaker's input)."""
    if isinstance(exc, (OverloadedError, ShuttingDownError)):
        return False  # busy or leaving, not broken
    if isinstance(exc, InferenceError):
        return exc.retryable
    return isinstance(exc, Exception)  # a bug in an adapter is the backend's fault


def backoff_s(attempt: int, rng: random.Random, base_s: float = 0.05, cap_s: float = 2.0) -> float:
    """Full-jitter exponential backoff before retry number `attempt` (1-based)."""
    return rng.uniform(0.0, min(cap_s, base_s * 2 ** (attempt - 1)))


@dataclass
class RetryState:
    """What one request's earlier attempts teach its next one."""

    last_error: BaseException | None = None
    min_context_window: int = 0

    def failed(self, exc: BaseException, context_window: int) -> None:
        self.last_error = exc
        if isinstance(exc, ContextWindowExceededError):
            # Only a backend with a larger window (or one that doesn't say) can help.
            self.min_context_window = max(self.min_context_window, context_window)
