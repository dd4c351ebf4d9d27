"""Every failure leaves the HTTP layer as an OpenAI error object:
`{"error": {"message", "type", "param", "code"}}` with a fitting status, so the
official client raises the right exception class (NotFoundError, BadRequestError,
RateLimitError...)."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backends.errors import InferenceError, OverloadedError

log = logging.getLogger(__name__)


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: InferenceError) -> JSONResponse:
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.code, exc.param), status_code=exc.status, headers=headers
    )


def sse_error_event(exc: BaseException) -> bytes:
    """An error that happens after a stream started travels as one last SSE event."""
    if isinstance(exc, InferenceError):
        body = error_body(exc.message, exc.error_type, exc.code, exc.param)
    else:
        body = error_body("internal error while streaming", "server_error", "internal_error")
    return f"data: {json.dumps(body)}\n\n".encode()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", None
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Pydantic names union members in the location; keep the field path readable.
    loc = [p for p in loc if not p.startswith(("str", "list[", "int", "float", "bool"))]
    param = ".".join(loc) or None
    detail = first.get("msg", "invalid request")
    if detail.startswith("Value error, "):
        detail = detail[len("Value error, ") :]
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return (f"invalid value for '{param}': {detail}" if param else detail), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InferenceError)
    async def _inference_error(request: Request, exc: InferenceError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind, code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error", "internal_error"), status_code=500)
