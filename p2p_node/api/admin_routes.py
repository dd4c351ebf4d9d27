"""Liveness, readiness, status, metrics and model management."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from backends.manager import BackendManager
from backends.types import Task
from p2p_node.api.schemas import ModelActionBody


def build_router(
    manager: BackendManager,
    node_status: Callable[[], dict[str, Any]],
    readiness: Callable[[], tuple[bool, str]],
    render_metrics: Callable[[], bytes],
    inference_health: Callable[[], dict[str, Any]],
) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the process serves HTTP. Says nothing about models."""
        return {"status": "ok" if manager.accepting else "shutting_down"}

    @router.get("/v1/health/inference")
    async def health_inference() -> dict[str, Any]:
        """Seed 002's provider health: the primary and each fallback, with their models."""
        return inference_health()

    @router.get("/ready", response_model=None)
    @router.get("/health/ready", include_in_schema=False, response_model=None)
    async def ready() -> JSONResponse:
        is_ready, reason = readiness()
        return JSONResponse({"ready": is_ready, "reason": reason}, status_code=200 if is_ready else 503)

    @router.get("/status")
    async def status() -> dict[str, Any]:
        return node_status()

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data: dict[str, dict[str, Any]] = {}
        for card in manager.list_models():
            entry = data.setdefault(
                card.id,
                {
                    "id": card.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": card.owned_by,
                    "tasks": [],
                    "loaded": False,
                },
            )
            entry["tasks"].append(card.task.value)
            entry["loaded"] = entry["loaded"] or card.loaded
            if card.context_window:
                entry["context_window"] = card.context_window
            if card.dimensions:
                entry["dimensions"] = card.dimensions
        for alias, target in manager.catalog.aliases.items():
            if target in data and alias not in data:
                data[alias] = {
                    "id": alias,
                    "object": "model",
                    "created": 0,
                    "owned_by": "alias",
                    "alias_of": target,
                    "tasks": data[target]["tasks"],
                    "loaded": data[target]["loaded"],
                }
        return {"object": "list", "data": list(data.values())}

    @router.post("/models/load")
    async def load_model(body: ModelActionBody) -> dict[str, Any]:
        backends = await manager.load_model(body.model, body.backend_id)
        return {"status": "loaded", "model": manager.catalog.resolve(Task.CHAT, body.model), "backends": backends}

    @router.post("/models/unload")
    async def unload_model(body: ModelActionBody) -> dict[str, Any]:
        backends = await manager.unload_model(body.model, body.backend_id)
        return {"status": "unloaded", "model": manager.catalog.resolve(Task.CHAT, body.model), "backends": backends}

    return router
