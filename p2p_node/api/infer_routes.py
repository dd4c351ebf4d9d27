"""Seed 004's API: `POST /infer`, `POST /infer/batch` and `GET /models`.

Every answer is seed 004's envelope: `success`, `result`, `model_used` (`name:version`),
`latency_ms`, `request_id`, `timestamp` and `metadata`. A failed request gets the same
envelope with `success: false`, `result: null` and the node's usual error object under
`error`, with the error's HTTP status. A batch runs its items concurrently and answers 200
with one envelope per item, in order: one bad item (malformed, an unknown model, a failed
generation) gets its own error and the others their results.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import UTC, datetime
from typing import Any

import trio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from backends.errors import InferenceError, InvalidRequestError, OverloadedError
from backends.manager import BackendManager
from backends.types import RequestContext
from p2p_node.api.errors import error_body
from p2p_node.api.request_ids import new_request_id
from p2p_node.infer_kinds import InferOutcome, run_version
from p2p_node.registry import ModelRegistry, ModelVersion

log = logging.getLogger(__name__)


def timestamp() -> str:
    """ISO 8601 UTC with milliseconds, as seed 004 writes it: 2024-01-01T00:00:00.000Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _latency_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _success(outcome: InferOutcome, version: ModelVersion, request_id: str, started: float) -> dict[str, Any]:
    return {
        "success": True,
        "result": outcome.result,
        "model_used": version.tag,
        "latency_ms": _latency_ms(started),
        "request_id": request_id,
        "timestamp": timestamp(),
        "metadata": {
            "model_type": version.name,
            "version": version.version,
            "kind": version.kind.value,
            "model_id": outcome.model_id,
            "backend": outcome.backend_id,
            "finish_reason": outcome.finish_reason,
            "usage": {
                "prompt_tokens": outcome.usage.prompt_tokens,
                "completion_tokens": outcome.usage.completion_tokens,
                "total_tokens": outcome.usage.total_tokens,
            },
            "parameters": outcome.parameters,
            **outcome.details,
        },
    }


def _failure(exc: InferenceError, version: ModelVersion | None, request_id: str, started: float) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if version is not None:
        metadata = {"model_type": version.name, "version": version.version, "kind": version.kind.value}
    return {
        "success": False,
        "result": None,
        "error": error_body(exc.message, exc.error_type, exc.code, exc.param)["error"],
        "model_used": version.tag if version is not None else None,
        "latency_ms": _latency_ms(started),
        "request_id": request_id,
        "timestamp": timestamp(),
        "metadata": metadata,
    }


def _where(prefix: str, param: str | None) -> str | None:
    if param is None:
        return prefix or None
    return f"{prefix}.{param}" if prefix else param


def _parse_item(item: Any, where: str) -> tuple[str, str | None, str | None, dict[str, Any]]:
    """(text, model, version, parameters) of one request body, or an InvalidRequestError naming the field."""
    label = f"'{where}'" if where else "the request body"
    if not isinstance(item, dict):
        raise InvalidRequestError(f"{label} must be a JSON object with a 'text' field", param=where or None)
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("'text' is required and must be a non-empty string", param=_where(where, "text"))
    fields: dict[str, str | None] = {}
    for name in ("model", "version"):
        value = item.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and name == "version":
            value = str(value)
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(f"'{name}' must be a string", param=_where(where, name))
        fields[name] = value or None
    parameters = item.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise InvalidRequestError("'parameters' must be a JSON object", param=_where(where, "parameters"))
    return text, fields["model"], fields["version"], parameters


async def _read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON") from None


def _error_response(exc: InferenceError, envelope: dict[str, Any]) -> JSONResponse:
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse(envelope, status_code=exc.status, headers=headers)


def build_router(manager: BackendManager, registry: ModelRegistry, default_max_tokens: int) -> APIRouter:
    router = APIRouter()

    async def answer(item: Any, request_id: str, where: str) -> tuple[dict[str, Any], InferenceError | None]:
        """One request's envelope, and the error when it failed."""
        started = time.perf_counter()
        version: ModelVersion | None = None
        try:
            text, model, version_name, parameters = _parse_item(item, where)
            version = registry.resolve(model, version_name)
            ctx = RequestContext(request_id=request_id)
            outcome = await run_version(manager, version, text, parameters, ctx, default_max_tokens)
        except InferenceError as exc:
            if where and exc.param and not exc.param.startswith(where):
                exc.param = _where(where, exc.param)
            log.info(
                "infer%s failed: %s",
                f" {version.tag}" if version else "",
                exc.message,
                extra={"request_id": request_id, "code": exc.code, "latency_ms": _latency_ms(started)},
            )
            return _failure(exc, version, request_id, started), exc
        envelope = _success(outcome, version, request_id, started)
        log.info(
            "infer %s in %.1fms",
            version.tag,
            envelope["latency_ms"],
            extra={"request_id": request_id, "model_used": version.tag, "latency_ms": envelope["latency_ms"]},
        )
        return envelope, None

    @router.post("/infer", response_model=None)
    async def infer(request: Request) -> JSONResponse:
        request_id = request.headers.get("x-request-id") or new_request_id()
        started = time.perf_counter()
        try:
            body = await _read_json(request)
        except InferenceError as exc:
            return _error_response(exc, _failure(exc, None, request_id, started))
        envelope, error = await answer(body, request_id, "")
        if error is not None:
            return _error_response(error, envelope)
        return JSONResponse(envelope)

    @router.post("/infer/batch", response_model=None)
    async def infer_batch(request: Request) -> JSONResponse:
        batch_id = request.headers.get("x-request-id") or new_request_id()
        started = time.perf_counter()
        try:
            body = await _read_json(request)
            items = body.get("requests") if isinstance(body, dict) else None
            if not isinstance(items, list) or not items:
                raise InvalidRequestError("'requests' must be a non-empty list of requests", param="requests")
            if len(items) > registry.max_batch_requests:
                raise InvalidRequestError(
                    f"a batch takes at most {registry.max_batch_requests} requests, got {len(items)}",
                    param="requests",
                )
        except InferenceError as exc:
            return _error_response(exc, _failure(exc, None, batch_id, started))
        results: list[dict[str, Any]] = [{} for _ in items]

        async def run(index: int) -> None:
            try:
                results[index], _ = await answer(items[index], f"{batch_id}-{index}", f"requests[{index}]")
            except Exception as exc:  # a bug in one item must not lose the others' answers
                log.exception("batch item %d failed unexpectedly", index)
                error = InferenceError(f"internal error: {type(exc).__name__}")
                results[index] = _failure(error, None, f"{batch_id}-{index}", started)

        async with trio.open_nursery() as nursery:
            for index in range(len(items)):
                nursery.start_soon(run, index)
        succeeded = sum(1 for r in results if r["success"])
        return JSONResponse(
            {
                "success": succeeded == len(results),
                "results": results,
                "total": len(results),
                "succeeded": succeeded,
                "failed": len(results) - succeeded,
                "latency_ms": _latency_ms(started),
                "request_id": batch_id,
                "timestamp": timestamp(),
            }
        )

    @router.get("/models")
    async def list_registered_models() -> dict[str, Any]:
        served = {(card.id, card.task): card for card in manager.list_models()}
        models = []
        for name in registry.names():
            default = registry.default_version(name)
            versions = []
            for version in registry.versions(name):
                task = version.kind.task
                model_id = manager.catalog.resolve(task, version.model)
                card = served.get((model_id, task))
                versions.append(
                    {
                        "version": version.version,
                        "model_used": version.tag,
                        "default": version.version == default,
                        "kind": version.kind.value,
                        "task": task.value,
                        "model_id": model_id,
                        "available": card is not None,
                        "loaded": card is not None and card.loaded,
                        "parameters": dict(version.parameters),
                        "description": version.description,
                    }
                )
            models.append({"name": name, "default_version": default, "versions": versions})
        return {"models": models, "default_model": registry.default_model, "count": len(models)}

    return router
