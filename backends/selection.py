"""Which registered backend serves a request: the pool it may go to, and the pick.

The pool is the backends serving the model that are not excluded (already tried, peers
for a request that came from a peer, too small a context window, unable to continue an
answer), narrowed to the healthy and not ejected ones if any (a stale verdict must not
turn into a guaranteed failure) and to the most preferred fallback tier left. The pick is
the configured strategy's (`backends.strategies`, pure functions) over `Candidate`
snapshots of the pool. The hedge delay is judged against the same pool.

The manager owns the registry and the circuit breakers; this reads them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import trio

from backends.base import Backend
from backends.errors import BackendUnavailableError
from backends.hedging import hedge_delay_s
from backends.resilience import CircuitBreaker
from backends.strategies import Candidate, Strategy, best_performance, least_loaded, round_robin
from backends.types import Task


class Selector:
    def __init__(
        self,
        backends: Mapping[str, Backend],
        breakers: Mapping[str, CircuitBreaker],
        strategy: Callable[[], Strategy],
        rng: random.Random,
    ) -> None:
        self._backends = backends
        self._breakers = breakers
        self._strategy = strategy  # read per pick: the setting may change while running
        self._rng = rng
        self._cursor = 0

    def select(
        self,
        task: Task,
        model: str,
        exclude: frozenset[str] = frozenset(),
        min_context_window: int = 0,
        allow_peers: bool = True,
        need_continuation: bool = False,
    ) -> Backend:
        pool = self.pool(task, model, exclude, min_context_window, allow_peers, need_continuation)
        chosen = self._pick([self.candidate(b, model) for b in pool])
        return self._backends[chosen.backend_id]

    def pool(
        self,
        task: Task,
        model: str,
        exclude: frozenset[str] = frozenset(),
        min_context_window: int = 0,
        allow_peers: bool = True,
        need_continuation: bool = False,
    ) -> list[Backend]:
        """The backends the strategy chooses among (see the module's docstring)."""
        serving = [
            b
            for b in self._backends.values()
            if b.id not in exclude
            and b.capabilities.serves(task, model)
            and (allow_peers or not b.is_peer)
            and (b.capabilities.continuation or not need_continuation)
        ]
        if min_context_window:
            # Unknown windows (0) may try: the backend will say if it's too small.
            serving = [b for b in serving if (w := context_window(b, task, model)) == 0 or w > min_context_window]
        if not serving:
            message = f"no backend is available for {task.value} with model {model!r}"
            peers_serve = any(b.is_peer and b.capabilities.serves(task, model) for b in self._backends.values())
            if not allow_peers and peers_serve:
                message += " on this node (only its peers serve it, and a request from a peer is not forwarded again)"
            raise BackendUnavailableError(message)
        now = trio.current_time()
        closed = [b for b in serving if not self._breakers[b.id].is_open(now)]
        pool = [b for b in closed if b.status.routable] or closed or serving
        first_tier = min(b.priority for b in pool)
        return [b for b in pool if b.priority == first_tier]

    def candidate(self, backend: Backend, model: str) -> Candidate:
        perf = backend.metrics.per_model.get(model)
        return Candidate(
            backend_id=backend.id,
            in_flight=backend.metrics.in_flight,
            queue_size=backend.queue_size(),
            ttft_s=perf.ttft_s.value if perf else None,
            tpot_s=perf.tpot_s.value if perf else None,
            samples=perf.samples if perf else 0,
            sample_age_s=trio.current_time() - perf.ttft_s.updated_at if perf and perf.samples else 0.0,
        )

    def hedge_delay_s(
        self, backend: Backend, task: Task, model: str, exclude: frozenset[str], allow_peers: bool, factor: float
    ) -> float | None:
        """How long to wait for `backend`'s first token before hedging, judged against the
        pool a hedge would be chosen from (plus `backend`): an ejected backend's or a lower
        tier's old figures must not make the wait shorter. None: no hedge."""
        try:
            pool = self.pool(task, model, exclude - {backend.id}, allow_peers=allow_peers)
        except BackendUnavailableError:
            return None
        candidates = [self.candidate(b, model) for b in pool]
        chosen = self.candidate(backend, model)
        if backend not in pool:
            candidates.append(chosen)
        return hedge_delay_s(chosen, candidates, factor)

    def _pick(self, candidates: list[Candidate]) -> Candidate:
        strategy = self._strategy()
        if strategy is Strategy.ROUND_ROBIN:
            chosen, self._cursor = round_robin(candidates, self._cursor, self._rng)
            return chosen
        if strategy is Strategy.LEAST_LOADED:
            return least_loaded(candidates, self._rng)
        return best_performance(candidates, self._rng)


def context_window(backend: Backend, task: Task, model: str) -> int:
    """What `backend` says its window for the model is; 0: it doesn't say."""
    card = backend.capabilities.card(task, model)
    return (card.context_window if card else None) or backend.capabilities.context_window or 0
