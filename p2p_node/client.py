"""A small Python client for the node, as seed 000's backend used it.

`UnifiedInferenceClient` (blocking) and `AsyncUnifiedInferenceClient` (async, for asyncio or
trio) offer `embed(texts)`, `rerank(query, documents, top_n)` and `chat(messages)` with the
endpoints' default models, plus `health_check()`, `get_models()`, `status()` and seed 004's
`infer()`. The seed's names keep working: `BentoMLClient` is `UnifiedInferenceClient` and
`get_bentoml_client()` returns a shared instance. The base URL is the one given, else
`INFERENCE_URL`, else `BENTOML_URL`, else this node's default address.

Failures are `InferenceClientError`s: `InferenceAPIError` (and a subclass per kind of
refusal) when the node answered with an error status, `InferenceConnectionError` /
`InferenceTimeoutError` when it could not be reached in time, `InvalidResponseError` when
an answer is not what the endpoint promises. They also subclass the httpx exceptions the
seed's client let through (`httpx.HTTPStatusError`, `httpx.TransportError`,
`httpx.TimeoutException`), so existing `except` clauses keep catching them.

Only httpx is imported: this module is usable without the node's model stack.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

DEFAULT_BASE_URL = "http://localhost:8000"
URL_VARIABLES = ("INFERENCE_URL", "BENTOML_URL")  # the new name first, then seed 000's
DEFAULT_TIMEOUT_S = 120.0


def default_base_url(env: Mapping[str, str] | None = None) -> str:
    environ = os.environ if env is None else env
    for name in URL_VARIABLES:
        value = (environ.get(name) or "").strip()
        if value:
            return value
    return DEFAULT_BASE_URL


# ---- errors ---------------------------------------------------------------------------------


class InferenceClientError(Exception):
    """Anything that kept a call from returning its answer."""


class InferenceConnectionError(InferenceClientError, httpx.TransportError):
    """The node could not be reached (refused, reset, name not found...)."""


class InferenceTimeoutError(InferenceConnectionError, httpx.TimeoutException):
    """The node did not answer within the client's timeout."""


class InvalidResponseError(InferenceClientError):
    """The node answered with success, but not with what the endpoint promises."""


class InferenceAPIError(InferenceClientError, httpx.HTTPStatusError):
    """The node answered with an error status; `code` and `param` come from its error object."""

    def __init__(
        self,
        message: str,
        *,
        request: httpx.Request,
        response: httpx.Response,
        code: str | None = None,
        error_type: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, request=request, response=response)
        self.message = message
        self.status_code = response.status_code
        self.code = code
        self.error_type = error_type
        self.param = param
        retry_after = response.headers.get("retry-after", "")
        self.retry_after: float | None = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None


class BadRequestError(InferenceAPIError):
    """400/413/422: the request itself is wrong; sending it again will not help."""


class AuthenticationError(InferenceAPIError):
    """401/403: the node wants an API key (`api_key=`) it did not get, or refuses the one sent."""


class ModelNotFoundError(InferenceAPIError):
    """404: the model (or route) is not served by this node."""


class RateLimitError(InferenceAPIError):
    """429: the node is overloaded; `retry_after` says how many seconds to wait."""


class ServiceUnavailableError(InferenceAPIError):
    """503: no backend can take the request now, or the node is shutting down."""


class ServerError(InferenceAPIError):
    """Other 5xx: a backend failed or timed out while serving the request."""


def _error_class(status: int) -> type[InferenceAPIError]:
    if status in (401, 403):
        return AuthenticationError
    if status == 404:
        return ModelNotFoundError
    if status == 429:
        return RateLimitError
    if status == 503:
        return ServiceUnavailableError
    if status >= 500:
        return ServerError
    return BadRequestError


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    error: Any = None
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        pass
    if isinstance(error, dict):
        message = str(error.get("message") or response.reason_phrase)
        code, error_type, param = error.get("code"), error.get("type"), error.get("param")
    else:
        message = (response.text or response.reason_phrase).strip()[:500]
        code = error_type = param = None
    cls = _error_class(response.status_code)
    raise cls(
        f"{response.request.method} {response.request.url.path} failed with {response.status_code}: {message}",
        request=response.request,
        response=response,
        code=code,
        error_type=error_type,
        param=param,
    )


# ---- what each call sends and how its answer is read ------------------------------------------


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    body: dict[str, Any] | None
    parse: Callable[[Any], Any]
    timeout: float | None = None  # None: the client's


def _field(data: Any, key: str, what: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise InvalidResponseError(f"the node's {what} answer has no {key!r}: {str(data)[:200]}")
    return data[key]


def _embed_call(texts: Sequence[str] | str, model: str | None) -> _Call:
    inputs = [texts] if isinstance(texts, str) else list(texts)
    body: dict[str, Any] = {"input": inputs}
    if model:
        body["model"] = model

    def parse(data: Any) -> list[list[float]]:
        items = _field(data, "data", "embeddings")
        try:
            vectors = [item["embedding"] for item in sorted(items, key=lambda item: item["index"])]
        except (TypeError, KeyError) as exc:
            raise InvalidResponseError(f"the node's embeddings answer is malformed: {exc!r}") from None
        if len(vectors) != len(inputs):
            raise InvalidResponseError(f"asked for {len(inputs)} embeddings, the node returned {len(vectors)}")
        return vectors

    return _Call("POST", "/v1/embeddings", body, parse)


def _rerank_call(query: str, documents: Sequence[str], top_n: int | None, model: str | None) -> _Call:
    docs = list(documents)
    body: dict[str, Any] = {"query": query, "documents": docs}
    if top_n is not None:
        body["top_n"] = top_n
    if model:
        body["model"] = model

    def parse(data: Any) -> list[dict[str, Any]]:
        hits = []
        for hit in _field(data, "results", "rerank"):
            try:
                index, score = int(hit["index"]), float(hit["relevance_score"])
                text = docs[index]
            except (TypeError, KeyError, ValueError, IndexError) as exc:
                raise InvalidResponseError(f"the node's rerank answer is malformed: {exc!r}") from None
            # `score` and `text` are the names seed 000's callers read.
            hits.append({"index": index, "relevance_score": score, "score": score, "text": text})
        return hits

    return _Call("POST", "/v1/rerank", body, parse)


def _chat_call(
    messages: Sequence[Mapping[str, str]] | str, model: str | None, max_tokens: int, temperature: float
) -> _Call:
    chat = [{"role": "user", "content": messages}] if isinstance(messages, str) else [dict(m) for m in messages]
    body: dict[str, Any] = {"messages": chat, "max_tokens": max_tokens, "temperature": temperature}
    if model:
        body["model"] = model

    def parse(data: Any) -> str:
        choices = _field(data, "choices", "chat")
        try:
            content = choices[0]["message"]["content"]
        except (TypeError, KeyError, IndexError) as exc:
            raise InvalidResponseError(f"the node's chat answer is malformed: {exc!r}") from None
        return content or ""

    return _Call("POST", "/v1/chat/completions", body, parse)


def _infer_call(text: str, model: str | None, version: str | None, parameters: Mapping[str, Any] | None) -> _Call:
    body: dict[str, Any] = {"text": text}
    for key, value in (("model", model), ("version", version), ("parameters", parameters)):
        if value is not None:
            body[key] = dict(value) if isinstance(value, Mapping) else value

    def parse(data: Any) -> dict[str, Any]:
        _field(data, "result", "infer")
        return dict(data)

    return _Call("POST", "/infer", body, parse)


def _models_call() -> _Call:
    def parse(data: Any) -> dict[str, Any]:
        return {entry["id"]: entry for entry in _field(data, "data", "models") if isinstance(entry, dict)}

    return _Call("GET", "/v1/models", None, parse, timeout=10.0)


def _status_call() -> _Call:
    return _Call("GET", "/v1/status", None, lambda data: data, timeout=10.0)


def _health_call() -> _Call:
    return _Call(
        "GET", "/health", None, lambda data: isinstance(data, dict) and data.get("status") in ("ok", "healthy")
    )


# ---- the clients ----------------------------------------------------------------------------


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _read(call: _Call, response: httpx.Response) -> Any:
    _raise_for_error(response)
    try:
        data = response.json()
    except ValueError:
        raise InvalidResponseError(f"the node's answer to {call.path} is not JSON: {response.text[:200]!r}") from None
    return call.parse(data)


def _unreachable(base_url: str, exc: httpx.TransportError) -> InferenceConnectionError:
    cls = InferenceTimeoutError if isinstance(exc, httpx.TimeoutException) else InferenceConnectionError
    reason = str(exc) or type(exc).__name__
    try:
        request: httpx.Request | None = exc.request
    except RuntimeError:  # httpx sets it on errors raised while sending; be safe anyway
        request = None
    return cls(f"cannot reach the inference node at {base_url}: {reason}", request=request)


class UnifiedInferenceClient:
    """Blocking client. Use it as a context manager, or call `close()` when done."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or default_base_url()).rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=_headers(api_key), transport=transport
        )

    def _call(self, call: _Call) -> Any:
        timeout = call.timeout if call.timeout is not None else self._http.timeout
        try:
            response = self._http.request(call.method, call.path, json=call.body, timeout=timeout)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc
        return _read(call, response)

    def embed(self, texts: Sequence[str] | str, model: str | None = None) -> list[list[float]]:
        """One vector per text, from the node's default embedding model unless `model` is given."""
        if not isinstance(texts, str) and not texts:
            return []
        result: list[list[float]] = self._call(_embed_call(texts, model))
        return result

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        """`{index, relevance_score, score, text}` per document, most relevant first, cut to `top_n`."""
        result: list[dict[str, Any]] = self._call(_rerank_call(query, documents, top_n, model))
        return result

    def chat(
        self,
        messages: Sequence[Mapping[str, str]] | str,
        model: str | None = None,
        max_tokens: int = 1024,
        temperature: float = 0.7,
    ) -> str:
        """The assistant's reply to `[{"role": ..., "content": ...}, ...]` (or to one user message)."""
        result: str = self._call(_chat_call(messages, model, max_tokens, temperature))
        return result

    def infer(
        self,
        text: str,
        model: str | None = None,
        version: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Seed 004's `/infer`: the whole envelope (`result`, `model_used`, `latency_ms`...)."""
        result: dict[str, Any] = self._call(_infer_call(text, model, version, parameters))
        return result

    def health_check(self) -> bool:
        """Whether the node answers its liveness probe; never raises."""
        try:
            return bool(self._call(_health_call()))
        except InferenceClientError:
            return False

    def get_models(self) -> dict[str, Any]:
        """The node's models by id, as `/v1/models` lists them."""
        result: dict[str, Any] = self._call(_models_call())
        return result

    def status(self) -> dict[str, Any]:
        """`/v1/status`: loaded models, memory, cache and the node's status report."""
        result: dict[str, Any] = self._call(_status_call())
        return result

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncUnifiedInferenceClient:
    """The same calls, awaitable (asyncio or trio). Use `async with`, or `await aclose()`."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or default_base_url()).rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=_headers(api_key), transport=transport
        )

    async def _call(self, call: _Call) -> Any:
        timeout = call.timeout if call.timeout is not None else self._http.timeout
        try:
            response = await self._http.request(call.method, call.path, json=call.body, timeout=timeout)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc
        return _read(call, response)

    async def embed(self, texts: Sequence[str] | str, model: str | None = None) -> list[list[float]]:
        if not isinstance(texts, str) and not texts:
            return []
        result: list[list[float]] = await self._call(_embed_call(texts, model))
        return result

    async def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call(_rerank_call(query, documents, top_n, model))
        return result

    async def chat(
        self,
        messages: Sequence[Mapping[str, str]] | str,
        model: str | None = None,
        max_tokens: int = 1024,
        temperature: float = 0.7,
    ) -> str:
        result: str = await self._call(_chat_call(messages, model, max_tokens, temperature))
        return result

    async def infer(
        self,
        text: str,
        model: str | None = None,
        version: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(_infer_call(text, model, version, parameters))
        return result

    async def health_check(self) -> bool:
        try:
            return bool(await self._call(_health_call()))
        except InferenceClientError:
            return False

    async def get_models(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(_models_call())
        return result

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(_status_call())
        return result

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


# Seed 000's names.
BentoMLClient = UnifiedInferenceClient

_shared: UnifiedInferenceClient | None = None
_shared_lock = threading.Lock()


def get_bentoml_client() -> UnifiedInferenceClient:
    """The process-wide client, made on first use from INFERENCE_URL / BENTOML_URL."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = UnifiedInferenceClient()
        return _shared


get_inference_client = get_bentoml_client

__all__ = [
    "AsyncUnifiedInferenceClient",
    "AuthenticationError",
    "BadRequestError",
    "BentoMLClient",
    "InferenceAPIError",
    "InferenceClientError",
    "InferenceConnectionError",
    "InferenceTimeoutError",
    "InvalidResponseError",
    "ModelNotFoundError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "UnifiedInferenceClient",
    "default_base_url",
    "get_bentoml_client",
    "get_inference_client",
]
