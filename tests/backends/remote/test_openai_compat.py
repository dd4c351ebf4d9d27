"""The OpenAI-compatible adapter's translation and failure modes, over real loopback HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

import httpx
import pytest
import trio

from backends.errors import (
    BackendFailedError,
    BackendUnavailableError,
    ContextWindowExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
)
from backends.remote.openai_compat import OpenAIBackendSettings, OpenAICompatibleBackend, _sse_lines
from backends.types import (
    BackendStatus,
    ChatRequest,
    EmbeddingRequest,
    GenerationChunk,
    GenerationParams,
    Message,
    RequestContext,
    RerankRequest,
    Task,
)
from tests.backends.remote.openai_standin import OpenAIStandin, Reply
from tests.conftest import free_port


def chat_request(text: str = "one two three four", **params: object) -> ChatRequest:
    return ChatRequest((Message("user", text),), "echo", GenerationParams(max_tokens=16, **params))  # type: ignore[arg-type]


@asynccontextmanager
async def running(
    standin: OpenAIStandin | None = None, **settings: object
) -> AsyncIterator[tuple[OpenAICompatibleBackend, OpenAIStandin]]:
    standin = standin or OpenAIStandin()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(standin.serve)
        backend = OpenAICompatibleBackend(OpenAIBackendSettings(backend_id="up", base_url=url, **settings))  # type: ignore[arg-type]
        await nursery.start(backend.run)
        yield backend, standin
        nursery.cancel_scope.cancel()


@pytest.fixture(params=["auto", "httpx"])
def http_client(request: pytest.FixtureRequest) -> str:
    """Streamed generation goes through the lean client ("auto", loopback is plain http) or httpx."""
    return str(request.param)


async def collect(backend: OpenAICompatibleBackend, request: ChatRequest) -> list[GenerationChunk]:
    async with aclosing(backend.stream(request, RequestContext(request_id="req-1"))) as chunks:
        return [chunk async for chunk in chunks]


async def test_streamed_chat_is_translated_chunk_by_chunk_with_upstream_usage(http_client: str) -> None:
    async with running(api_key="sk-test", http_client=http_client) as (backend, standin):
        chunks = await collect(backend, chat_request(temperature=0.5, seed=7, stop=("END",)))
        assert backend.describe()["streaming_client"] == ("lean" if http_client == "auto" else "httpx")
    assert [c.text for c in chunks] == ["one", " two", " three", " four", ""]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        11,
        4,
    )
    path, headers, body = standin.requests[-1]
    assert path == "/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["x-request-id"] == "req-1"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["seed"], body["stop"]) == (16, 0.5, 7, ["END"])


async def test_upstream_without_usage_counts_content_chunks(http_client: str) -> None:
    async with running(OpenAIStandin(send_usage=False), http_client=http_client) as (backend, _):
        chunks = await collect(backend, chat_request())
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_error_event_mid_stream_is_a_backend_failure_not_a_silent_end(http_client: str) -> None:
    async with running(OpenAIStandin(error_after_chunks=2), http_client=http_client) as (backend, _):
        with pytest.raises(BackendFailedError, match="engine died"):
            await collect(backend, chat_request())


async def test_stream_cut_before_finishing_is_a_backend_failure(http_client: str) -> None:
    async with running(OpenAIStandin(cut_after_chunks=2), http_client=http_client) as (backend, _):
        with pytest.raises(BackendFailedError, match="ended the stream"):
            await collect(backend, chat_request())


async def test_consumer_closing_the_stream_closes_the_upstream_request(http_client: str) -> None:
    async with running(OpenAIStandin(chunk_delay_s=0.2), http_client=http_client) as (backend, standin):
        async with aclosing(backend.stream(chat_request("a b c d e f g h"), RequestContext())) as chunks:
            assert (await anext(chunks)).text == "a"
        with trio.fail_after(5):
            await standin.stream_closed_early.wait()


@pytest.mark.parametrize(
    ("reply", "error", "quoted"),
    [
        (Reply(429, {"error": {"message": "slow down"}}, {"retry-after": "7"}), OverloadedError, "slow down"),
        (
            Reply(400, {"error": {"message": "This model's maximum context length is 2048"}}),
            ContextWindowExceededError,
            "maximum context length is 2048",
        ),
        (Reply(404, {"error": {"message": "The model `echo2` does not exist"}}), ModelNotFoundError, "echo2"),
        (Reply(422, {"detail": "temperature must be <= 2"}), InvalidRequestError, "temperature must be"),
        (Reply(401, {"error": {"message": "bad key"}}), BackendUnavailableError, "bad key"),
        (Reply(503, {"error": {"message": "loading"}}), BackendUnavailableError, "loading"),
        (Reply(500, {"error": {"message": "boom"}}), BackendFailedError, "boom"),
    ],
)
async def test_upstream_error_replies_map_to_our_errors(
    reply: Reply, error: type[Exception], quoted: str, http_client: str
) -> None:
    async with running(http_client=http_client) as (backend, standin):
        standin.next_reply = reply
        with pytest.raises(error) as caught:
            await collect(backend, chat_request())
    assert quoted in str(caught.value)
    if isinstance(caught.value, OverloadedError):
        assert caught.value.retry_after_s == 7


async def test_retryable_and_fatal_classification() -> None:
    # The manager retries elsewhere only what another backend could fix.
    assert BackendUnavailableError("x").retryable and BackendFailedError("x").retryable
    assert not InvalidRequestError("x").retryable and not ModelNotFoundError("x").retryable


async def test_unreachable_upstream_is_unhealthy_at_start_and_unavailable_per_request() -> None:
    backend = OpenAICompatibleBackend(
        OpenAIBackendSettings(backend_id="gone", base_url=f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=1)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        assert backend.status == BackendStatus.UNHEALTHY
        assert "unreachable" in backend.status_detail
        with pytest.raises(BackendUnavailableError):
            await collect(backend, chat_request())
        nursery.cancel_scope.cancel()


async def test_models_are_discovered_with_their_tasks_and_context_windows() -> None:
    standin = OpenAIStandin(
        models=[
            {"id": "chatty", "max_model_len": 8192},
            {"id": "vectors", "tasks": ["embedding"]},
            {"id": "named-embedder"},
        ]
    )
    async with running(standin, embedding_models=("named-embedder",), rerank_models=("ranker",)) as (backend, _):
        caps = backend.capabilities
    assert caps.card(Task.CHAT, "chatty") is not None and caps.card(Task.CHAT, "chatty").context_window == 8192  # type: ignore[union-attr]
    assert caps.serves(Task.COMPLETION, "chatty")
    assert caps.serves(Task.EMBEDDING, "vectors") and not caps.serves(Task.CHAT, "vectors")
    assert caps.serves(Task.EMBEDDING, "named-embedder") and not caps.serves(Task.CHAT, "named-embedder")
    assert caps.serves(Task.RERANK, "ranker")


async def test_embeddings_come_back_in_input_order_with_usage() -> None:
    async with running() as (backend, _):
        result = await backend.embed(EmbeddingRequest(("a", "bbb", "cc"), "echo"), RequestContext())
    assert [v[0] for v in result.vectors] == [1.0, 3.0, 2.0]
    assert result.usage.prompt_tokens == 9


async def test_rerank_results_are_sorted_and_cut_to_top_n() -> None:
    async with running() as (backend, _):
        result = await backend.rerank(RerankRequest("q", ("aa", "aaaa", "a"), "echo", top_n=2), RequestContext())
    assert [(h.index, h.relevance_score) for h in result.hits] == [(1, 4.0), (0, 2.0)]


class _Pieces(httpx.AsyncByteStream):
    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


async def test_sse_lines_split_across_reads_and_ending_in_crlf_come_out_whole() -> None:
    body = _Pieces(b'data: {"a"', b":1}\r\n\r\ndata: [DO", b"NE]\r\n", b": tail")
    assert [line async for line in _sse_lines(body)] == [b'data: {"a":1}', b"", b"data: [DONE]", b": tail"]
