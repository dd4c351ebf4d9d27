"""The text-embeddings-inference adapter against a stand-in TEI server on a real socket.

The stand-in's embedding of a text is `standin_vector(text)` (normalized on request) and
its rerank score is the share of query words a text contains, so results are exact.
"""

from __future__ import annotations

import random

import pytest
import trio

from backends.catalog import ModelCatalog
from backends.errors import (
    BackendFailedError,
    BackendUnavailableError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    UnsupportedTaskError,
)
from backends.manager import BackendManager, ManagerSettings
from backends.remote.tei import TEIBackend, TEISettings
from backends.types import (
    BackendStatus,
    EmbeddingRequest,
    ModelCard,
    RequestContext,
    RerankHit,
    RerankRequest,
    Task,
    Usage,
)
from tests.backends.remote.standins import Received, TEIStandIn, normalized, overlap_score, standin_vector
from tests.conftest import free_port

EMBEDDER = "BAAI/bge-small-en-v1.5"
RERANKER = "BAAI/bge-reranker-base"


async def serve(nursery: trio.Nursery, **options: object) -> TEIStandIn:
    standin = TEIStandIn(**options)  # type: ignore[arg-type]
    await nursery.start(standin.serve)
    return standin


async def start_backend(nursery: trio.Nursery, base_url: str, **settings: object) -> TEIBackend:
    backend = TEIBackend(TEISettings(base_url=base_url, **settings))  # type: ignore[arg-type]
    await nursery.start(backend.run)
    return backend


def expected_vector(text: str) -> tuple[float, ...]:
    return tuple(normalized(standin_vector(text)))


# ---- discovery ----------------------------------------------------------------------


async def test_info_tells_the_model_and_its_task(nursery: trio.Nursery) -> None:
    embedder = await serve(nursery, max_input_length=8192)
    reranker = await serve(nursery, model_id=RERANKER, kind="reranker")
    emb_backend = await start_backend(nursery, embedder.url)
    rr_backend = await start_backend(nursery, reranker.url, backend_id="tei-rerank")
    assert emb_backend.capabilities.models == (ModelCard(EMBEDDER, Task.EMBEDDING, 8192, loaded=True, owned_by="tei"),)
    assert emb_backend.capabilities.context_window == 8192
    assert rr_backend.capabilities.models == (
        ModelCard(RERANKER, Task.RERANK, 512, loaded=True, owned_by="tei-rerank"),
    )
    assert emb_backend.status == BackendStatus.HEALTHY
    assert emb_backend.describe()["max_client_batch_size"] == 32
    assert emb_backend.endpoint == embedder.url


async def test_health_checks_notice_a_redeployed_model(nursery: trio.Nursery) -> None:
    standin = await serve(nursery)
    backend = await start_backend(nursery, standin.url)
    standin.model_id = "intfloat/e5-small-v2"
    assert await backend.check_health() == BackendStatus.HEALTHY
    assert [c.id for c in backend.capabilities.models] == ["intfloat/e5-small-v2"]
    with pytest.raises(ModelNotFoundError):
        await backend.embed(EmbeddingRequest(("x",), EMBEDDER), RequestContext())


async def test_a_classifier_model_serves_no_task(nursery: trio.Nursery) -> None:
    standin = await serve(nursery, model_id="SamLowe/roberta-base-go_emotions", kind="classifier")
    backend = await start_backend(nursery, standin.url)
    assert backend.capabilities.tasks == frozenset()
    assert backend.describe()["kind"] == "classifier"


async def test_a_configured_name_replaces_the_servers_model_id(nursery: trio.Nursery) -> None:
    standin = await serve(nursery)
    backend = await start_backend(nursery, standin.url, model_name="bge-small")
    assert [c.id for c in backend.capabilities.models] == ["bge-small"]
    result = await backend.embed(EmbeddingRequest(("x",), "bge-small"), RequestContext())
    assert result.vectors == (expected_vector("x"),)


# ---- embeddings ---------------------------------------------------------------------


async def test_embeddings_are_normalized_vectors_with_teis_token_count(nursery: trio.Nursery) -> None:
    standin = await serve(nursery)
    backend = await start_backend(nursery, standin.url)
    texts = ("hello world", "three small words")
    result = await backend.embed(EmbeddingRequest(texts, EMBEDDER), RequestContext())
    assert result.vectors == tuple(expected_vector(t) for t in texts)
    assert result.usage == Usage(5)  # the x-compute-tokens header
    assert standin.received("/embed")[0].body == {"inputs": list(texts), "normalize": True, "truncate": True}
    assert backend.capabilities.models[0].dimensions == 3


async def test_large_requests_are_split_into_server_sized_batches_sent_concurrently_in_order(
    nursery: trio.Nursery,
) -> None:
    standin = await serve(nursery, max_client_batch_size=3)
    backend = await start_backend(nursery, standin.url)
    texts = tuple(f"text number {i} " + "pad " * i for i in range(8))

    def first_batch_is_slowest(request: Received) -> float:
        # Every batch is slow enough to overlap the others; the first answers last.
        return 0.4 if request.path == "/embed" and request.body["inputs"][0] == texts[0] else 0.2

    standin.delay_for = first_batch_is_slowest
    result = await backend.embed(EmbeddingRequest(texts, EMBEDDER), RequestContext())
    assert result.vectors == tuple(expected_vector(t) for t in texts)
    batches = sorted(r.body["inputs"] for r in standin.received("/embed"))  # arrival order is up to the network
    assert batches == [list(texts[0:3]), list(texts[3:6]), list(texts[6:8])]
    assert standin.max_in_flight == 3
    assert result.usage == Usage(sum(len(t.split()) for t in texts))


async def test_usage_is_zero_when_the_token_header_is_missing(nursery: trio.Nursery) -> None:
    standin = await serve(nursery, token_headers=False)
    backend = await start_backend(nursery, standin.url)
    result = await backend.embed(EmbeddingRequest(("a b c",), EMBEDDER), RequestContext())
    assert result.usage == Usage(0)
    assert result.vectors == (expected_vector("a b c"),)


async def test_one_failed_batch_fails_the_request_with_that_error(nursery: trio.Nursery) -> None:
    standin = await serve(nursery, max_client_batch_size=2)
    backend = await start_backend(nursery, standin.url)
    standin.fail("/embed", 500, {"error": "CUDA error: out of memory", "error_type": "Backend"})
    with pytest.raises(BackendFailedError, match="out of memory"):
        await backend.embed(EmbeddingRequest(("a", "b", "c", "d", "e"), EMBEDDER), RequestContext())


async def test_a_model_the_server_does_not_run_is_not_found_without_asking_it(nursery: trio.Nursery) -> None:
    standin = await serve(nursery)
    backend = await start_backend(nursery, standin.url)
    with pytest.raises(ModelNotFoundError, match="text-embedding-3-small"):
        await backend.embed(EmbeddingRequest(("x",), "text-embedding-3-small"), RequestContext())
    with pytest.raises(UnsupportedTaskError):
        await backend.rerank(RerankRequest("q", ("d",), EMBEDDER), RequestContext())
    assert standin.received("/embed") == standin.received("/rerank") == []


# ---- rerank -------------------------------------------------------------------------


async def test_rerank_hits_are_sorted_best_first_and_cut_to_top_n(nursery: trio.Nursery) -> None:
    standin = await serve(nursery, model_id=RERANKER, kind="reranker")
    backend = await start_backend(nursery, standin.url)
    query = "red fox jumps"
    docs = ("a blue whale", "the red fox jumps high", "a red car", "fox and hound")
    result = await backend.rerank(RerankRequest(query, docs, RERANKER, top_n=3), RequestContext())
    assert result.hits == (RerankHit(1, 1.0), RerankHit(2, 1 / 3), RerankHit(3, 1 / 3))
    assert standin.received("/rerank")[0].body == {
        "query": query,
        "texts": list(docs),
        "raw_scores": False,
        "return_text": False,
        "truncate": True,
    }
    assert result.usage == Usage(sum(len(query.split()) + len(d.split()) for d in docs))


async def test_rerank_of_many_documents_is_batched_and_merged_by_score(nursery: trio.Nursery) -> None:
    standin = await serve(nursery, model_id=RERANKER, kind="reranker", max_client_batch_size=2)
    backend = await start_backend(nursery, standin.url)
    query = "alpha beta gamma delta"
    docs = ("alpha", "nothing here", "alpha beta gamma delta", "beta gamma", "alpha beta gamma")
    result = await backend.rerank(RerankRequest(query, docs, RERANKER), RequestContext())
    assert [h.index for h in result.hits] == [2, 4, 3, 0, 1]
    assert [h.relevance_score for h in result.hits] == [overlap_score(query, docs[h.index]) for h in result.hits]
    assert len(standin.received("/rerank")) == 3


# ---- failures -----------------------------------------------------------------------


async def test_payload_too_large_is_an_invalid_request(nursery: trio.Nursery) -> None:
    standin = await serve(nursery, payload_limit=100)
    backend = await start_backend(nursery, standin.url)
    with pytest.raises(InvalidRequestError, match=r"413.*length limit exceeded") as caught:
        await backend.embed(EmbeddingRequest(("word " * 50,), EMBEDDER), RequestContext())
    assert not caught.value.retryable


async def test_an_overloaded_server_is_an_overloaded_error(nursery: trio.Nursery) -> None:
    standin = await serve(nursery)
    backend = await start_backend(nursery, standin.url)
    standin.fail("/embed", 429, {"error": "Model is overloaded", "error_type": "Overloaded"})
    with pytest.raises(OverloadedError, match="Model is overloaded"):
        await backend.embed(EmbeddingRequest(("x",), EMBEDDER), RequestContext())


async def test_a_validation_error_is_an_invalid_request(nursery: trio.Nursery) -> None:
    standin = await serve(nursery)
    backend = await start_backend(nursery, standin.url)
    message = "Input validation error: `inputs` must have less than 512 tokens. Given: 600"
    standin.fail("/embed", 422, {"error": message, "error_type": "Validation"})
    with pytest.raises(InvalidRequestError, match="must have less than 512 tokens"):
        await backend.embed(EmbeddingRequest(("x",), EMBEDDER), RequestContext())


async def test_a_model_failure_is_a_backend_failed_error(nursery: trio.Nursery) -> None:
    standin = await serve(nursery)
    backend = await start_backend(nursery, standin.url)
    standin.fail("/embed", 424, {"error": "Inference failed", "error_type": "Backend"})
    with pytest.raises(BackendFailedError, match="Inference failed"):
        await backend.embed(EmbeddingRequest(("x",), EMBEDDER), RequestContext())


async def test_an_unhealthy_server_marks_the_backend_unhealthy(nursery: trio.Nursery) -> None:
    standin = await serve(nursery)
    backend = await start_backend(nursery, standin.url)
    standin.healthy = False
    assert await backend.check_health() == BackendStatus.UNHEALTHY
    assert "unhealthy" in backend.status_detail
    standin.healthy = True
    assert await backend.check_health() == BackendStatus.HEALTHY


async def test_an_unreachable_server_is_unavailable_until_it_answers_info(nursery: trio.Nursery) -> None:
    port = free_port()
    backend = await start_backend(nursery, f"http://127.0.0.1:{port}")
    assert backend.status == BackendStatus.UNHEALTHY
    assert backend.capabilities.models == ()
    with pytest.raises(BackendUnavailableError):
        await backend.embed(EmbeddingRequest(("x",), EMBEDDER), RequestContext())


async def test_the_api_key_is_sent_as_a_bearer_token(nursery: trio.Nursery) -> None:
    standin = await serve(nursery, api_key="s3cret")
    backend = await start_backend(nursery, standin.url, api_key="s3cret")
    await backend.embed(EmbeddingRequest(("x",), EMBEDDER), RequestContext())
    assert standin.received("/embed")[0].headers["authorization"] == "Bearer s3cret"
    keyless = await start_backend(nursery, standin.url, backend_id="keyless")
    with pytest.raises(BackendUnavailableError, match="credentials"):
        await keyless.embed(EmbeddingRequest(("x",), EMBEDDER), RequestContext())


# ---- through the manager ------------------------------------------------------------


async def test_the_manager_serves_embeddings_and_rerank_through_tei(nursery: trio.Nursery) -> None:
    embedder = await serve(nursery)
    reranker = await serve(nursery, model_id=RERANKER, kind="reranker")
    emb_backend = TEIBackend(TEISettings(base_url=embedder.url, backend_id="tei-embed"))
    rr_backend = TEIBackend(TEISettings(base_url=reranker.url, backend_id="tei-rerank"))
    manager = BackendManager(
        ManagerSettings(health_check_interval_s=3600),
        ModelCatalog(defaults={Task.EMBEDDING: EMBEDDER, Task.RERANK: RERANKER}, aliases={"bge": EMBEDDER}),
        rng=random.Random(7),
    )
    manager.register(emb_backend)
    manager.register(rr_backend)
    await nursery.start(manager.run)

    ctx = RequestContext()
    model = manager.resolve_model(Task.EMBEDDING, "bge")
    embedded = await manager.embed(EmbeddingRequest(("embed me",), model), ctx)
    assert embedded.vectors == (expected_vector("embed me"),)
    assert ctx.served_by == "tei-embed"

    ctx = RequestContext()
    ranked = await manager.rerank(RerankRequest("red fox", ("blue", "red fox"), RERANKER, top_n=1), ctx)
    assert ranked.hits == (RerankHit(1, 1.0),)
    assert ctx.served_by == "tei-rerank"
    assert emb_backend.metrics.requests_ok == rr_backend.metrics.requests_ok == 1


async def test_a_slow_server_past_the_deadline_is_deadline_exceeded(nursery: trio.Nursery) -> None:
    standin = await serve(nursery)
    backend = TEIBackend(TEISettings(base_url=standin.url))
    manager = BackendManager(ManagerSettings(health_check_interval_s=3600), rng=random.Random(7))
    manager.register(backend)
    await nursery.start(manager.run)
    standin.delay_for = lambda request: 10.0 if request.path == "/embed" else 0.0
    started = trio.current_time()
    with pytest.raises(DeadlineExceededError):
        await manager.embed(EmbeddingRequest(("x",), EMBEDDER), RequestContext(deadline=started + 0.3))
    assert trio.current_time() - started < 2
    assert backend.metrics.in_flight == 0
