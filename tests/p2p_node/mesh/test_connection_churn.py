"""A long-lived node keeps accepting connections however many have come and gone before.

py-libp2p 0.8.1 holds one of its inbound slots (and the task that accepted the connection)
per connection ever accepted, until the node stops; these tests churn connections past a
lowered cap and count what the listening node still holds."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from libp2p.rcmgr import Direction

from p2p_node.mesh import wire
from p2p_node.mesh.host import tcp_port
from tests.conftest import wait_until
from tests.p2p_node.mesh.test_host import (
    HEALING,
    PartitionableLink,
    advertising,
    collect,
    connections,
    start_host,
)

# Lowered from libp2p's 250 (max_connections - min_connections) so the test churns past it.
INBOUND_CAP = 3
CYCLES = INBOUND_CAP + 3


def inbound_limiter(host: Any) -> trio.CapacityLimiter:
    limiter: trio.CapacityLimiter = host._host.get_network()._inbound_limiter
    return limiter


def live_inbound(host: Any) -> list[Any]:
    return [
        c for c in host._host.get_network().get_connections() if c.direction == Direction.INBOUND and not c.is_closed
    ]


def inbound_handler_tasks(host: Any) -> list[trio.lowlevel.Task]:
    """Tasks now inside this host's swarm's inbound-connection handler (one per accepted
    connection that still holds a slot), found by walking the whole task tree."""
    swarm = host._host.get_network()
    found: list[trio.lowlevel.Task] = []
    pending: list[Any] = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        pending += [t for n in task.child_nurseries for t in n.child_tasks]
        coro: Any = task.coro
        while coro is not None and hasattr(coro, "cr_frame"):
            frame = coro.cr_frame
            if frame is not None and frame.f_code.co_name == "_handle_inbound_connection":
                if frame.f_locals.get("self") is swarm:
                    found.append(task)
                    break
            coro = coro.cr_await
    return found


async def reconnected(dialer: Any, listener: Any, old: list[Any], cycle: int) -> None:
    try:
        await wait_until(
            lambda: bool(
                (now := connections(dialer, listener))
                and now != old
                and dialer.peers.get(listener.peer_id)
                and dialer.peers[listener.peer_id].connected
            ),
            timeout=5,
        )
    except trio.TooSlowError:
        pytest.fail(f"reconnect {cycle} of {CYCLES} refused (inbound cap {INBOUND_CAP})")


@pytest.mark.parametrize("closed_by", ["dialer", "listener"])
async def test_reconnecting_past_the_inbound_cap_is_still_accepted_and_frees_every_slot(
    nursery: trio.Nursery, closed_by: str
) -> None:
    a = await start_host(nursery)
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await reconnected(b, a, [], 0)
    inbound_limiter(a).total_tokens = INBOUND_CAP
    for cycle in range(1, CYCLES + 1):
        old = connections(b, a)
        closer, peer = (b, a) if closed_by == "dialer" else (a, b)
        await closer._close_connections(connections(closer, peer))
        b.connect(a.addrs[0])  # the keeper redials now instead of after its backoff
        await reconnected(b, a, old, cycle)

    # The fresh connection carries requests, and the listener holds a slot and a handler
    # task for the live connection only.
    assert (await collect(b, a.peer_id, "after the churn"))[-1]["t"] == wire.DONE
    await wait_until(lambda: inbound_limiter(a).borrowed_tokens == len(live_inbound(a)), timeout=3)
    assert len(live_inbound(a)) == 1
    assert len(inbound_handler_tasks(a)) == 1


async def test_a_connection_dropped_as_silent_gives_its_slot_back(nursery: trio.Nursery) -> None:
    a = await start_host(nursery, **HEALING)
    link = PartitionableLink(tcp_port(a.addrs))
    await nursery.start(link.run)
    b = await start_host(nursery, bootstrap=[f"/ip4/127.0.0.1/tcp/{link.port}/p2p/{a.peer_id}"], **HEALING)
    await wait_until(lambda: advertising(a, b))
    assert inbound_limiter(a).borrowed_tokens == 1

    link.cut()  # no FIN, no RST: A closes the connection when its advert stream goes silent
    await wait_until(lambda: not live_inbound(a), timeout=5)
    await wait_until(lambda: inbound_limiter(a).borrowed_tokens == 0, timeout=3)
    assert inbound_handler_tasks(a) == []

    link.heal()
    await wait_until(lambda: advertising(a, b) and bool(live_inbound(a)))
    assert inbound_limiter(a).borrowed_tokens == len(live_inbound(a)) == len(inbound_handler_tasks(a)) == 1
