"""A node reachable over several protocols, registered once: the fastest working protocol
serves, and a failing one hands over to the next within the same request."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import trio

from backends.errors import BackendUnavailableError, InvalidRequestError
from backends.hybrid import HybridBackend
from backends.manager import BackendManager
from backends.types import (
    BackendStatus,
    BackendType,
    Capabilities,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    RequestContext,
    Task,
)
from tests.backends.test_manager import ScriptedBackend, chat, manager_with


def node_over(*protocols: ScriptedBackend) -> HybridBackend:
    return HybridBackend("node-b", protocols)


async def test_requests_settle_on_the_fastest_protocol(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    http, ws = ScriptedBackend("node-b/http", delay=0.5), ScriptedBackend("node-b/ws", delay=0.1)
    hybrid = node_over(http, ws)
    manager = manager_with(hybrid)
    await nursery.start(manager.run)
    for _ in range(6):
        assert (await manager.generate(chat(), RequestContext())).backend_id == "node-b"
    assert ws.calls >= 4 and http.calls <= 2  # both measured, then the faster one used
    assert len(manager.status_report()["backends"]) == 1  # type: ignore[arg-type]


async def answer_as_the_api_does(manager: BackendManager, max_tokens: int) -> None:
    """Stream and stop at the finish chunk: nothing after that yield runs in the backend."""
    async with aclosing(manager.stream(chat(max_tokens=max_tokens), RequestContext())) as chunks:
        async for chunk in chunks:
            if chunk.finish_reason is not None:
                break


async def test_long_answers_go_to_the_fastest_streamer_and_short_ones_to_the_fastest_starter(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    words = [f"w{i} " for i in range(20)]
    # WebSocket starts sooner; HTTP relays each token four times faster.
    http = ScriptedBackend("node-b/http", words, delay=0.10, token_delay=0.05)
    ws = ScriptedBackend("node-b/ws", words, delay=0.05, token_delay=0.20)
    manager = manager_with(node_over(http, ws))
    await nursery.start(manager.run)
    for _ in range(2):  # each protocol measured once
        await answer_as_the_api_does(manager, max_tokens=20)
    assert (http.calls, ws.calls) == (1, 1)
    for _ in range(3):
        await answer_as_the_api_does(manager, max_tokens=20)
    assert (http.calls, ws.calls) == (4, 1)  # 0.10 + 19 x 0.05 s beats 0.05 + 19 x 0.20 s
    await answer_as_the_api_does(manager, max_tokens=1)
    assert (http.calls, ws.calls) == (4, 2)  # one token: the first token decides
    status = manager.status_report()["backends"][0]["details"]["protocols"]  # type: ignore[index]
    assert [round(p["tpot_ms"]) for p in status] == [50, 200]
    await trio.sleep(31)  # WebSocket's figures go stale: one answer measures it again
    await answer_as_the_api_does(manager, max_tokens=20)
    await answer_as_the_api_does(manager, max_tokens=20)
    assert (http.calls, ws.calls) == (5, 3)


async def test_a_failing_protocol_hands_over_within_the_request(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    ws = ScriptedBackend("node-b/ws", delay=0.1, fail_before_output=BackendUnavailableError("ws down"))
    http = ScriptedBackend("node-b/http", delay=0.3)
    hybrid = node_over(ws, http)
    manager = manager_with(hybrid)
    await nursery.start(manager.run)
    result = await manager.generate(chat(), RequestContext())
    assert result.text == "Hello!" and ws.calls == 1 and http.calls == 1
    protocols = {p["id"]: p for p in hybrid.describe()["protocols"]}  # type: ignore[union-attr]
    assert protocols["node-b/ws"]["failures"] == 1


async def test_unroutable_protocols_are_tried_last(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    down, up = ScriptedBackend("node-b/p2p", delay=0.01), ScriptedBackend("node-b/http", delay=0.2)
    hybrid = node_over(down, up)
    manager = manager_with(hybrid)
    await nursery.start(manager.run)
    down.status = BackendStatus.OFFLINE
    await manager.generate(chat(), RequestContext())
    assert (down.calls, up.calls) == (0, 1)
    assert await hybrid.check_health() is BackendStatus.DEGRADED


async def test_input_errors_are_not_retried_on_another_protocol(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    bad = ScriptedBackend("node-b/ws", fail_before_output=InvalidRequestError("temperature must be <= 2"))
    other = ScriptedBackend("node-b/http")
    manager = manager_with(node_over(bad, other))
    await nursery.start(manager.run)
    try:
        await manager.generate(chat(), RequestContext())
    except InvalidRequestError:
        pass
    else:
        raise AssertionError("the input error must reach the caller")
    assert other.calls == 0


async def test_every_protocol_down_is_a_clear_unavailable_error(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    a = ScriptedBackend("node-b/ws", fail_before_output=BackendUnavailableError("ws refused"))
    b = ScriptedBackend("node-b/http", fail_before_output=BackendUnavailableError("http refused"))
    manager = manager_with(node_over(a, b), max_attempts=1)
    await nursery.start(manager.run)
    try:
        await manager.generate(chat(), RequestContext())
    except BackendUnavailableError as exc:
        assert "refused" in str(exc)
    else:
        raise AssertionError("expected an unavailable error")


class ContinuingBackend(ScriptedBackend):
    """Can take a failover continuation (as a peer over libp2p can); remembers what it got."""

    def __init__(self, backend_id: str, backend_type: BackendType = BackendType.API, **kwargs: Any) -> None:
        super().__init__(backend_id, **kwargs)
        self.backend_type = backend_type
        self.requests: list[GenerationRequest] = []

    @property
    def capabilities(self) -> Capabilities:
        return replace(super().capabilities, continuation=True)

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        self.requests.append(request)
        async with aclosing(super().stream(request, ctx)) as chunks:
            async for chunk in chunks:
                yield chunk


async def test_a_continuation_goes_only_to_a_protocol_that_can_take_it(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    breaking = ContinuingBackend("node-a", fail_after=1)
    fast_http = ScriptedBackend("node-b/http", delay=0.01)  # fastest, but can't continue an answer
    libp2p = ContinuingBackend("node-b/libp2p", delay=0.2)
    hybrid = node_over(fast_http, libp2p)
    hybrid.priority = 1  # node-a serves first; node-b is where its answer fails over to
    manager = manager_with(breaking, hybrid)
    await nursery.start(manager.run)
    result = await manager.generate(chat(), RequestContext())
    assert result.text == "Hel" + "Hello!"  # node-a's token, then node-b's continuation
    assert fast_http.calls == 0 and libp2p.calls == 1
    continuation = libp2p.requests[0].continuation
    assert continuation is not None and continuation.text == "Hel"


async def test_a_hybrid_offers_what_its_authority_serves_not_every_protocol(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    class ForwardingApi(ScriptedBackend):
        """An HTTP API that also lists models its node only reaches through others."""

        @property
        def capabilities(self) -> Capabilities:
            caps = super().capabilities
            return replace(caps, models=(*caps.models, ModelCard("elsewhere", Task.CHAT)))

    libp2p = ContinuingBackend("node-b/libp2p", backend_type=BackendType.P2P)
    hybrid = HybridBackend("node-b", [libp2p, ForwardingApi("node-b/http")], capabilities_from=libp2p)
    assert {card.id for card in hybrid.capabilities.models} == {"m"}
    assert hybrid.capabilities.continuation


async def test_a_request_from_a_peer_never_goes_to_a_hybrid_that_reaches_a_peer(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    libp2p = ContinuingBackend("node-b/libp2p", backend_type=BackendType.P2P)
    http = ScriptedBackend("node-b/http")
    manager = manager_with(HybridBackend("node-b", [libp2p, http], capabilities_from=libp2p))
    await nursery.start(manager.run)
    assert (await manager.generate(chat(), RequestContext())).backend_id == "node-b"
    try:
        await manager.generate(chat(), RequestContext(hops=("node-c",)))
    except BackendUnavailableError:
        pass
    else:
        raise AssertionError("a request that came from a peer must not be forwarded to another")
    assert libp2p.calls + http.calls == 1


class SlowToStart(ScriptedBackend):
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(5)  # e.g. a WebSocket waiting out its connect timeout
        await super().run(task_status=task_status)


async def test_protocols_start_side_by_side(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    hybrid = node_over(SlowToStart("node-b/ws"), SlowToStart("node-b/http"), SlowToStart("node-b/p2p"))
    started = trio.current_time()
    await nursery.start(hybrid.run)
    assert trio.current_time() - started < 6  # the slowest start, not the sum of them
    assert hybrid.status is BackendStatus.HEALTHY
