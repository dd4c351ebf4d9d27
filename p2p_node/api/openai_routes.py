"""OpenAI-compatible inference endpoints plus the Cohere/Jina-shaped rerank.

Handlers translate bodies into `backends.types` requests, call the manager and
translate back; they know nothing about which backend serves a request.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from backends.errors import InferenceError, InvalidRequestError
from backends.manager import BackendManager
from backends.types import (
    HOPS_HEADER,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationChunk,
    GenerationParams,
    GenerationRequest,
    Message,
    RequestContext,
    RerankRequest,
    Task,
    parse_hops,
)
from p2p_node.api.errors import error_response, sse_error_event
from p2p_node.api.schemas import ChatCompletionBody, CompletionBody, EmbeddingBody, RerankBody
from p2p_node.api.streaming import EventStreamResponse

_ROLES = {"developer": "system"}


def build_router(manager: BackendManager, default_max_tokens: int) -> APIRouter:
    router = APIRouter()

    def params_of(body: ChatCompletionBody | CompletionBody, budget: int | None) -> GenerationParams:
        return GenerationParams(
            max_tokens=budget or default_max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop_sequences(),
        )

    def context(request: Request) -> RequestContext:
        return RequestContext(
            request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
            hops=parse_hops(request.headers.get(HOPS_HEADER)),
        )

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        model = manager.resolve_model(Task.CHAT, body.model)
        messages = tuple(Message(_ROLES.get(m.role, m.role), m.text()) for m in body.messages)  # type: ignore[arg-type]
        generation = ChatRequest(messages, model, params_of(body, body.token_budget()))
        return await _respond(manager, generation, context(request), body, "chatcmpl")

    @router.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, request: Request) -> Response:
        model = manager.resolve_model(Task.COMPLETION, body.model)
        generation = CompletionRequest(body.prompt_text(), model, params_of(body, body.max_tokens))
        return await _respond(manager, generation, context(request), body, "cmpl")

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody, request: Request) -> JSONResponse:
        model = manager.resolve_model(Task.EMBEDDING, body.model)
        result = await manager.embed(EmbeddingRequest(body.texts(), model), context(request))
        if body.dimensions is not None and result.vectors and body.dimensions != len(result.vectors[0]):
            raise InvalidRequestError(
                f"model {model} produces {len(result.vectors[0])}-dimensional embeddings; "
                f"dimensions={body.dimensions} is not supported",
                param="dimensions",
            )
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(vec, body.encoding_format)}
            for i, vec in enumerate(result.vectors)
        ]
        # A JSONResponse skips FastAPI's per-item encoder walk: for a batch of vectors that
        # walk cost more than computing them.
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens},
            }
        )

    @router.post("/v1/rerank")
    @router.post("/rerank", include_in_schema=False)
    async def rerank(body: RerankBody, request: Request) -> dict[str, Any]:
        model = manager.resolve_model(Task.RERANK, body.model)
        documents = body.document_texts()
        ctx = context(request)
        result = await manager.rerank(RerankRequest(body.query, documents, model, body.top_n), ctx)
        results = []
        for hit in result.hits:
            item: dict[str, Any] = {"index": hit.index, "relevance_score": hit.relevance_score}
            if body.return_documents:
                item["document"] = {"text": documents[hit.index]}
            results.append(item)
        return {
            "id": ctx.request_id,
            "model": model,
            "results": results,
            "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens},
            "meta": {"billed_units": {"search_units": 1}},
        }

    return router


def _encode_vector(vector: tuple[float, ...], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


async def _respond(
    manager: BackendManager,
    request: GenerationRequest,
    ctx: RequestContext,
    body: ChatCompletionBody | CompletionBody,
    id_prefix: str,
) -> Response:
    response_id = f"{id_prefix}-{ctx.request_id}"
    created = int(time.time())
    chat = isinstance(request, ChatRequest)
    if not body.stream:
        result = await manager.generate(request, ctx)
        usage = _usage(result.usage.prompt_tokens, result.usage.completion_tokens)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return JSONResponse(
            {
                "id": response_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": request.model,
                "choices": [choice],
                "usage": usage,
            },
            headers={"x-request-id": ctx.request_id, "x-backend-id": ctx.served_by or ""},
        )

    chunks = manager.stream(request, ctx)
    # Fetch the first chunk before answering, so errors that happen before any output
    # (unknown model, context too long, overload) get a real status code, not a 200.
    try:
        first = await anext(chunks)
    except InferenceError as exc:
        await chunks.aclose()
        return error_response(exc)
    except BaseException:
        await chunks.aclose()
        raise
    events = _sse_events(
        first, chunks, request.model, response_id, created, chat, body.include_usage, body.return_token_ids
    )
    return EventStreamResponse(events, headers={"x-request-id": ctx.request_id, "x-backend-id": ctx.served_by or ""})


async def _sse_events(
    first: GenerationChunk,
    rest: AsyncGenerator[GenerationChunk, None],
    model: str,
    response_id: str,
    created: int,
    chat: bool,
    include_usage: bool,
    token_ids: bool,
) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    # Every event shares its head; encoded once, not once per token.
    head = json.dumps({"id": response_id, "object": obj, "created": created, "model": model}, separators=(",", ":"))
    prefix = f'data: {head[:-1]},"choices":['.encode()

    def event(choice: dict[str, Any], usage: dict[str, int] | None = None, empty: bool = False) -> bytes:
        body = b"" if empty else json.dumps(choice, separators=(",", ":")).encode()
        tail = b"]" + (b',"usage":' + json.dumps(usage, separators=(",", ":")).encode() if include_usage else b"")
        return prefix + body + tail + b"}\n\n"

    def choice_of(chunk: GenerationChunk, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if chunk.text or role:
                delta["content"] = chunk.text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": chunk.finish_reason}
        else:
            choice = {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}
        if token_ids and chunk.token_ids:
            choice["token_ids"] = list(chunk.token_ids)
        return choice

    async with aclosing(rest):
        try:
            chunk: GenerationChunk | None = first
            is_first = True
            while chunk is not None:
                yield event(choice_of(chunk, role=is_first and chat))
                is_first = False
                if chunk.finish_reason is not None:
                    if include_usage and chunk.usage is not None:
                        usage = _usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                        yield event({}, usage=usage, empty=True)
                    break
                chunk = await anext(rest, None)
            yield b"data: [DONE]\n\n"
        except InferenceError as exc:
            # As vLLM does: the error event, then the usual terminator, so clients that
            # wait for [DONE] don't hang.
            yield sse_error_event(exc)
            yield b"data: [DONE]\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
