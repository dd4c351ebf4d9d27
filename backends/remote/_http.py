"""The one place where httpx's errors and upstream HTTP error replies become ours.

Every HTTP backend calls `translate_errors` around its requests and `raise_for_status` on
every response. Classification follows what a retry can fix:

* connection failures, timeouts, 5xx → retryable (`BackendUnavailableError`/`BackendFailedError`);
* 429 → `OverloadedError` carrying the upstream's Retry-After;
* 404 for a model, 400/422 caused by the input → fatal (never retried elsewhere);
* "context length" complaints → `ContextWindowExceededError`, so the manager can prefer a
  backend with a larger window.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from backends.errors import (
    BackendFailedError,
    BackendUnavailableError,
    ContextWindowExceededError,
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
)

_CONTEXT_MARKERS = (
    "context length",
    "context_length",
    "context window",
    "maximum context",
    "too many tokens",
    "must have less than",  # TEI with truncate=false
)


def make_client(
    base_url: str, api_key: str | None, headers: Mapping[str, str], timeout_s: float, connect_timeout_s: float
) -> httpx.AsyncClient:
    """The client every HTTP backend uses: our user agent, the bearer key if any, pooled connections."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers=backend_headers(api_key, headers),
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
    )


def backend_headers(api_key: str | None, headers: Mapping[str, str]) -> dict[str, str]:
    """What every request to a backend carries: our user agent, the bearer key if any, the
    backend's configured headers."""
    all_headers = {"user-agent": "p2p-node", **headers}
    if api_key:
        all_headers["authorization"] = f"Bearer {api_key}"
    return all_headers


@contextmanager
def translate_errors(backend_id: str, *, reply_started: bool = False) -> Iterator[None]:
    """Map transport-level failures (connect, read, timeouts, protocol) to our errors.

    With `reply_started`, the upstream already accepted the request and began answering:
    a dropped connection then is a failure while serving (`BackendFailedError`), not an
    unreachable backend.
    """
    try:
        yield
    except InferenceError:
        raise
    except httpx.TransportError as exc:  # ConnectError, ReadError, timeouts, RemoteProtocolError...
        if reply_started:
            raise BackendFailedError(f"backend {backend_id} broke off its answer: {exc or type(exc).__name__}") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise BackendUnavailableError(f"backend {backend_id} timed out ({type(exc).__name__})") from exc
        raise BackendUnavailableError(f"backend {backend_id} is unreachable: {exc or type(exc).__name__}") from exc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BackendFailedError(f"backend {backend_id} sent a malformed reply: {exc}") from exc


def raise_for_status(response: httpx.Response, backend_id: str) -> None:
    """Raise our error for a non-2xx reply. For a streamed reply, `await response.aread()`
    first when the status is >= 400, so the upstream's message can be quoted."""
    if response.status_code < 400:
        return
    message = upstream_message(response)
    status = response.status_code
    where = f"backend {backend_id}"
    if status == 429:
        raise OverloadedError(f"{where} is rate limiting: {message}", retry_after_s=retry_after(response))
    if status == 424:  # TEI: the model itself failed
        raise BackendFailedError(f"{where} failed to run the model: {message}")
    if status in (502, 503, 504):
        raise BackendUnavailableError(f"{where} answered {status}: {message}")
    if status >= 500:
        raise BackendFailedError(f"{where} failed with {status}: {message}")
    lowered = message.lower()
    if any(marker in lowered for marker in _CONTEXT_MARKERS):
        raise ContextWindowExceededError(f"{where}: {message}")
    if status == 404 and "model" in lowered:
        raise ModelNotFoundError(f"{where}: {message}", param="model")
    if status in (401, 403):
        # The node's configuration is wrong, not the request: another backend may serve it.
        raise BackendUnavailableError(f"{where} refused our credentials ({status}): {message}")
    if status == 404:
        raise BackendUnavailableError(f"{where} has no such endpoint ({response.request.url.path}): {message}")
    raise InvalidRequestError(f"{where} rejected the request ({status}): {message}")


def upstream_message(response: httpx.Response) -> str:
    """The human part of an error reply in any of the shapes upstreams use."""
    try:
        text = response.text
    except httpx.ResponseNotRead:  # a streamed reply nobody read: only the status is known
        return response.reason_phrase
    try:
        body: Any = json.loads(text)
    except ValueError:
        return text[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            return str(error.get("message") or error)
        if error is not None:
            return str(error)
    return json.dumps(body)[:500]


def retry_after(response: httpx.Response, default: float = 1.0) -> float:
    value = response.headers.get("retry-after")
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parsed = email.utils.parsedate_to_datetime(value) if value else None
    if parsed is None:
        return default
    return max(0.0, parsed.timestamp() - time.time())
