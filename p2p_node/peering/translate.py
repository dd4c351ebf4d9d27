"""Our request and result types ↔ the payloads of mesh frames (see docs/PROTOCOL.md)."""

from __future__ import annotations

from typing import Any

from backends.errors import InferenceError, InvalidRequestError, error_from_code
from backends.types import (
    ChatRequest,
    CompletionRequest,
    Continuation,
    EmbeddingRequest,
    GenerationParams,
    InferenceRequest,
    Message,
    RerankRequest,
    Task,
)


def request_payload(request: InferenceRequest) -> dict[str, Any]:
    if isinstance(request, (ChatRequest, CompletionRequest)):
        p = request.params
        payload: dict[str, Any] = {
            "params": {
                "max_tokens": p.max_tokens,
                "temperature": p.temperature,
                "top_p": p.top_p,
                "seed": p.seed,
                "stop": list(p.stop),
            }
        }
        if isinstance(request, ChatRequest):
            payload["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            payload["prompt"] = request.prompt
        if request.continuation is not None:
            payload["continuation"] = {
                "text": request.continuation.text,
                "ids": list(request.continuation.token_ids),
            }
        return payload
    if isinstance(request, EmbeddingRequest):
        return {"inputs": list(request.inputs)}
    return {"query": request.query, "documents": list(request.documents), "top_n": request.top_n}


def parse_request(task: str, model: str, payload: dict[str, Any]) -> InferenceRequest:
    """A peer's request → ours. Raises InvalidRequestError on anything malformed."""
    try:
        parsed = Task.parse(task)
        if parsed in (Task.CHAT, Task.COMPLETION):
            raw = payload["params"]
            stop = raw.get("stop") or []
            params = GenerationParams(
                max_tokens=int(raw["max_tokens"]),
                temperature=float(raw.get("temperature", 1.0)),
                top_p=float(raw.get("top_p", 1.0)),
                seed=None if raw.get("seed") is None else int(raw["seed"]),
                stop=tuple(str(s) for s in stop),
            )
            raw_continuation = payload.get("continuation")
            continuation = None
            if raw_continuation is not None:
                ids = tuple(int(i) for i in raw_continuation.get("ids", []))
                continuation = Continuation(str(raw_continuation["text"]), ids)
            if parsed is Task.CHAT:
                messages = tuple(Message(str(m["role"]), str(m["content"])) for m in payload["messages"])  # type: ignore[arg-type]
                return ChatRequest(messages, model, params, continuation=continuation)
            return CompletionRequest(str(payload["prompt"]), model, params, continuation=continuation)
        if parsed is Task.EMBEDDING:
            return EmbeddingRequest(tuple(str(t) for t in payload["inputs"]), model)
        top_n = payload.get("top_n")
        return RerankRequest(
            str(payload["query"]),
            tuple(str(d) for d in payload["documents"]),
            model,
            None if top_n is None else int(top_n),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"malformed {task} request from a peer: {exc!r}") from None


def error_from_frame(frame: dict[str, Any], peer: str) -> InferenceError:
    return error_from_code(str(frame.get("code")), f"peer {peer[:12]}…: {frame.get('message', '')}")
