"""Two and three real libp2p hosts in one process, on loopback: adverts, inference
streams, cancellation, misbehaving peers."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from functools import partial
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from p2p_node.mesh import wire
from p2p_node.mesh.framed import FramedStream, StreamBroken
from p2p_node.mesh.host import MeshHost, MeshSettings, tcp_port
from tests.conftest import wait_until

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
        MeshSettings(**{"listen": LOOPBACK, "advert_interval_s": 0.1, "keepalive_s": 0.5, **settings}),
        create_new_key_pair(),
        serve or Served(),
        advert_of(models or []),
    )
    await nursery.start(host.run)
    return host


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
    served = Served(delay=0.02)  # paced like a model: one frame per chunk
    a = await start_host(nursery, served)
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    replies = await collect(b, a.peer_id, "one two three")
    assert [r["text"] for r in replies if r["t"] == wire.CHUNK] == ["one ", "two ", "three "]
    assert replies[-1]["t"] == wire.DONE and replies[-1]["usage"]["completion_tokens"] == 3
    assert served.requests[0][1] == b.peer_id  # the server knows who asked (Noise-authenticated)


async def test_chunks_that_pile_up_behind_the_writer_go_out_merged(nursery: trio.Nursery) -> None:
    a = await start_host(nursery, Served())  # every chunk at once: faster than any writer
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    words = [f"w{i}" for i in range(200)]
    replies = await collect(b, a.peer_id, " ".join(words))
    chunks = [r["text"] for r in replies if r["t"] == wire.CHUNK]
    assert "".join(chunks) == "".join(w + " " for w in words)  # nothing lost, nothing reordered
    assert len(chunks) < len(words)
    assert replies[-1]["t"] == wire.DONE


async def test_a_token_stream_does_not_send_a_window_update_back_per_token(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Yamux credit returned after every read cost a frame each way per token (py-libp2p 0.8.1).
    updates = 0
    send_window_update = YamuxStream.send_window_update

    async def counted(self: YamuxStream, *args: Any, **kwargs: Any) -> None:
        nonlocal updates
        updates += 1
        await send_window_update(self, *args, **kwargs)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    a = await start_host(nursery, Served(delay=0.001))  # paced: one frame per token
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    before = updates
    replies = await collect(b, a.peer_id, " ".join(f"w{i}" for i in range(100)))
    assert len([r for r in replies if r["t"] == wire.CHUNK]) > 50
    assert updates - before < 5  # credit goes back in batches, not one frame per read


async def test_reading_a_token_stream_takes_about_one_scheduler_pass_per_token(nursery: trio.Nursery) -> None:
    # py-libp2p 0.8.1 takes several uncontended trio locks per read (each a checkpoint, i.e. a
    # trip through the scheduler) and two socket reads per Noise message; per token relayed.
    a = await start_host(nursery, Served(delay=0.001))  # paced: one frame per token
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    await collect(b, a.peer_id, "warm up")
    reader = trio.lowlevel.current_task()
    steps = 0

    class CountReaderSteps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            nonlocal steps
            steps += task is reader

    instrument = CountReaderSteps()
    trio.lowlevel.add_instrument(instrument)
    try:
        replies = await collect(b, a.peer_id, " ".join(f"w{i}" for i in range(100)))
    finally:
        trio.lowlevel.remove_instrument(instrument)
    chunks = len([r for r in replies if r["t"] == wire.CHUNK])
    assert chunks > 50
    assert steps / chunks < 1.5, f"{steps} scheduler passes for {chunks} chunks"


async def test_answers_many_windows_long_flow_through_batched_credit(nursery: trio.Nursery) -> None:
    class Bulky(Served):
        async def __call__(self, message: dict[str, Any], peer: str) -> AsyncGenerator[dict[str, Any], None]:
            for _ in range(12):  # 12 x 200 KB: nine times Yamux's initial 256 KiB window
                yield wire.chunk(message["id"], "x" * 200_000)
            yield wire.done(message["id"], "stop", 1, 12)

    a = await start_host(nursery, Bulky())
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    for request_id in ("r1", "r2"):  # and again on the reused stream
        with trio.fail_after(20):
            replies = await collect(b, a.peer_id, "big", request_id)
        assert sum(len(r["text"]) for r in replies if r["t"] == wire.CHUNK) == 12 * 200_000
        assert replies[-1]["t"] == wire.DONE


async def test_consecutive_requests_to_a_peer_reuse_one_stream(nursery: trio.Nursery) -> None:
    a = await start_host(nursery, Served())
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    assert (await collect(b, a.peer_id, "first", "r1"))[-1]["t"] == wire.DONE
    pooled = b._stream_pool.take(a.peer_id)[0]
    assert pooled is not None and pooled.reusable
    b._stream_pool.give(a.peer_id, pooled)
    second = await collect(b, a.peer_id, "second answer", "r2")
    assert "".join(r["text"] for r in second if r["t"] == wire.CHUNK) == "second answer "
    assert b._stream_pool.take(a.peer_id)[0] is pooled  # the same stream carried both


async def test_a_reused_stream_the_server_closed_is_replaced_without_losing_the_request(
    nursery: trio.Nursery,
) -> None:
    served = Served()
    a = await start_host(nursery, served, idle_stream_timeout_s=0.2)
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: a.peer_id in b.peers and b.peers[a.peer_id].advert)
    await collect(b, a.peer_id, "first", "r1")
    await trio.sleep(0.6)  # the server closes the idle stream; the client still holds it
    replies = await collect(b, a.peer_id, "asked again", "r2")
    assert "".join(r["text"] for r in replies if r["t"] == wire.CHUNK) == "asked again "
    assert [m["id"] for m, _ in served.requests] == ["r1", "r2"]  # answered once, not twice


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

    served = Served()
    a = await start_host(nursery, served, allow_peers=frozenset({peer_id_of(allowed_key)}))
    stranger = await start_host(nursery, bootstrap=[a.addrs[0]])
    await trio.sleep(1.5)
    assert stranger.peer_id not in a.peers or not a.peers[stranger.peer_id].advert
    try:
        replies = await collect(stranger, a.peer_id, "let me in")
    except StreamBroken:  # the reset reached the request's write; else the read ends at once
        replies = []
    assert replies == []
    assert served.requests == []  # never reached the serving callback


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


class PartitionableLink:
    """A TCP relay standing for the network between two hosts. `cut()` makes it a silent
    partition: bytes in flight vanish, nobody sees a FIN or a RST, and connections opened
    meanwhile are accepted and then hear nothing. `heal()` lets new connections through;
    those that lived through the cut stay dead."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.generation = 0  # bumped by every cut: a connection from before it stays dead
        self.partitioned = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._relay, 0, host="127.0.0.1"))
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()

    def cut(self) -> None:
        self.partitioned = True
        self.generation += 1

    def heal(self) -> None:
        self.partitioned = False

    async def _relay(self, client: trio.SocketStream) -> None:
        generation = self.generation
        async with client:
            if self.partitioned:
                await trio.sleep_forever()
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, generation, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, client, generation, nursery.cancel_scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, generation: int, both: trio.CancelScope
    ) -> None:
        def alive() -> bool:
            return generation == self.generation and not self.partitioned

        try:
            while data := await source.receive_some(65536):
                if alive():
                    await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        if alive():
            both.cancel()  # a clean close passes through; a cut one never arrives


HEALING: dict[str, Any] = {"advert_ttl_s": 1.5, "dial_timeout_s": 1.0, "reconnect_max_backoff_s": 0.5}


def advertising(a: MeshHost, b: MeshHost) -> bool:
    return bool(
        a.peer_id in b.peers and b.peers[a.peer_id].advert and b.peer_id in a.peers and a.peers[b.peer_id].advert
    )


def connections(host: MeshHost, peer: MeshHost) -> list[Any]:
    return list(host._host.get_network().get_connections(ID.from_base58(peer.peer_id)))


async def test_a_silent_partition_drops_the_dead_connection_on_both_sides_and_heals(nursery: trio.Nursery) -> None:
    a = await start_host(nursery, models=["alpha"], **HEALING)
    link = PartitionableLink(tcp_port(a.addrs))
    await nursery.start(link.run)
    b = await start_host(
        nursery, models=["beta"], bootstrap=[f"/ip4/127.0.0.1/tcp/{link.port}/p2p/{a.peer_id}"], **HEALING
    )
    await wait_until(lambda: advertising(a, b))

    link.cut()
    await wait_until(lambda: a.peer_id not in b.peers and b.peer_id not in a.peers)
    # Both ends closed the silent connection, the listening end included: nothing dead is
    # left for a redial or a request to pick. And B's redials went through the link (the
    # address A was found at), not around it to the address A's identify announced.
    await wait_until(lambda: not connections(a, b) and not connections(b, a), timeout=5)
    await trio.sleep(1.0)  # several redials, all into the partition
    assert not connections(a, b) and a.peer_id not in b.peers

    link.heal()
    await wait_until(lambda: advertising(a, b))
    assert (await collect(b, a.peer_id, "asked through the healed link"))[-1]["t"] == wire.DONE
    assert (await collect(a, b.peer_id, "and back"))[-1]["t"] == wire.DONE


async def test_a_wildcard_listener_announces_addresses_its_peers_can_dial(nursery: trio.Nursery) -> None:
    # py-libp2p announces 0.0.0.0 as is; a peer that dials it reaches itself (issue 4).
    a = await start_host(nursery, listen=["/ip4/0.0.0.0/tcp/0"])
    b = await start_host(nursery, bootstrap=[a.addrs[-1]])
    peerstore = b._host.get_peerstore()
    a_id = ID.from_base58(a.peer_id)

    def identified() -> bool:
        try:
            return wire.ADVERT_PROTOCOL in peerstore.get_protocols(a_id)
        except Exception:
            return False

    await wait_until(identified)
    announced = {str(addr).split("/p2p/")[0] for addr in peerstore.addrs(a_id)}
    assert announced == {addr.split("/p2p/")[0] for addr in a.addrs}
    assert not any(addr.startswith("/ip4/0.0.0.0/") for addr in announced)


async def test_a_request_made_while_the_connection_closes_goes_over_a_fresh_one(nursery: trio.Nursery) -> None:
    a = await start_host(nursery)
    b = await start_host(nursery, bootstrap=[a.addrs[0]])
    await wait_until(lambda: advertising(a, b))
    (closing,) = connections(b, a)
    nursery.start_soon(closing.close)
    await closing.event_closed.wait()  # set as the close begins: for a few ms it's still registered
    assert closing in connections(b, a)
    assert (await collect(b, a.peer_id, "still answered"))[-1]["t"] == wire.DONE


async def test_a_stopped_host_closes_its_connections_and_stops_listening(nursery: trio.Nursery) -> None:
    staying = await start_host(nursery, models=["alpha"])
    async with trio.open_nursery() as leaving_scope:
        leaving = await start_host(leaving_scope, models=["beta"], bootstrap=[staying.addrs[0]])
        await wait_until(lambda: leaving.peer_id in staying.peers and staying.peers[leaving.peer_id].connected)
        leaving_network = leaving._host.get_network()
        open_connections = connections(leaving, staying)
        leaving_scope.cancel_scope.cancel()
    assert open_connections and all(c.is_closed for c in open_connections)
    assert not leaving_network.get_connections_map()
    with pytest.raises(OSError):  # nobody listens there any more
        await trio.open_tcp_stream("127.0.0.1", tcp_port(leaving.addrs))
