"""The pool a request may go to, narrowed step by step, and the pick within it."""

from __future__ import annotations

import random

import pytest
import trio

from backends.errors import BackendUnavailableError
from backends.resilience import CircuitBreaker
from backends.selection import Selector
from backends.strategies import Strategy
from backends.types import BackendStatus, BackendType, Task
from tests.backends.test_manager import ScriptedBackend


def selector_over(*backends: ScriptedBackend) -> tuple[Selector, dict[str, CircuitBreaker]]:
    breakers = {b.id: CircuitBreaker(failure_threshold=1, base_cooldown_s=60, max_cooldown_s=60) for b in backends}
    registry = {b.id: b for b in backends}
    return Selector(registry, breakers, lambda: Strategy.ROUND_ROBIN, random.Random(1)), breakers


def ids(backends: list[ScriptedBackend] | list[object]) -> list[str]:
    return sorted(b.id for b in backends)  # type: ignore[attr-defined]


async def test_unhealthy_and_ejected_backends_leave_the_pool_while_others_remain() -> None:
    a, b, c = ScriptedBackend("a"), ScriptedBackend("b"), ScriptedBackend("c")
    selector, breakers = selector_over(a, b, c)
    b.status = BackendStatus.UNHEALTHY
    breakers["c"].record_failure(trio.current_time())
    assert ids(selector.pool(Task.CHAT, "m")) == ["a"]
    a.status = BackendStatus.UNHEALTHY  # nobody healthy and closed: try the closed ones anyway
    assert ids(selector.pool(Task.CHAT, "m")) == ["a", "b"]


async def test_the_most_preferred_tier_left_is_the_pool() -> None:
    primary, fallback = ScriptedBackend("primary"), ScriptedBackend("fallback")
    fallback.priority = 1
    selector, _ = selector_over(primary, fallback)
    assert ids(selector.pool(Task.CHAT, "m")) == ["primary"]
    assert ids(selector.pool(Task.CHAT, "m", exclude=frozenset({"primary"}))) == ["fallback"]


async def test_a_request_from_a_peer_is_never_offered_to_a_peer() -> None:
    local, peer = ScriptedBackend("local"), ScriptedBackend("peer:x")
    peer.backend_type = BackendType.P2P
    selector, _ = selector_over(local, peer)
    assert ids(selector.pool(Task.CHAT, "m", exclude=frozenset({"local"}))) == ["peer:x"]
    with pytest.raises(BackendUnavailableError, match="only its peers serve it"):
        selector.pool(Task.CHAT, "m", exclude=frozenset({"local"}), allow_peers=False)


async def test_round_robin_takes_turns_over_the_pool() -> None:
    selector, _ = selector_over(ScriptedBackend("a"), ScriptedBackend("b"))
    picks = [selector.select(Task.CHAT, "m").id for _ in range(4)]
    assert sorted(picks) == ["a", "a", "b", "b"] and picks[0] != picks[1]
