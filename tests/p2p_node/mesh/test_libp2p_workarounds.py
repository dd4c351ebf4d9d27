"""The py-libp2p workarounds on their own: buffered TCP reads and the eager lock."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.msgio import FixedSizeLenMsgReadWriter
from libp2p.io.trio import TrioTCPStream

from p2p_node.mesh.libp2p_workarounds import EagerLock, buffer_tcp_reads


class CountingStream:
    """A trio SocketStream that counts the receives that reached the socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.receives = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.receives += 1
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


def connected_pair() -> tuple[TrioTCPStream, CountingStream, socket.socket]:
    buffer_tcp_reads()
    ours, theirs = socket.socketpair()
    counting = CountingStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    tcp = TrioTCPStream(counting)  # type: ignore[arg-type]
    return tcp, counting, theirs


async def test_a_read_returns_at_most_n_bytes_and_keeps_the_rest_in_order() -> None:
    tcp, _, theirs = connected_pair()
    theirs.sendall(b"abcdefgh")
    assert await tcp.read(2) == b"ab"
    assert await tcp.read(3) == b"cde"
    assert await tcp.read() == b"fgh"
    theirs.close()


async def test_length_prefixed_messages_sent_together_cost_one_receive() -> None:
    tcp, counting, theirs = connected_pair()
    bodies = [f"message {i}".encode() * (i + 1) for i in range(10)]
    theirs.sendall(b"".join(struct.pack(">H", len(b)) + b for b in bodies))
    reader = FixedSizeLenMsgReadWriter(tcp)
    reader.size_len_bytes = 2  # Noise's framing: a 2-byte big-endian length
    assert [await reader.read_msg() for _ in bodies] == bodies
    assert counting.receives == 1  # unbuffered: two per message and an EAGAIN between
    theirs.close()


async def test_concurrent_readers_get_the_bytes_in_the_order_sent() -> None:
    tcp, _, theirs = connected_pair()
    sent = bytes(range(200))
    received: list[bytes] = []

    async def read_one_byte_at_a_time() -> None:
        while len(b"".join(received)) < len(sent):
            received.append(await tcp.read(1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_one_byte_at_a_time)
        nursery.start_soon(read_one_byte_at_a_time)
        for i in range(0, len(sent), 50):
            theirs.sendall(sent[i : i + 50])
            await trio.sleep(0.01)
        theirs.close()  # the reader still waiting when the other took the last byte reads EOF
    assert b"".join(received) == sent


async def test_eof_reads_as_empty_bytes_after_the_buffered_ones() -> None:
    tcp, _, theirs = connected_pair()
    theirs.sendall(b"last words")
    theirs.close()
    assert await tcp.read(4) == b"last"
    assert await tcp.read(100) == b" words"
    assert await tcp.read(100) == b""


async def test_a_reset_connection_raises_connection_closed() -> None:
    buffer_tcp_reads()
    theirs = socket.create_server(("127.0.0.1", 0))
    tcp = TrioTCPStream(await trio.open_tcp_stream("127.0.0.1", theirs.getsockname()[1]))
    accepted, _ = theirs.accept()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted.close()  # linger 0: an RST, not a FIN
    with pytest.raises(ConnectionClosedError):
        await tcp.read(10)
    theirs.close()


async def test_an_uncontended_eager_lock_is_taken_without_a_checkpoint() -> None:
    lock = EagerLock()
    with trio.testing.assert_no_checkpoints():  # trio.Lock's acquire always checkpoints
        async with lock:
            assert lock.locked()
    assert not lock.locked()


async def test_a_contended_eager_lock_waits_for_its_holder() -> None:
    lock = EagerLock()
    order: list[str] = []

    async def hold_briefly() -> None:
        async with lock:
            order.append("first in")
            await trio.sleep(0.05)
            order.append("first out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold_briefly)
        await trio.sleep(0.01)
        assert lock.locked()
        async with lock:
            order.append("second in")
    assert order == ["first in", "first out", "second in"]
