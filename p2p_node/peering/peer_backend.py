"""A peer of the mesh, as a backend in the manager: it serves what its advert says."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any, Protocol

import trio

from backends.base import Backend
from backends.errors import BackendFailedError, BackendUnavailableError, InferenceError
from backends.types import (
    BackendStatus,
    BackendType,
    Capabilities,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InferenceRequest,
    ModelCard,
    RequestContext,
    RerankHit,
    RerankRequest,
    RerankResult,
    Task,
    Usage,
    token_ids_from,
)
from p2p_node.mesh import wire
from p2p_node.mesh.framed import StreamBroken
from p2p_node.peering.translate import error_from_frame, request_payload

log = logging.getLogger(__name__)


class MeshClient(Protocol):
    """What a peer backend needs of the mesh host (MeshHost satisfies it)."""

    peer_id: str

    def open_inference(self, peer: str, request: dict[str, Any]) -> Any: ...


class PeerBackend(Backend):
    backend_type = BackendType.P2P

    def __init__(
        self,
        mesh: MeshClient,
        peer_id: str,
        advert: dict[str, Any],
        rtt_s: float | None = None,
        backend_id: str | None = None,
    ) -> None:
        super().__init__(backend_id or f"peer:{peer_id}", name=f"peer {peer_id[:16]}…")
        self.mesh = mesh
        self.peer_id = peer_id
        self.advert = advert
        self.rtt_s = rtt_s
        self.status = BackendStatus.HEALTHY

    def update(self, advert: dict[str, Any], rtt_s: float | None, connected: bool) -> None:
        self.advert = advert
        self.rtt_s = rtt_s
        self.status = BackendStatus.HEALTHY if connected else BackendStatus.UNHEALTHY
        self.status_detail = "" if connected else "not connected; reconnecting"

    @property
    def capabilities(self) -> Capabilities:
        cards = []
        for entry in self.advert.get("models", []):
            try:
                cards.append(
                    ModelCard(
                        str(entry["id"]),
                        Task.parse(str(entry["task"])),
                        context_window=entry.get("context_window"),
                        loaded=bool(entry.get("loaded", False)),
                        owned_by=self.id,
                    )
                )
            except (KeyError, ValueError):
                continue  # a model of a task this version doesn't know
        return Capabilities(
            tasks=frozenset(c.task for c in cards),
            models=tuple(cards),
            streaming=True,
            hardware=frozenset(str(h) for h in self.advert.get("hardware", [])),
            protocols=frozenset({wire.INFERENCE_PROTOCOL}),
            continuation=True,
        )

    def queue_size(self) -> int:
        load = self.advert.get("load", {})
        return int(load.get("in_flight", 0)) + int(load.get("queued", 0))

    def describe(self) -> dict[str, object]:
        return {
            "peer_id": self.peer_id,
            "addrs": self.advert.get("addrs", []),
            "rtt_ms": None if self.rtt_s is None else round(self.rtt_s * 1000, 2),
            "version": self.advert.get("version"),
            "load": self.advert.get("load", {}),
        }

    def _request(self, request: InferenceRequest, ctx: RequestContext) -> dict[str, Any]:
        deadline_ms = None
        if ctx.deadline is not None:
            deadline_ms = max(1, int((ctx.deadline - trio.current_time()) * 1000))
        hops = [*ctx.hops, self.mesh.peer_id]
        payload = request_payload(request)
        return wire.request(ctx.request_id, request.task.value, request.model, payload, hops, deadline_ms)

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        last: GenerationChunk | None = None
        try:
            async with self.mesh.open_inference(self.peer_id, self._request(request, ctx)) as frames:
                while last is None:
                    frame = await frames.receive()
                    if frame is None:
                        # A peer going away looks like a clean EOF: without `done` it failed.
                        raise BackendFailedError(f"peer {self.peer_id[:12]}… ended the stream before finishing")
                    kind = frame["t"]
                    if kind == wire.CHUNK:
                        yield GenerationChunk(frame["text"], token_ids=token_ids_from(frame.get("ids")))
                    elif kind == wire.DONE:
                        usage = frame["usage"]
                        reason: FinishReason = "length" if frame["finish_reason"] == "length" else "stop"
                        last = GenerationChunk(
                            "",
                            finish_reason=reason,
                            usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
                        )
                    elif kind == wire.ERROR:
                        raise error_from_frame(frame, self.peer_id)
                    else:
                        raise BackendFailedError(f"peer {self.peer_id[:12]}… sent an unexpected {kind} frame")
        except (StreamBroken, wire.WireError, trio.TooSlowError) as exc:
            raise BackendUnavailableError(f"peer {self.peer_id[:12]}…: {exc}") from None
        except InferenceError:
            raise
        except (OSError, RuntimeError) as exc:  # libp2p dial failures surface as these
            raise BackendUnavailableError(f"peer {self.peer_id[:12]}… unreachable: {exc}") from None
        # Yielded after the stream is handed back: the caller stops at the finishing chunk,
        # and a generator closed inside the block would reset a stream that could be reused.
        yield last

    async def _call(self, request: InferenceRequest, ctx: RequestContext) -> dict[str, Any]:
        try:
            async with self.mesh.open_inference(self.peer_id, self._request(request, ctx)) as frames:
                frame = await frames.receive()
        except (StreamBroken, wire.WireError, trio.TooSlowError) as exc:
            raise BackendUnavailableError(f"peer {self.peer_id[:12]}…: {exc}") from None
        except (OSError, RuntimeError) as exc:
            raise BackendUnavailableError(f"peer {self.peer_id[:12]}… unreachable: {exc}") from None
        if frame is None:
            raise BackendFailedError(f"peer {self.peer_id[:12]}… closed the stream without an answer")
        if frame["t"] == wire.ERROR:
            raise error_from_frame(frame, self.peer_id)
        if frame["t"] != wire.RESULT:
            raise BackendFailedError(f"peer {self.peer_id[:12]}… sent an unexpected {frame['t']} frame")
        return dict(frame["payload"])

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        payload = await self._call(request, ctx)
        try:
            vectors = tuple(tuple(float(x) for x in v) for v in payload["vectors"])
            usage = Usage(int(payload.get("prompt_tokens", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendFailedError(f"peer {self.peer_id[:12]}… sent a malformed embedding result: {exc}") from None
        return EmbeddingResult(vectors, usage, request.model, self.id)

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        payload = await self._call(request, ctx)
        try:
            hits = tuple(RerankHit(int(h["index"]), float(h["relevance_score"])) for h in payload["hits"])
            usage = Usage(int(payload.get("prompt_tokens", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendFailedError(f"peer {self.peer_id[:12]}… sent a malformed rerank result: {exc}") from None
        return RerankResult(hits, usage, request.model, self.id)
