"""The WebSocket protocol's vocabulary: parsing client messages into `backends.types`
requests and shaping what the node sends back.

Nothing here does I/O. Every problem with a client message becomes a `ProtocolError`
(or one of our `InferenceError`s) carrying a stable `code`, so the connection can answer
with an `error` message and keep going.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from backends.errors import InferenceError, InvalidRequestError, OverloadedError
from backends.manager import BackendManager
from backends.types import (
    MAX_HOPS,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationParams,
    GenerationResult,
    InferenceRequest,
    Message,
    RerankRequest,
    RerankResult,
    Task,
    Usage,
    parse_hops,
)
from p2p_node.api.schemas import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, MAX_TOKENS_LIMIT, ChatMessage, RerankDocument

PROTOCOL_VERSION = 1
TOPICS = ("inference", "status", "backend", "peers", "metrics")
MESSAGE_TYPES = ("subscribe", "unsubscribe", "inference", "cancel", "status", "ping")
MAX_REQUEST_ID_LENGTH = 128
MAX_EMBEDDING_INPUTS = 2048
MAX_TIMEOUT_S = 3600.0

_ROLES = {"developer": "system"}


class ProtocolError(Exception):
    """A client message the node cannot act on; the connection stays up."""

    def __init__(self, code: str, message: str, *, param: str | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.request_id = request_id


# ---- incoming ------------------------------------------------------------------------

RequestId = Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID_LENGTH)]


class _Message(BaseModel):
    # Extra fields (a client's own timestamps, correlation ids...) are tolerated.
    model_config = ConfigDict(extra="ignore")


class TopicsMessage(_Message):
    topics: list[str] | str = Field(min_length=1)
    request_id: RequestId | None = None

    def topic_list(self) -> list[str]:
        return [self.topics] if isinstance(self.topics, str) else list(dict.fromkeys(self.topics))


class CancelMessage(_Message):
    request_id: RequestId


class PlainMessage(_Message):
    request_id: RequestId | None = None


class Parameters(BaseModel):
    """What an `inference` message may ask for. Unknown names are refused, not ignored:
    a client asking for something we can't honour must hear so."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    # Hugging Face pipeline names that seed 001's clients send; both mean new tokens here.
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    max_length: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    do_sample: bool | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool | None = None
    timeout: Annotated[float, Field(gt=0.0, le=MAX_TIMEOUT_S)] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop sequences must be 1 to {MAX_STOP_LENGTH} characters long")
        return value


_GENERATION_PARAMETERS = frozenset(
    {"max_tokens", "max_new_tokens", "max_length", "temperature", "top_p", "do_sample", "seed", "stop", "timeout"}
)
_ALLOWED_PARAMETERS: dict[Task, frozenset[str]] = {
    Task.CHAT: _GENERATION_PARAMETERS,
    Task.COMPLETION: _GENERATION_PARAMETERS,
    Task.EMBEDDING: frozenset({"timeout"}),
    Task.RERANK: frozenset({"top_n", "return_documents", "timeout"}),
}


class InferenceMessage(_Message):
    request_id: RequestId | None = None
    model: str | None = None
    task: str
    inputs: Any
    parameters: dict[str, Any] | None = None
    stream: bool = False
    return_token_ids: bool = False  # each inference_chunk then carries its token ids
    # Node ids the request passed through (set by a peer): served here, never forwarded again.
    hops: list[str] = Field(default_factory=list, max_length=MAX_HOPS)


@dataclass(frozen=True)
class InferenceCall:
    """A validated `inference` message, ready for the manager."""

    request_id: str
    request: InferenceRequest
    stream: bool
    timeout_s: float | None
    return_documents: bool
    return_token_ids: bool = False
    hops: tuple[str, ...] = ()


_MESSAGES: dict[str, type[_Message]] = {
    "subscribe": TopicsMessage,
    "unsubscribe": TopicsMessage,
    "inference": InferenceMessage,
    "cancel": CancelMessage,
    "status": PlainMessage,
    "ping": PlainMessage,
}

_CHAT_INPUTS = TypeAdapter(Annotated[list[ChatMessage], Field(min_length=1)])
_DOCUMENTS = TypeAdapter(Annotated[list[str | RerankDocument], Field(min_length=1, max_length=10_000)])


def decode(raw: str | bytes) -> tuple[str, _Message]:
    """Parse one frame into its type and validated fields."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("invalid_json", "the message is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message", "a message must be a JSON object with a 'type' field")
    request_id = data.get("request_id") if isinstance(data.get("request_id"), str) else None
    kind = data.get("type")
    if kind is None:
        raise ProtocolError("invalid_message", "the message has no 'type' field", param="type", request_id=request_id)
    model = _MESSAGES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {kind!r}; expected one of {', '.join(MESSAGE_TYPES)}",
            param="type",
            request_id=request_id,
        )
    try:
        return kind, model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise ProtocolError("invalid_request", message, param=param, request_id=request_id) from None


def validation_message(exc: ValidationError, prefix: str = "") -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid value", prefix or None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    # Pydantic names union members in the location; keep the field path readable.
    loc = [p for p in loc if not p.startswith(("str", "list[", "int", "float", "bool", "function-", "RerankDocument"))]
    param = ".".join(p for p in (prefix, *loc) if p) or None
    detail = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        return f"missing field '{param}'", param
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{param}'", param
    detail = detail.removeprefix("Value error, ")
    return (f"invalid value for '{param}': {detail}" if param else detail), param


def topics_of(message: TopicsMessage) -> list[str]:
    topics = message.topic_list()
    unknown = [t for t in topics if t not in TOPICS]
    if unknown:
        raise ProtocolError(
            "unknown_topic",
            f"unknown topic{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"expected some of {', '.join(TOPICS)}",
            param="topics",
        )
    return topics


def build_call(message: InferenceMessage, manager: BackendManager, default_max_tokens: int) -> InferenceCall:
    """Turns an `inference` message into a request for the manager, resolving the model
    now so that an unknown model is refused before anything starts."""
    request_id = message.request_id or uuid.uuid4().hex
    try:
        task = Task.parse(message.task)
    except ValueError:
        raise ProtocolError(
            "invalid_request",
            f"unknown task {message.task!r}; expected chat, completion, embedding or rerank "
            "(or text-generation, feature-extraction, text-ranking)",
            param="task",
            request_id=request_id,
        ) from None
    try:
        params = Parameters.model_validate(message.parameters or {})
    except ValidationError as exc:
        text, param = validation_message(exc, "parameters")
        raise ProtocolError("invalid_request", text, param=param, request_id=request_id) from None
    inapplicable = sorted(params.model_fields_set - _ALLOWED_PARAMETERS[task])
    if inapplicable:
        raise ProtocolError(
            "invalid_request",
            f"parameter '{inapplicable[0]}' does not apply to {task.value}",
            param=f"parameters.{inapplicable[0]}",
            request_id=request_id,
        )
    try:
        request = _request_for(task, message, params, manager, default_max_tokens)
    except InferenceError as exc:
        raise ProtocolError(exc.code, exc.message, param=exc.param, request_id=request_id) from None
    return InferenceCall(
        request_id=request_id,
        request=request,
        stream=message.stream,
        timeout_s=params.timeout,
        return_documents=params.return_documents is not False,
        return_token_ids=message.return_token_ids,
        hops=parse_hops(message.hops),
    )


def _request_for(
    task: Task, message: InferenceMessage, params: Parameters, manager: BackendManager, default_max_tokens: int
) -> InferenceRequest:
    inputs = message.inputs
    if task is Task.CHAT:
        messages: tuple[Message, ...]
        if isinstance(inputs, str):
            messages = (Message("user", _non_empty(inputs)),)
        else:
            chat = _validate(_CHAT_INPUTS, inputs, "inputs")
            messages = tuple(Message(_ROLES.get(m.role, m.role), m.text()) for m in chat)  # type: ignore[arg-type]
        return ChatRequest(
            messages, manager.resolve_model(task, message.model), _generation_params(params, default_max_tokens)
        )
    if task is Task.COMPLETION:
        if isinstance(inputs, list) and len(inputs) == 1:
            inputs = inputs[0]
        if not isinstance(inputs, str):
            raise InvalidRequestError("completion inputs must be a prompt string", param="inputs")
        prompt = _non_empty(inputs)
        return CompletionRequest(
            prompt, manager.resolve_model(task, message.model), _generation_params(params, default_max_tokens)
        )
    if task is Task.EMBEDDING:
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise InvalidRequestError("embedding inputs must be a non-empty string or a list of them", param="inputs")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequestError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="inputs")
        return EmbeddingRequest(tuple(texts), manager.resolve_model(task, message.model))
    # Rerank: {"query", "documents", "top_n"?}; parameters.top_n wins if both are given.
    if not isinstance(inputs, dict):
        raise InvalidRequestError("rerank inputs must be an object with 'query' and 'documents'", param="inputs")
    query = inputs.get("query")
    if not isinstance(query, str) or not query:
        raise InvalidRequestError("rerank inputs need a non-empty 'query' string", param="inputs.query")
    if "documents" not in inputs:
        raise InvalidRequestError("missing field 'inputs.documents'", param="inputs.documents")
    documents = _validate(_DOCUMENTS, inputs["documents"], "inputs.documents")
    top_n = params.top_n if params.top_n is not None else inputs.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
        raise InvalidRequestError("top_n must be a positive integer", param="inputs.top_n")
    texts = tuple(d if isinstance(d, str) else d.text for d in documents)
    return RerankRequest(query, texts, manager.resolve_model(task, message.model), top_n)


def _generation_params(params: Parameters, default_max_tokens: int) -> GenerationParams:
    temperature = params.temperature
    if params.do_sample is False:
        temperature = 0.0  # Hugging Face's way of asking for greedy decoding
    stop = () if params.stop is None else ((params.stop,) if isinstance(params.stop, str) else tuple(params.stop))
    return GenerationParams(
        max_tokens=params.max_tokens or params.max_new_tokens or params.max_length or default_max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if params.top_p is None else params.top_p,
        seed=params.seed,
        stop=stop,
    )


def _validate(adapter: TypeAdapter[Any], value: Any, prefix: str) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        text, param = validation_message(exc, prefix)
        raise InvalidRequestError(text, param=param) from None


def _non_empty(text: str) -> str:
    if not text:
        raise InvalidRequestError("inputs must not be empty", param="inputs")
    return text


# ---- outgoing ------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def stamped(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, **fields, "timestamp": time.time()}


def error_message(
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    param: str | None = None,
    retryable: bool = False,
    retry_after_s: float | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        body["request_id"] = request_id
    if param is not None:
        body["param"] = param
    body["retryable"] = retryable
    if retry_after_s is not None:
        body["retry_after_s"] = retry_after_s
    body["timestamp"] = time.time()
    return body


def error_from(exc: ProtocolError | InferenceError, request_id: str | None = None) -> dict[str, Any]:
    if isinstance(exc, ProtocolError):
        return error_message(exc.code, exc.message, request_id=exc.request_id or request_id, param=exc.param)
    return error_message(
        exc.code,
        exc.message,
        request_id=request_id,
        param=exc.param,
        retryable=exc.retryable,
        retry_after_s=exc.retry_after_s if isinstance(exc, OverloadedError) else None,
    )


def usage_of(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def generation_complete(call: InferenceCall, result: GenerationResult) -> dict[str, Any]:
    return stamped(
        "inference_complete",
        request_id=call.request_id,
        model=call.request.model,
        task=call.request.task.value,
        backend=result.backend_id,
        finish_reason=result.finish_reason,
        usage=usage_of(result.usage),
        result=result.text,
    )


def embedding_complete(call: InferenceCall, result: EmbeddingResult, backend: str) -> dict[str, Any]:
    return stamped(
        "inference_complete",
        request_id=call.request_id,
        model=call.request.model,
        task=Task.EMBEDDING.value,
        backend=backend,
        usage=usage_of(result.usage),
        result=[list(vector) for vector in result.vectors],
    )


def rerank_complete(call: InferenceCall, result: RerankResult, backend: str) -> dict[str, Any]:
    assert isinstance(call.request, RerankRequest)
    documents = call.request.documents
    hits: list[dict[str, Any]] = []
    for hit in result.hits:
        item: dict[str, Any] = {"index": hit.index, "relevance_score": hit.relevance_score}
        if call.return_documents:
            item["document"] = {"text": documents[hit.index]}
        hits.append(item)
    return stamped(
        "inference_complete",
        request_id=call.request_id,
        model=call.request.model,
        task=Task.RERANK.value,
        backend=backend,
        usage=usage_of(result.usage),
        result=hits,
    )


def stream_complete(
    call: InferenceCall, backend: str, finish_reason: str | None, usage: Usage | None, chunks: int
) -> dict[str, Any]:
    return stamped(
        "inference_complete",
        request_id=call.request_id,
        model=call.request.model,
        task=call.request.task.value,
        backend=backend,
        finish_reason=finish_reason or "stop",
        usage=usage_of(usage) if usage is not None else None,
        chunks=chunks,
    )
