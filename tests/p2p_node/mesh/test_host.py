"""Two and three real libp2p hosts in one process, on loopback: adverts, inference
streams, cancellation, misbehaving peers."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2p_node.mesh import wire
from p2p_node.mesh.framed import FramedStream, StreamBroken
from p2p_node.mesh.host import MeshHost, MeshSettings

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class Served:
    """The serving side's injected callback: echoes the prompt word by word."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests: list[tuple[dict[str, Any], str]] = []
        self.closed = 0

    async def __call__(self, message: dict[str, Any], peer: str) -> AsyncGenerator[dict[str, Any], None]:
        self.requests.append((message, peer))
        try:
            words = str(message["payload"].get("prompt", "")).split()
            for word in words:
                await trio.sleep(self.delay)
                yield wire.chunk(message["id"], word + " ")
            yield wire.done(message["id"], "stop", 3, len(words))
        finally:
            self.closed += 1


def advert_of(models: list[str]) -> Any:
    return lambda: {"version": "test", "models": [{"id": m, "task": "chat"} for m in models], "load": {"in_flight": 0}}


async def start_host(
    nursery: trio.Nursery, serve: Served | None = None, models: list[str] | None = None, **settings: Any
) -> MeshHost:
    host = MeshHost(
        MeshSettings(listen=LOOPBACK, advert_interval_s=0.1, keepalive_s=0.5, **settings),
        create_new_key_pair(),
        serve or Served(),
        advert_of(models or []),
    )
    await nursery.start(host.run)
    return host


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    # Polling is the point: these are observations of state owned by libp2p's tasks.
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def collect(host: MeshHost, peer: str, prompt: str, request_id: str = "r1") -> list[dict[str, Any]]:
    request = wire.request(request_id, "completion", "m", {"prompt": prompt}, [host.peer_id])
    replies = []
    async with host.open_inference(peer, request) as stream:
        while (message := await stream.receive()) is not None:
            replies.append(message)
            if message["t"] in (wire.DONE, wire.ERROR, wire.RESULT):
                break
    return replies


async def test_bootstrapped_peers_exchange_adverts_and_measure_rtt(nursery: trio.Nursery) -> None:
    a = await start_host(nursery, models=["alpha"])
    b = await start_host(nursery, models=["beta"], bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peer_id in a.peers and b.peers[a.peer_id].advert)
    await wait_until(lambda: a.peers[b.peer_id].advert and b.peers[a.peer_id].rtt_s is not None)
    assert [m["id"] for m in b.peers[a.peer_id].advert["models"]] == ["alpha"]
    assert [m["id"] for m in a.peers[b.peer_id].advert["models"]] == ["beta"]
    assert 0 < b.peers[a.peer_id].rtt_s < 1  # type: ignore[operator]


async def test_a_request_streams_chunks_then_done(nursery: trio.Nursery) -> None:
    served = Served()
    a = await start_host(nursery, served)
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    replies = await collect(b, a.peer_id, "one two three")
    assert [r["text"] for r in replies if r["t"] == wire.CHUNK] == ["one ", "two ", "three "]
    assert replies[-1]["t"] == wire.DONE and replies[-1]["usage"]["completion_tokens"] == 3
    assert served.requests[0][1] == b.peer_id  # the server knows who asked (Noise-authenticated)


async def test_leaving_early_cancels_the_request_at_the_serving_peer(nursery: trio.Nursery) -> None:
    served = Served(delay=0.2)
    a = await start_host(nursery, served)
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    request = wire.request("r2", "completion", "m", {"prompt": "w " * 100}, [b.peer_id])
    async with b.open_inference(a.peer_id, request) as stream:
        first = await stream.receive()
        assert first is not None and first["t"] == wire.CHUNK
    await wait_until(lambda: served.closed == 1, timeout=5)
    # The host still serves afterwards (a cancelled request never takes the listener down).
    assert (await collect(b, a.peer_id, "still here", "r3"))[-1]["t"] == wire.DONE


async def test_a_request_that_already_passed_through_the_node_is_refused(nursery: trio.Nursery) -> None:
    a = await start_host(nursery)
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    request = wire.request("r4", "completion", "m", {"prompt": "x"}, [b.peer_id, a.peer_id])
    async with b.open_inference(a.peer_id, request) as stream:
        reply = await stream.receive()
    assert reply is not None and reply["t"] == wire.ERROR and reply["code"] == "loop"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1",  # undecodable msgpack
        b"\xff\xff\xff\xff",  # a frame far over the size limit
        wire.encode({"t": "chunk", "id": "x", "text": "not a request"}),
    ],
)
async def test_malformed_first_frames_get_an_error_and_the_host_keeps_serving(
    nursery: trio.Nursery, garbage: bytes
) -> None:
    a = await start_host(nursery)
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    raw = await b._host.new_stream(ID.from_base58(a.peer_id), [TProtocol(wire.INFERENCE_PROTOCOL)])
    await raw.write(garbage)
    framed = FramedStream(raw, read_timeout_s=5)
    try:
        reply = await framed.receive()
        assert reply is None or reply["t"] == wire.ERROR
    except StreamBroken:
        pass  # reset is an acceptable answer to garbage
    assert (await collect(b, a.peer_id, "alive"))[-1]["t"] == wire.DONE


async def test_a_peer_that_stops_mid_frame_times_out_instead_of_hanging(nursery: trio.Nursery) -> None:
    a = await start_host(nursery, request_first_frame_timeout_s=0.5)
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    raw = await b._host.new_stream(ID.from_base58(a.peer_id), [TProtocol(wire.INFERENCE_PROTOCOL)])
    await raw.write(wire.encode(wire.request("r", "chat", "m", {}, []))[:7])  # half a frame, then silence
    with trio.fail_after(5):
        try:
            await FramedStream(raw, read_timeout_s=5).receive()
        except StreamBroken:
            pass
    assert (await collect(b, a.peer_id, "alive"))[-1]["t"] == wire.DONE


async def test_peers_outside_the_allow_list_are_refused(nursery: trio.Nursery) -> None:
    allowed_key = create_new_key_pair()
    from p2p_node.mesh.identity import peer_id_of

    a = await start_host(nursery, allow_peers=frozenset({peer_id_of(allowed_key)}))
    stranger = await start_host(nursery, bootstrap=[a.addrs[0]])
    await trio.sleep(1.5)
    assert stranger.peer_id not in a.peers or not a.peers[stranger.peer_id].advert
    with pytest.raises((StreamBroken, Exception)):
        await collect(stranger, a.peer_id, "let me in")


async def test_without_the_mesh_secret_a_node_cannot_connect(nursery: trio.Nursery) -> None:
    a = await start_host(nursery, secret="correct horse battery staple")
    member = await start_host(nursery, secret="correct horse battery staple", bootstrap=[a.addrs[0]])
    outsider = await start_host(nursery, secret="wrong", bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in member.peers and member.peers[a.peer_id].advert)
    await trio.sleep(1.0)
    assert outsider.peer_id not in a.peers
    assert a.peer_id not in outsider.peers or not outsider.peers[a.peer_id].advert


@pytest.mark.slow
async def test_a_peer_that_never_reads_cannot_wedge_the_server(nursery: trio.Nursery) -> None:
    served = Served()
    a = await start_host(nursery, served)
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    huge = " ".join(["word"] * 20_000)  # ~600 kB of frames: more than a Yamux window (256 kB)
    request = wire.request("stuck", "completion", "m", {"prompt": huge}, [b.peer_id])
    async with b.open_inference(a.peer_id, request):
        # Never read: the server's writes stall; its write timeout must end the request.
        await wait_until(lambda: served.closed == 1, timeout=40)
    assert (await collect(b, a.peer_id, "still serving", "after"))[-1]["t"] == wire.DONE
