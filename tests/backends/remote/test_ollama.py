"""The Ollama adapter against a stand-in Ollama server on a real loopback socket.

The stand-in echoes the last user message word by word and reports word counts as its
token counts, so every assertion here is about the exact translation between Ollama's
native API and our types.
"""

from __future__ import annotations

import random
from contextlib import aclosing

import pytest
import trio

from backends.catalog import ModelCatalog
from backends.errors import BackendFailedError, BackendUnavailableError, DeadlineExceededError, ModelNotFoundError
from backends.manager import BackendManager, ManagerSettings
from backends.remote.ollama import OllamaBackend, OllamaSettings
from backends.types import (
    BackendStatus,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationChunk,
    GenerationParams,
    GenerationRequest,
    Message,
    ModelCard,
    RequestContext,
    Task,
    Usage,
)
from tests.backends.remote.standins import OllamaModel, OllamaStandIn, normalized, standin_vector
from tests.conftest import free_port


@pytest.fixture
async def ollama(nursery: trio.Nursery) -> OllamaStandIn:
    standin = OllamaStandIn()
    await nursery.start(standin.serve)
    return standin


async def start_backend(nursery: trio.Nursery, base_url: str, **settings: object) -> OllamaBackend:
    backend = OllamaBackend(OllamaSettings(base_url=base_url, **settings))  # type: ignore[arg-type]
    await nursery.start(backend.run)
    return backend


def chat(text: str, model: str = "llama3.2", **params: object) -> ChatRequest:
    return ChatRequest(
        (Message("system", "answer briefly"), Message("user", text)),
        model,
        GenerationParams(**{"max_tokens": 64, **params}),  # type: ignore[arg-type]
    )


async def collect(backend: OllamaBackend, request: GenerationRequest) -> list[GenerationChunk]:
    async with aclosing(backend.stream(request, RequestContext())) as chunks:
        return [chunk async for chunk in chunks]


def card_ids(backend: OllamaBackend, task: Task) -> set[str]:
    return {card.id for card in backend.capabilities.models if card.task == task}


# ---- generation ---------------------------------------------------------------------


async def test_chat_streams_the_answer_in_order_and_ends_with_ollamas_token_counts(
    nursery: trio.Nursery, ollama: OllamaStandIn
) -> None:
    backend = await start_backend(nursery, ollama.url)
    chunks = await collect(backend, chat("the quick brown fox"))
    assert [c.text for c in chunks] == ["the", " quick", " brown", " fox", ""]
    assert [c.finish_reason for c in chunks] == [None, None, None, None, "stop"]
    # prompt_eval_count: 2 system words + 4 user words; eval_count: 4 tokens.
    assert chunks[-1].usage == Usage(prompt_tokens=6, completion_tokens=4)
    assert all(c.usage is None for c in chunks[:-1])


async def test_generation_parameters_reach_ollama_as_options(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url, keep_alive="10m")
    chunks = await collect(backend, chat("one two three four", max_tokens=2, temperature=0.3, top_p=0.9, seed=7))
    [received] = ollama.received("/api/chat")
    assert received.body == {
        "model": "llama3.2",
        "stream": True,
        "messages": [
            {"role": "system", "content": "answer briefly"},
            {"role": "user", "content": "one two three four"},
        ],
        "options": {"temperature": 0.3, "top_p": 0.9, "num_predict": 2, "seed": 7},
        "keep_alive": "10m",
    }
    assert "".join(c.text for c in chunks) == "one two"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage == Usage(6, 2)


async def test_stop_sequences_are_sent_as_a_list(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url)
    chunks = await collect(backend, chat("alpha beta STOP gamma", stop=("STOP", "END")))
    assert ollama.received("/api/chat")[0].body["options"]["stop"] == ["STOP", "END"]
    assert "keep_alive" not in ollama.received("/api/chat")[0].body  # the server's default rules
    assert "".join(c.text for c in chunks) == "alpha beta"
    assert chunks[-1].finish_reason == "stop"


async def test_completion_posts_the_prompt_to_api_generate(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url)
    request = CompletionRequest("once upon a time", "llama3.2", GenerationParams(max_tokens=16))
    chunks = await collect(backend, request)
    assert [c.text for c in chunks] == ["once", " upon", " a", " time", ""]
    assert chunks[-1].usage == Usage(4, 4)
    [received] = ollama.received("/api/generate")
    assert received.body["prompt"] == "once upon a time"
    assert received.body["stream"] is True
    assert "raw" not in received.body and "messages" not in received.body


async def test_raw_completions_skip_the_prompt_template(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url, raw_completions=True)
    await collect(backend, CompletionRequest("def f():", "llama3.2", GenerationParams(max_tokens=4)))
    assert ollama.received("/api/generate")[0].body["raw"] is True


# ---- embeddings ---------------------------------------------------------------------


async def test_embeddings_come_from_api_embed_with_the_prompt_token_count(
    nursery: trio.Nursery, ollama: OllamaStandIn
) -> None:
    backend = await start_backend(nursery, ollama.url, embedding_models=("nomic-embed-text",))
    texts = ("hello world", "a b c")
    result = await backend.embed(EmbeddingRequest(texts, "nomic-embed-text"), RequestContext())
    assert result.vectors == tuple(tuple(normalized(standin_vector(t))) for t in texts)
    assert result.usage == Usage(5)
    assert result.model == "nomic-embed-text" and result.backend_id == "ollama"
    assert ollama.received("/api/embed")[0].body == {"model": "nomic-embed-text", "input": ["hello world", "a b c"]}
    # The vector size learned from the reply shows on the model card.
    [card] = [c for c in backend.capabilities.models if c.id == "nomic-embed-text"]
    assert card.dimensions == 3


# ---- models -------------------------------------------------------------------------


async def test_models_are_discovered_from_api_tags_and_configured_embedders_embed(
    nursery: trio.Nursery, ollama: OllamaStandIn
) -> None:
    backend = await start_backend(nursery, ollama.url, embedding_models=("nomic-embed-text",))
    assert backend.status == BackendStatus.HEALTHY
    # Each :latest model is also offered under its bare name, as Ollama itself accepts it.
    assert card_ids(backend, Task.CHAT) == {"llama3.2:latest", "llama3.2"}
    assert card_ids(backend, Task.COMPLETION) == {"llama3.2:latest", "llama3.2"}
    assert card_ids(backend, Task.EMBEDDING) == {"nomic-embed-text:latest", "nomic-embed-text"}
    assert backend.describe()["models"]["nomic-embed-text:latest"]["family"] == "nomic-bert"  # type: ignore[index]


async def test_unlisted_embedders_count_as_chat_models_unless_the_server_lists_capabilities(
    nursery: trio.Nursery,
) -> None:
    old, new = OllamaStandIn(), OllamaStandIn(advertise_capabilities=True)
    await nursery.start(old.serve)
    await nursery.start(new.serve)
    old_backend = await start_backend(nursery, old.url)
    new_backend = await start_backend(nursery, new.url, backend_id="ollama-new")
    assert "nomic-embed-text" in card_ids(old_backend, Task.CHAT)
    assert card_ids(old_backend, Task.EMBEDDING) == set()
    assert card_ids(new_backend, Task.EMBEDDING) == {"nomic-embed-text:latest", "nomic-embed-text"}
    assert "nomic-embed-text" not in card_ids(new_backend, Task.CHAT)


async def test_health_checks_refresh_the_discovered_models(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url)
    assert "qwen2.5:0.5b" not in card_ids(backend, Task.CHAT)
    ollama.models.append(OllamaModel("qwen2.5:0.5b", family="qwen2", context_length=32768))
    assert await backend.check_health() == BackendStatus.HEALTHY
    [card] = [c for c in backend.capabilities.models if c.id == "qwen2.5:0.5b" and c.task == Task.CHAT]
    assert card.context_window == 32768
    assert len(ollama.received("/api/tags")) == 2


async def test_an_explicit_model_list_is_served_without_discovery(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url, models=("llama3.2",), embedding_models=("nomic-embed-text",))
    assert await backend.check_health() == BackendStatus.HEALTHY
    assert card_ids(backend, Task.CHAT) == {"llama3.2"}
    assert card_ids(backend, Task.EMBEDDING) == {"nomic-embed-text"}
    assert ollama.received("/api/tags") == []
    assert len(ollama.received("/api/version")) == 2  # the health probe instead
    assert backend.describe()["version"] == "0.12.6"


async def test_load_and_unload_set_keep_alive_and_the_loaded_flag(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url, keep_alive="1h")

    def loaded() -> bool:
        card = backend.capabilities.card(Task.CHAT, "llama3.2")
        assert isinstance(card, ModelCard)
        return card.loaded

    assert not loaded()
    await backend.load_model("llama3.2")
    assert ollama.received("/api/generate")[-1].body == {"model": "llama3.2", "keep_alive": "1h", "stream": False}
    assert ollama.loaded == {"llama3.2:latest": "1h"}
    assert loaded()
    await backend.unload_model("llama3.2")
    assert ollama.received("/api/generate")[-1].body == {"model": "llama3.2", "keep_alive": 0, "stream": False}
    assert ollama.loaded == {}
    assert not loaded()


async def test_loaded_models_are_read_from_api_ps(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url)
    ollama.loaded["llama3.2:latest"] = "5m"  # loaded by another client of the same server
    await backend.check_health()
    card = backend.capabilities.card(Task.CHAT, "llama3.2:latest")
    assert card is not None and card.loaded and card.context_window == 4096


# ---- failures -----------------------------------------------------------------------


async def test_an_unknown_model_is_model_not_found(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url)
    with pytest.raises(ModelNotFoundError, match="mistral"):
        await collect(backend, chat("hi", model="mistral"))
    with pytest.raises(ModelNotFoundError, match="mistral"):
        await backend.load_model("mistral")


async def test_a_server_error_is_a_retryable_backend_failure(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url)
    ollama.fail("/api/chat", 500, {"error": "llama runner process has terminated: signal: killed"})
    with pytest.raises(BackendFailedError, match="llama runner process has terminated") as caught:
        await collect(backend, chat("hi"))
    assert caught.value.retryable
    ollama.fail("/api/embed", 500, {"error": "out of memory"})
    with pytest.raises(BackendFailedError, match="out of memory"):
        await backend.embed(EmbeddingRequest(("x",), "nomic-embed-text"), RequestContext())


async def test_an_unreachable_server_is_unavailable_and_unhealthy(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, f"http://127.0.0.1:{free_port()}")
    assert backend.status == BackendStatus.UNHEALTHY
    assert "unreachable" in backend.status_detail
    with pytest.raises(BackendUnavailableError, match="unreachable"):
        await collect(backend, chat("hi"))


async def test_a_failing_health_probe_marks_the_backend_unhealthy(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url)
    ollama.fail("/api/tags", 500, {"error": "disk I/O error"})
    assert await backend.check_health() == BackendStatus.UNHEALTHY
    assert "disk I/O error" in backend.status_detail
    assert await backend.check_health() == BackendStatus.HEALTHY


async def test_upstream_dying_mid_stream_is_a_backend_failed_error(
    nursery: trio.Nursery, ollama: OllamaStandIn
) -> None:
    backend = await start_backend(nursery, ollama.url)
    ollama.die_after_lines = 2
    received: list[str] = []
    with pytest.raises(BackendFailedError, match="broke off the answer"):
        async with aclosing(backend.stream(chat("one two three four"), RequestContext())) as chunks:
            async for chunk in chunks:
                received.append(chunk.text)
    assert received == ["one", " two"]


async def test_an_error_line_mid_stream_is_raised_with_ollamas_message(
    nursery: trio.Nursery, ollama: OllamaStandIn
) -> None:
    backend = await start_backend(nursery, ollama.url)
    ollama.error_after_lines = 1
    received: list[str] = []
    with pytest.raises(BackendFailedError, match="an error was encountered while running the model"):
        async with aclosing(backend.stream(chat("one two three"), RequestContext())) as chunks:
            async for chunk in chunks:
                received.append(chunk.text)
    assert received == ["one"]


async def test_closing_the_stream_early_closes_the_upstream_request(
    nursery: trio.Nursery, ollama: OllamaStandIn
) -> None:
    backend = await start_backend(nursery, ollama.url)
    ollama.line_delay_s = 0.05
    async with aclosing(backend.stream(chat(" ".join(["word"] * 400)), RequestContext())) as chunks:
        async for _ in chunks:
            break
    with trio.fail_after(5):
        await ollama.disconnected.wait()
    assert ollama.completed_streams == 0


async def test_a_cancelled_caller_closes_the_upstream_request(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url)
    ollama.line_delay_s = 0.05
    received: list[str] = []
    with trio.move_on_after(0.3) as scope:
        async with aclosing(backend.stream(chat(" ".join(["word"] * 400)), RequestContext())) as chunks:
            async for chunk in chunks:
                received.append(chunk.text)
    assert scope.cancelled_caught
    assert 0 < len(received) < 400
    with trio.fail_after(5):
        await ollama.disconnected.wait()
    assert ollama.completed_streams == 0


async def test_the_api_key_is_sent_as_a_bearer_token(nursery: trio.Nursery, ollama: OllamaStandIn) -> None:
    backend = await start_backend(nursery, ollama.url, api_key="s3cret")
    await collect(backend, chat("hi"))
    assert ollama.received("/api/chat")[0].headers["authorization"] == "Bearer s3cret"
    assert ollama.received("/api/tags")[0].headers["authorization"] == "Bearer s3cret"


# ---- through the manager ------------------------------------------------------------


async def running_manager(nursery: trio.Nursery, backend: OllamaBackend) -> BackendManager:
    manager = BackendManager(
        ManagerSettings(health_check_interval_s=3600),
        ModelCatalog(defaults={Task.CHAT: "llama3.2", Task.EMBEDDING: "nomic-embed-text"}),
        rng=random.Random(7),
    )
    manager.register(backend)
    await nursery.start(manager.run)
    return manager


async def test_the_manager_serves_chat_and_embeddings_through_ollama(
    nursery: trio.Nursery, ollama: OllamaStandIn
) -> None:
    backend = OllamaBackend(OllamaSettings(base_url=ollama.url, embedding_models=("nomic-embed-text",)))
    manager = await running_manager(nursery, backend)

    chunks: list[GenerationChunk] = []
    async with aclosing(manager.stream(chat("hello from the manager"), RequestContext())) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    assert "".join(c.text for c in chunks) == "hello from the manager"
    assert chunks[-1].usage == Usage(6, 4)
    assert backend.metrics.requests_ok == 1
    assert backend.metrics.tokens_generated == 4

    ctx = RequestContext()
    result = await manager.embed(EmbeddingRequest(("embed me",), "nomic-embed-text"), ctx)
    assert result.vectors == (tuple(normalized(standin_vector("embed me"))),)
    assert ctx.served_by == "ollama"
    assert backend.metrics.in_flight == 0


async def test_a_stream_past_its_deadline_fails_and_closes_the_upstream_request(
    nursery: trio.Nursery, ollama: OllamaStandIn
) -> None:
    backend = OllamaBackend(OllamaSettings(base_url=ollama.url))
    manager = await running_manager(nursery, backend)
    ollama.line_delay_s = 0.05
    ctx = RequestContext(deadline=trio.current_time() + 0.3)
    received: list[str] = []
    with pytest.raises(DeadlineExceededError):
        async with aclosing(manager.stream(chat(" ".join(["word"] * 400)), ctx)) as chunks:
            async for chunk in chunks:
                received.append(chunk.text)
    assert 0 < len(received) < 400
    with trio.fail_after(5):
        await ollama.disconnected.wait()
    assert backend.metrics.in_flight == 0
