"""One libp2p host per node: it listens, dials bootstrap and discovered peers, exchanges
capability adverts, and carries inference requests both ways.

Designed around py-libp2p 0.8.1's measured faults (../shared/notes/libp2p.md):
Noise only (a listener would otherwise accept plaintext), one connection per peer (no
250 ms happy-eyeballs wait), every stream handler guarded (an escaping exception stops the
host serving), timeouts on every read (a silent peer must not hang us), explicit done /
error frames (a peer going away looks like a clean EOF).

Healing after a partition (issue 4) rests on three rules. We dial a peer at the address it
was found at, never through libp2p's peerstore: identify overwrites that with what the peer
announces (py-libp2p announces a wildcard listener as 0.0.0.0, which each dialer reaches as
itself), and a failed dial bars the peer for 60 s. We announce dialable addresses, so the
peerstore that libp2p's own dials use is right too. And an advert stream silent for the
advert TTL means the connections under it are dead: both sides close them, so nothing
(redials, inference requests) can pick them again.

The host knows nothing of backends: `serve` (a request frame → an async iterator of reply
frames) and `local_advert` (what this node offers now) are injected by the node.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from p2p_node.mesh import wire
from p2p_node.mesh.framed import FramedStream, PeerSilent, StreamBroken
from p2p_node.mesh.identity import peer_id_of
from p2p_node.mesh.inference_streams import TERMINAL, InferenceCall, StreamPool
from p2p_node.mesh.libp2p_workarounds import (
    InboundHandlerReaper,
    batch_yamux_window_updates,
    buffer_tcp_reads,
    eager_locks_in_libp2p_streams,
)
from p2p_node.mesh.mdns import interface_addresses

log = logging.getLogger(__name__)

# Closing a connection to a dead peer may wait on writes that never drain.
CLOSE_TIMEOUT_S = 3.0
# How long an address we dialed stays in libp2p's peerstore (its own dials may use it).
PEERSTORE_TTL_S = 600

ServeFn = Callable[[dict[str, Any], str], AsyncGenerator[dict[str, Any], None]]
AdvertFn = Callable[[], dict[str, Any]]


@dataclass
class MeshSettings:
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    # Without the secret a node can neither connect (libp2p private network) nor ask.
    secret: str | None = None
    # When set, only these peer ids may connect, advertise or ask for inference.
    allow_peers: frozenset[str] = frozenset()
    advert_interval_s: float = 1.0  # at most one advert per peer per interval
    keepalive_s: float = 5.0  # adverts and pings at least this often
    advert_ttl_s: float = 15.0  # a peer silent this long is forgotten
    request_first_frame_timeout_s: float = 10.0
    idle_stream_timeout_s: float = 60.0  # a reusable inference stream waits this long for a request
    reconnect_max_backoff_s: float = 10.0
    dial_timeout_s: float = 10.0  # a dial and the first stream on it


@dataclass
class PeerState:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    advert: dict[str, Any] = field(default_factory=dict)
    advert_at: float = 0.0
    rtt_s: float | None = None
    connected: bool = False
    adverts_received: int = 0


class MeshHost:
    def __init__(
        self,
        settings: MeshSettings,
        key_pair: KeyPair,
        serve: ServeFn,
        local_advert: AdvertFn,
        on_peers_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.key_pair = key_pair
        self.peer_id = peer_id_of(key_pair)
        self._serve = serve
        self._local_advert = local_advert
        self._on_peers_changed = on_peers_changed
        self.peers: dict[str, PeerState] = {}
        self.addrs: list[str] = []
        self.adverts_sent = 0
        self._host: Any = None
        self._nursery: trio.Nursery | None = None
        self._dialing: set[str] = set()
        self._targets: dict[str, str] = {}  # peer id → the address its keeper dials
        self._stream_pool = StreamPool()  # idle reusable inference streams, per peer
        self._redial_now: dict[str, trio.Event] = {}
        self._advert_streams: dict[str, int] = {}  # peer id → advert streams open with it
        self._advert_seq = 0
        self._last_advert_body: dict[str, Any] | None = None

    # ---- running ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        batch_yamux_window_updates()  # one WINDOW_UPDATE per token otherwise
        buffer_tcp_reads()  # two recvs and four checkpoints per Noise message otherwise
        eager_locks_in_libp2p_streams()  # a scheduler pass per lock per frame otherwise
        noise = NoiseTransport(self.key_pair, noise_privkey=create_x25519_key_pair().private_key)
        psk = hashlib.sha256(self.settings.secret.encode()).hexdigest() if self.settings.secret else None
        self._host = new_host(
            key_pair=self.key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_preference="YAMUX",
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            psk=psk,
            addrs_factory=_announceable,
        )
        InboundHandlerReaper(self._host.get_network())  # libp2p leaks inbound slots otherwise (issue 4)
        for protocol in (wire.INFERENCE_PROTOCOL_REUSABLE, wire.INFERENCE_PROTOCOL):
            self._host.set_stream_handler(TProtocol(protocol), self._guarded(self._handle_inference))
        self._host.set_stream_handler(TProtocol(wire.ADVERT_PROTOCOL), self._guarded(self._handle_advert))
        listen = [multiaddr.Multiaddr(a) for a in self.settings.listen]
        async with self._host.run(listen_addrs=listen), trio.open_nursery() as nursery:
            self._nursery = nursery
            self.addrs = _dialable(
                [_with_peer_id(str(a), self.peer_id) for a in self._host.get_addrs()], interface_addresses()
            )
            for address in self.settings.bootstrap:
                self.connect(address)
            nursery.start_soon(self._forget_silent_peers)
            task_status.started(self.addrs)
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                await self._close_everything()

    async def _close_everything(self) -> None:
        """libp2p closes its connections and listeners on the way out too, but unshielded:
        cancelled, it stops at the first, leaving sockets open (a stopped host still
        accepted TCP connections) for as long as the process lives."""
        network = self._host.get_network()
        await self._close_connections([c for conns in network.get_connections_map().values() for c in conns])
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
            for listener in list(network.listeners.values()):
                try:
                    await listener.close()
                except Exception as exc:
                    log.debug("closing a listener: %s", exc)

    def connect(self, address: str) -> None:
        """Keep a connection to the peer at `address` (a /p2p/ multiaddr), redialing with
        backoff while it's unreachable. One keeper per peer: a later address for a peer
        (found again by mDNS, or moved) replaces the one it dials and cuts its wait short."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        except Exception as exc:
            log.warning("ignoring peer address %s: %s", address, exc)
            return
        peer = str(info.peer_id)
        if peer == self.peer_id or self._nursery is None:
            return
        self._targets[peer] = address
        if peer in self._dialing:
            self._redial_now[peer].set()
            return
        self._dialing.add(peer)
        self._redial_now[peer] = trio.Event()
        self._nursery.start_soon(self._keep_connected, peer)

    async def _keep_connected(self, peer: str) -> None:
        peer_id = ID.from_base58(peer)
        backoff = 0.5
        try:
            while True:
                address = self._targets[peer]
                try:
                    stream = await self._open_advert_stream(peer_id, address)
                except Exception as exc:  # unreachable, refused, timed out: try again later
                    log.debug("peer %s at %s: %s", peer, address, _describe(exc))
                else:
                    backoff = 0.5
                    log.info("connected to peer %s at %s", peer, address)
                    try:
                        outcome = await self._exchange_adverts(FramedStream(stream), peer)
                    except Exception as exc:  # a bug here must not take the whole host down
                        outcome = _describe(exc)
                    log.info("advert stream with peer %s ended: %s", peer, outcome)
                # Found again meanwhile (mDNS, a new address): no point waiting out the backoff.
                if not self._redial_now[peer].is_set():
                    with trio.move_on_after(backoff):
                        await self._redial_now[peer].wait()
                self._redial_now[peer] = trio.Event()
                backoff = min(backoff * 2, self.settings.reconnect_max_backoff_s)
        finally:
            self._dialing.discard(peer)
            self._redial_now.pop(peer, None)

    async def _open_advert_stream(self, peer_id: ID, address: str) -> Any:
        tried: list[Any] = []
        try:
            with trio.fail_after(self.settings.dial_timeout_s):
                if not self._connections(peer_id):
                    await self._dial(peer_id, address)
                tried = self._connections(peer_id)
                return await self._host.new_stream(peer_id, [TProtocol(wire.ADVERT_PROTOCOL)])
        except Exception:
            # A connection that opens no stream is dead or wedged; left registered, every
            # redial and every inference request would pick it again.
            await self._close_connections(tried)
            raise

    async def _dial(self, peer_id: ID, address: str) -> None:
        """Dial exactly `address`, not `host.connect`: that dials the first address in the
        peerstore (identify's, not ours) and bars a peer for 60 s after a failed dial,
        while our keeper has its own backoff."""
        maddr = multiaddr.Multiaddr(address)
        self._host.get_peerstore().add_addrs(peer_id, info_from_p2p_addr(maddr).addrs, PEERSTORE_TTL_S)
        network = self._host.get_network()
        await network.dial_addr(maddr, peer_id)
        network.unblock_peer(peer_id)  # libp2p's own dials (a request's new_stream) may go again

    def _connections(self, peer_id: ID) -> list[Any]:
        """Live connections to the peer. A closed one still registered (a close cut short)
        is dropped from the swarm: `host.connect` would take it for a live one."""
        network = self._host.get_network()
        live = []
        for conn in network.get_connections(peer_id):
            if conn.is_closed:
                network.remove_conn(conn)
            else:
                live.append(conn)
        return live

    async def _close_connections(self, connections: list[Any]) -> None:
        if not connections:
            return
        # Shielded, with a deadline of its own: a close cut short by our caller's
        # cancellation would leave the connection registered.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
            for conn in connections:
                try:
                    await conn.close()
                except Exception as exc:
                    log.debug("closing a connection to %s: %s", conn.muxed_conn.peer_id, exc)
        network = self._host.get_network()
        for conn in connections:
            if conn in network.get_connections(conn.muxed_conn.peer_id):
                network.remove_conn(conn)

    async def _drop_silent_connections(self, peer: str) -> None:
        """The peer said nothing for the advert TTL: every connection to it that is older
        than that silence is dead (a silent partition leaves no FIN, no RST). One opened
        since (the peer already redialed) is kept."""
        cutoff = time.time() - self.settings.advert_ttl_s
        stale = [c for c in self._connections(ID.from_base58(peer)) if getattr(c, "_created_at", 0.0) <= cutoff]
        if stale:
            log.info("closing %d silent connection(s) to peer %s", len(stale), peer)
            for framed in self._stream_pool.drop(peer):
                await framed.reset()
        await self._close_connections(stale)

    def _guarded(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def guarded(stream: Any) -> None:
            try:
                await handler(stream)
            except Exception as exc:  # never let a peer's misbehaviour stop the host
                log.info("stream handler %s: %s", handler.__name__, exc)
                await FramedStream(stream).reset()

        return guarded

    def _allowed(self, peer: str) -> bool:
        return not self.settings.allow_peers or peer in self.settings.allow_peers

    # ---- adverts ----------------------------------------------------------------------

    async def _handle_advert(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if not self._allowed(peer):
            log.warning("refused advert stream from peer %s (not in the allow-list)", peer)
            await FramedStream(stream).reset()
            return
        outcome = await self._exchange_adverts(FramedStream(stream), peer)
        log.debug("advert stream from peer %s ended: %s", peer, outcome)

    def current_advert(self) -> dict[str, Any]:
        body = self._local_advert()
        if body != self._last_advert_body:
            self._last_advert_body = body
            self._advert_seq += 1
        return {"t": wire.ADVERT, "peer_id": self.peer_id, "seq": self._advert_seq, "addrs": self.addrs, **body}

    async def _exchange_adverts(self, framed: FramedStream, peer: str) -> str:
        """Adverts and pings both ways until the stream ends; returns why it ended."""
        self._advert_streams[peer] = self._advert_streams.get(peer, 0) + 1
        self._state(peer)
        pings: dict[int, float] = {}
        outcome = "closed by the peer"
        silent = False
        try:
            async with trio.open_nursery() as nursery:

                async def push() -> None:
                    nonlocal outcome
                    try:
                        await self._push_adverts(framed, pings)
                    except StreamBroken as exc:
                        outcome = str(exc)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(push)
                try:
                    await self._read_adverts(framed, peer, pings)
                except PeerSilent as exc:
                    outcome, silent = f"{exc} (silent for {self.settings.advert_ttl_s:g}s)", True
                except (StreamBroken, wire.WireError) as exc:
                    outcome = str(exc)
                nursery.cancel_scope.cancel()
        finally:
            self._advert_streams[peer] -= 1
            if not self._advert_streams[peer]:
                del self._advert_streams[peer]
                if peer in self.peers:
                    self.peers[peer].connected = False
            await framed.reset()
        if silent:
            await self._drop_silent_connections(peer)
        return outcome

    def _state(self, peer: str) -> PeerState:
        state = self.peers.get(peer)
        if state is None:
            state = self.peers[peer] = PeerState(peer)
        state.connected = peer in self._advert_streams
        return state

    async def _push_adverts(self, framed: FramedStream, pings: dict[int, float]) -> None:
        sent_seq = -1
        last_sent = -math.inf
        ping_n = 0
        while True:
            advert = self.current_advert()
            now = trio.current_time()
            if advert["seq"] != sent_seq or now - last_sent >= self.settings.keepalive_s:
                await framed.send(advert)
                self.adverts_sent += 1
                sent_seq, last_sent = advert["seq"], now
                ping_n += 1
                pings[ping_n] = trio.current_time()
                await framed.send({"t": wire.PING, "n": ping_n})
            await trio.sleep(self.settings.advert_interval_s)

    async def _read_adverts(self, framed: FramedStream, peer: str, pings: dict[int, float]) -> None:
        while True:
            message = await framed.receive(timeout_s=self.settings.advert_ttl_s)
            if message is None:
                return
            kind = message["t"]
            if kind == wire.PING:
                await framed.send({"t": wire.PONG, "n": message["n"]})
            elif kind == wire.PONG:
                sent = pings.pop(message["n"], None)
                state = self.peers.get(peer)
                if sent is not None and state is not None:
                    sample = trio.current_time() - sent
                    state.rtt_s = sample if state.rtt_s is None else 0.8 * state.rtt_s + 0.2 * sample
            elif kind == wire.ADVERT:
                if message["peer_id"] != peer:  # a peer may only speak for itself
                    raise StreamBroken(f"peer {peer} sent an advert for {message['peer_id']}")
                # Looked up again: the peer may have been forgotten while this stream was
                # silent (a partition that healed before the read timed out).
                state = self._state(peer)
                capabilities_changed = _capabilities(message) != _capabilities(state.advert)
                state.advert, state.advert_at = message, trio.current_time()
                state.addrs = [str(a) for a in message.get("addrs", [])]
                state.adverts_received += 1
                if capabilities_changed:
                    self._on_peers_changed()

    async def _forget_silent_peers(self) -> None:
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            silent = [p for p, s in self.peers.items() if now - s.advert_at > self.settings.advert_ttl_s]
            for peer in silent:
                if self.peers[peer].connected and not self.peers[peer].advert:
                    continue  # connected, first advert still on its way
                log.info("forgetting peer %s (no advert for %.0fs)", peer, now - self.peers[peer].advert_at)
                del self.peers[peer]
            if silent:
                self._on_peers_changed()

    # ---- inference: serving ----------------------------------------------------------

    async def _handle_inference(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        framed = FramedStream(stream)
        if not self._allowed(peer):
            log.warning("refused inference stream from peer %s (not in the allow-list)", peer)
            await framed.reset()
            return
        message: dict[str, Any] | None = None
        served = 0
        while True:
            if message is None:
                timeout = (
                    self.settings.request_first_frame_timeout_s if served == 0 else self.settings.idle_stream_timeout_s
                )
                try:
                    message = await framed.receive(timeout_s=timeout)
                except wire.WireError as exc:
                    await framed.send(wire.error("", "bad_frame", str(exc)))
                    break
                except StreamBroken:
                    break  # an idle stream timed out or the client went away: nothing lost
                if message is None and served:
                    break  # the client closed its idle stream
            if message is None or message["t"] != wire.REQUEST:
                await framed.send(wire.error("", "bad_request", "the first frame must be a request"))
                break
            request_id = message["id"]
            if self.peer_id in message["hops"]:
                await framed.send(wire.error(request_id, "loop", "this request already passed through this node"))
                served += 1
                message = None
                if framed.reusable:
                    continue
                break
            outcome, message = await self._answer(framed, message, peer)
            served += 1
            if outcome is not None:
                with trio.move_on_after(2), trio.CancelScope(shield=True):
                    try:
                        await framed.send(outcome)
                    except StreamBroken:
                        pass
                break
            if not framed.reusable:
                break
        await framed.close()

    async def _answer(
        self, framed: FramedStream, message: dict[str, Any], peer: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Stream the reply. Returns a last frame still to send (an error, after which the
        stream is done), and the client's next request if it arrived meanwhile."""
        request_id = message["id"]
        cancelled_by_peer = False
        replied = False
        next_request: dict[str, Any] | None = None
        send_replies, receive_replies = trio.open_memory_channel[dict[str, Any]](64)
        async with trio.open_nursery() as nursery:

            async def watch_for_cancel() -> None:
                nonlocal cancelled_by_peer, next_request
                # Before the answer ends, anything from the client is a cancel (or it left);
                # after it, on a reusable stream, its next request.
                try:
                    frame = await framed.receive(timeout_s=math.inf)
                except (StreamBroken, wire.WireError):
                    frame = None
                if replied:
                    if frame is not None and frame["t"] == wire.REQUEST:
                        next_request = frame
                    return
                cancelled_by_peer = True
                nursery.cancel_scope.cancel()

            async def produce() -> None:
                async with send_replies, aclosing(self._serve(message, peer)) as replies:
                    async for reply in replies:
                        await send_replies.send(reply)

            nursery.start_soon(watch_for_cancel)
            nursery.start_soon(produce)
            try:
                # Not closed on the way out: the producer, blocked on a full channel, is
                # cancelled with the nursery rather than failing on a closed one.
                async for reply in receive_replies:
                    # A writer that fell behind sends what piled up as one frame.
                    batch = [reply]
                    while True:
                        try:
                            batch.append(receive_replies.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    for frame in wire.merge_chunks(batch):
                        # Set before the terminal frame goes out: the client may send its
                        # next request the moment it reads it.
                        replied = replied or frame["t"] in TERMINAL
                        await framed.send(frame)
            except StreamBroken:
                cancelled_by_peer = True
            nursery.cancel_scope.cancel()
        if cancelled_by_peer:
            return wire.error(request_id, "cancelled", "cancelled by the requesting peer"), None
        return None, next_request

    # ---- inference: asking -----------------------------------------------------------

    @asynccontextmanager
    async def open_inference(self, peer: str, request: dict[str, Any]) -> AsyncIterator[InferenceCall]:
        """A stream carrying `request` to `peer`; read its replies with `receive()`.
        Leaving the block early (cancellation, error) cancels the request at the peer.
        Streams are reused for later requests when the peer speaks the reusable protocol."""
        if self._host is None:
            raise StreamBroken("the mesh is not running")
        framed, expired = self._stream_pool.take(peer)
        for stale in expired:
            await stale.close()
        reused = framed is not None
        if framed is None:
            framed = await self._new_inference_stream(peer)
        call = InferenceCall(framed, request, reused, partial(self._new_inference_stream, peer))
        finished = False
        try:
            await call.framed.send(request)
            yield call
            finished = True
        finally:
            framed = call.framed
            if finished and call.ended and framed.reusable and self._stream_pool.give(peer, framed):
                pass  # kept for the next request
            elif finished:
                await framed.close()
            else:
                with trio.move_on_after(1), trio.CancelScope(shield=True):
                    try:
                        await framed.send(wire.cancel(request["id"]))
                    except (StreamBroken, wire.WireError):
                        pass
                await framed.reset()

    async def _new_inference_stream(self, peer: str) -> FramedStream:
        peer_id = ID.from_base58(peer)
        protocols = [TProtocol(wire.INFERENCE_PROTOCOL_REUSABLE), TProtocol(wire.INFERENCE_PROTOCOL)]
        try:
            with trio.fail_after(self.settings.dial_timeout_s):
                # Left to libp2p, a connection still closing (dropped as silent a moment
                # ago) fails the request instead of being replaced by a fresh one.
                if not self._connections(peer_id) and peer in self._targets:
                    await self._dial(peer_id, self._targets[peer])
                stream = await self._host.new_stream(peer_id, protocols)
        except Exception as exc:  # libp2p's own errors, a dial refused, a timeout
            raise StreamBroken(f"no stream to peer {peer}: {_describe(exc)}") from None
        return FramedStream(stream)

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "peer_id": self.peer_id,
            "addrs": self.addrs,
            "adverts_sent": self.adverts_sent,
            "peers": [
                {
                    "peer_id": p.peer_id,
                    "addrs": p.addrs,
                    "connected": p.connected,
                    "rtt_ms": round(p.rtt_s * 1000, 2) if p.rtt_s is not None else None,
                    "advert_age_s": round(now - p.advert_at, 1),
                    "models": sorted({m.get("id", "") for m in p.advert.get("models", [])}),
                    "load": p.advert.get("load", {}),
                    "version": p.advert.get("version"),
                }
                for p in self.peers.values()
            ],
        }


def _capabilities(advert: dict[str, Any]) -> Any:
    """What, in an advert, changes the peer's backend (not its load)."""
    return (advert.get("models"), advert.get("backend_types"), advert.get("hardware"))


def _announceable(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """What identify tells peers to dial us at (libp2p calls this on every identify).
    py-libp2p would announce a wildcard listener as is, and a peer dialing 0.0.0.0 reaches
    itself; the peer's libp2p then fails the Noise handshake (wrong peer id) on every dial."""
    dialable = _dialable([str(a) for a in addrs], interface_addresses())
    return [multiaddr.Multiaddr(a) for a in dialable if not a.startswith("/ip6/::/")]


def _describe(exc: BaseException) -> str:
    """An exception for a log line: trio's one-exception groups say nothing themselves."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _dialable(addrs: list[str], local_ips: list[str]) -> list[str]:
    """A wildcard listen address (0.0.0.0) means every interface: say which, so that the
    addresses we show and advertise can be dialed."""
    out: list[str] = []
    for addr in addrs:
        if addr.startswith("/ip4/0.0.0.0/"):
            out += [addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in [*local_ips, "127.0.0.1"]]
        else:
            out.append(addr)
    return out


def tcp_port(addrs: list[str]) -> int:
    for addr in addrs:
        parts = addr.split("/")
        if "tcp" in parts:
            return int(parts[parts.index("tcp") + 1])
    raise ValueError(f"no TCP address among {addrs}")


def _with_peer_id(address: str, peer_id: str) -> str:
    return address if "/p2p/" in address else f"{address}/p2p/{peer_id}"


def default_key_path() -> Path:
    return Path("~/.config/p2p-node/identity.key").expanduser()
