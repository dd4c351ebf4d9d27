"""The node's side of peering: what it advertises, how it serves a peer's request, and
keeping one backend in the manager per peer the mesh knows (a PeerBackend, or a
PeerHybrid when the peer's HTTP API can be reached too)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import trio

from backends.errors import InferenceError
from backends.manager import BackendManager
from backends.types import ChatRequest, CompletionRequest, EmbeddingRequest, RequestContext
from p2p_node.mesh import wire
from p2p_node.mesh.host import MeshHost
from p2p_node.mesh.mdns import interface_addresses
from p2p_node.peering.peer_backend import PeerBackend
from p2p_node.peering.peer_hybrid import PeerHybrid, build_peer_backend, reachable_api
from p2p_node.peering.translate import parse_request

log = logging.getLogger(__name__)


class Peering:
    def __init__(
        self,
        manager: BackendManager,
        version: str,
        hardware: list[str],
        api_advert: Callable[[], dict[str, Any] | None] = lambda: None,
        peer_protocols: tuple[str, ...] = (),
    ) -> None:
        self.manager = manager
        self.version = version
        self.hardware = hardware
        # Where this node's HTTP API is (None before it listens), and over which protocols
        # besides libp2p this node reaches peers that advertise theirs.
        self.api_advert = api_advert
        self.peer_protocols = peer_protocols
        self.mesh: MeshHost | None = None
        self._changed = trio.Event()

    # ---- what we tell peers ----------------------------------------------------------

    def local_advert(self) -> dict[str, Any]:
        """Only what this node serves itself: peers' models are theirs to advertise."""
        own = [b for b in self.manager.backends() if not b.is_peer and b.status.routable]
        models = sorted(
            {
                (card.id, card.task.value, card.context_window or 0, card.loaded)
                for backend in own
                for card in backend.capabilities.models
            }
        )
        ttfts = [b.metrics.ttft_s.value for b in own if b.metrics.ttft_s.value is not None]
        rates = [b.metrics.tokens_per_s.value for b in own if b.metrics.tokens_per_s.value is not None]
        advert: dict[str, Any] = {
            "version": self.version,
            "models": [
                {"id": m, "task": t, "context_window": w or None, "loaded": loaded} for m, t, w, loaded in models
            ],
            "backend_types": sorted({b.backend_type.value for b in own}),
            "hardware": self.hardware,
            "load": {
                "in_flight": sum(b.metrics.in_flight for b in own),
                "queued": sum(b.queue_size() for b in own),
                # Rounded so that jitter doesn't count as a change worth an advert.
                "ttft_ms": round(min(ttfts) * 1000, -1) if ttfts else None,
                "tokens_per_s": round(max(rates), -1) if rates else None,
            },
        }
        api = self.api_advert()
        if api is not None:
            advert["api"] = api
        return advert

    # ---- serving a peer --------------------------------------------------------------

    async def serve(self, message: dict[str, Any], peer: str) -> AsyncGenerator[dict[str, Any], None]:
        request_id = message["id"]
        deadline_ms = message.get("deadline_ms")
        ctx = RequestContext(
            request_id=request_id,
            deadline=trio.current_time() + deadline_ms / 1000 if isinstance(deadline_ms, int) else None,
            hops=tuple(str(h) for h in message["hops"]) or (peer,),
        )
        try:
            request = parse_request(message["task"], message["model"], message["payload"])
            if isinstance(request, (ChatRequest, CompletionRequest)):
                async with aclosing(self.manager.stream(request, ctx)) as chunks:
                    async for chunk in chunks:
                        if chunk.text:
                            yield wire.chunk(request_id, chunk.text, list(chunk.token_ids))
                        if chunk.finish_reason is not None:
                            usage = chunk.usage
                            yield wire.done(
                                request_id,
                                chunk.finish_reason,
                                usage.prompt_tokens if usage else 0,
                                usage.completion_tokens if usage else 0,
                            )
            elif isinstance(request, EmbeddingRequest):
                embedded = await self.manager.embed(request, ctx)
                payload = {
                    "vectors": [list(v) for v in embedded.vectors],
                    "prompt_tokens": embedded.usage.prompt_tokens,
                }
                yield wire.result(request_id, payload)
            else:
                ranked = await self.manager.rerank(request, ctx)
                hits = [{"index": h.index, "relevance_score": h.relevance_score} for h in ranked.hits]
                yield wire.result(request_id, {"hits": hits, "prompt_tokens": ranked.usage.prompt_tokens})
        except InferenceError as exc:
            yield wire.error(request_id, exc.code, exc.message, exc.retryable)

    # ---- peers as backends -------------------------------------------------------------

    def peers_changed(self) -> None:
        self._changed.set()

    async def keep_backends_in_sync(self, mesh: MeshHost, refresh_s: float = 1.0) -> None:
        """One PeerBackend per advertising peer: added when it appears, updated with its
        load and RTT, removed when the mesh forgets it."""
        self.mesh = mesh
        while True:
            with trio.move_on_after(refresh_s):
                await self._changed.wait()
            self._changed = trio.Event()
            await self._sync(mesh)

    async def _sync(self, mesh: MeshHost) -> None:
        registered = {b.peer_id: b for b in self.manager.backends() if isinstance(b, (PeerBackend, PeerHybrid))}
        local_ips = interface_addresses() if self.peer_protocols else []
        for peer_id, state in list(mesh.peers.items()):
            if not state.advert:
                continue
            backend = registered.pop(peer_id, None)
            if backend is not None and self._api_moved(backend, state.advert, local_ips):
                log.info("peer %s moved its HTTP API; reconnecting to it", peer_id)
                await self.manager.remove(backend.id)
                backend = None
            if backend is None:
                log.info("peer %s joined, serving %s", peer_id, [m.get("id") for m in state.advert.get("models", [])])
                await self.manager.add(
                    build_peer_backend(mesh, peer_id, state.advert, state.rtt_s, self.peer_protocols, local_ips)
                )
            else:
                backend.update(state.advert, state.rtt_s, state.connected)
        for peer_id, backend in registered.items():
            log.info("peer %s left", peer_id)
            await self.manager.remove(backend.id)

    def _api_moved(self, backend: PeerBackend | PeerHybrid, advert: dict[str, Any], local_ips: list[str]) -> bool:
        if not self.peer_protocols:
            return False
        api = reachable_api(advert, local_ips)
        current = backend.api if isinstance(backend, PeerHybrid) else None
        return api != current

    def status(self) -> dict[str, Any]:
        return self.mesh.status() if self.mesh is not None else {"enabled": False}
