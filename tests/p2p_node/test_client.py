"""The Python client seed 000's backend used, against a real node over loopback HTTP."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from p2p_node import client as client_module
from p2p_node.client import (
    AsyncUnifiedInferenceClient,
    BadRequestError,
    BentoMLClient,
    InferenceAPIError,
    InferenceClientError,
    InferenceConnectionError,
    InferenceTimeoutError,
    InvalidResponseError,
    ModelNotFoundError,
    UnifiedInferenceClient,
    default_base_url,
    get_bentoml_client,
)
from tests.conftest import REPO_ROOT, NodeProcess, free_port

TINY = "tiny-random-llama"
MINILM = "all-MiniLM-L6-v2"


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


@pytest.fixture
def node_client(tiny_node: NodeProcess) -> Iterator[UnifiedInferenceClient]:
    with UnifiedInferenceClient(tiny_node.url) as client:
        yield client


# ---- the three calls, with the endpoints' default models ------------------------------------


def test_embed_uses_the_default_embedding_model(node_client: UnifiedInferenceClient) -> None:
    vectors = node_client.embed(["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell sharply."])
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)  # all-MiniLM-L6-v2
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    assert node_client.embed([]) == []
    # Naming the model gives the same vectors as leaving it out.
    assert node_client.embed("A cat sits on the mat.", model=MINILM) == [pytest.approx(vectors[0], abs=1e-4)]


def test_rerank_puts_the_relevant_document_first_and_honours_top_n(node_client: UnifiedInferenceClient) -> None:
    documents = ["Bananas are yellow fruit.", "Paris is the capital of France.", "Rust is a programming language."]
    hits = node_client.rerank("What is the capital of France?", documents, top_n=2)
    assert len(hits) == 2
    assert hits[0]["index"] == 1 and hits[0]["text"] == documents[1]
    assert hits[0]["relevance_score"] == hits[0]["score"] >= hits[1]["score"]
    assert len(node_client.rerank("capital", documents)) == 3


def test_chat_uses_the_default_chat_model(node_client: UnifiedInferenceClient, tiny_node: NodeProcess) -> None:
    reply = node_client.chat([{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0.0)
    assert isinstance(reply, str) and reply
    # The same request as plain HTTP without a model: the client added nothing a node would refuse.
    plain = httpx.post(
        tiny_node.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0.0},
        timeout=60,
    ).json()
    assert plain["model"] == TINY and plain["choices"][0]["message"]["content"] == reply


def test_infer_health_models_and_status(node_client: UnifiedInferenceClient) -> None:
    envelope = node_client.infer("Hello", model="generator", parameters={"max_length": 2})
    assert envelope["success"] is True and envelope["model_used"] == "generator:v1"
    assert node_client.health_check() is True
    models = node_client.get_models()
    assert models[TINY]["loaded"] is True and "chat" in models[TINY]["tasks"]
    assert TINY in {m["id"] for m in node_client.status()["loaded_models"]}


async def test_the_async_client_offers_the_same_calls(tiny_node: NodeProcess) -> None:
    async with AsyncUnifiedInferenceClient(tiny_node.url) as client:
        vectors = await client.embed(["one", "two"])
        assert len(vectors) == 2 and len(vectors[0]) == 384
        hits = await client.rerank("capital of France", ["bananas", "Paris is in France"], top_n=1)
        assert [h["index"] for h in hits] == [1]
        assert await client.chat("Say hi.", max_tokens=3, temperature=0.0)
        assert (await client.infer("Hi", model="generator", parameters={"max_length": 2}))["success"] is True
        assert await client.health_check() is True
        assert TINY in await client.get_models()
        assert "memory" in await client.status()
        with pytest.raises(ModelNotFoundError):
            await client.chat("hi", model="no-such-model")


# ---- seed 000's names and settings ----------------------------------------------------------


def test_the_legacy_names_still_work(tiny_node: NodeProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    assert BentoMLClient is UnifiedInferenceClient
    monkeypatch.delenv("INFERENCE_URL", raising=False)
    monkeypatch.setenv("BENTOML_URL", tiny_node.url)
    monkeypatch.setattr(client_module, "_shared", None)
    shared = get_bentoml_client()
    try:
        assert shared is get_bentoml_client()
        assert shared.base_url == tiny_node.url
        assert shared.health_check() is True
        assert len(shared.embed(["legacy"])[0]) == 384
    finally:
        shared.close()


def test_base_url_comes_from_inference_url_then_bentoml_url() -> None:
    both = {"INFERENCE_URL": "http://new:3001", "BENTOML_URL": "http://old:3001"}
    assert default_base_url(both) == "http://new:3001"
    assert default_base_url({"BENTOML_URL": "http://old:3001"}) == "http://old:3001"
    assert default_base_url({"INFERENCE_URL": " ", "BENTOML_URL": "http://old:3001"}) == "http://old:3001"
    assert default_base_url({}) == "http://localhost:8000"
    assert UnifiedInferenceClient("http://given:1/").base_url == "http://given:1"


def test_importing_the_client_does_not_import_torch() -> None:
    probe = "import sys, p2p_node.client; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["False", "False"]


# ---- errors ---------------------------------------------------------------------------------


def test_an_unknown_model_is_a_model_not_found_error_with_the_nodes_message(
    node_client: UnifiedInferenceClient,
) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        node_client.chat([{"role": "user", "content": "hi"}], model="no-such-model", max_tokens=2)
    error = caught.value
    assert error.status_code == 404 and error.code == "model_not_found" and error.param == "model"
    assert "no-such-model" in error.message and TINY in error.message
    # Seed 000's callers caught httpx's exception; they still do.
    assert isinstance(error, httpx.HTTPStatusError) and error.response.status_code == 404


def test_a_bad_request_is_a_bad_request_error_naming_the_parameter(node_client: UnifiedInferenceClient) -> None:
    with pytest.raises(BadRequestError) as caught:
        node_client.rerank("query", ["a", "b"], top_n=0)
    assert caught.value.status_code == 400 and caught.value.param == "top_n"
    with pytest.raises(InferenceAPIError) as envelope_error:
        node_client.infer("x", model="generator", parameters={"beams": 2})
    assert envelope_error.value.code == "invalid_request" and "beams" in envelope_error.value.message


def test_an_unreachable_node_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with UnifiedInferenceClient(url, timeout=5) as client:
        with pytest.raises(InferenceConnectionError, match=f"cannot reach the inference node at {url}") as caught:
            client.embed(["x"])
        assert isinstance(caught.value, httpx.TransportError)
        assert client.health_check() is False


def test_a_node_that_never_answers_is_a_timeout_error() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) and never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with UnifiedInferenceClient(url, timeout=0.5) as client, pytest.raises(InferenceTimeoutError) as caught:
            client.chat("hi")
    assert isinstance(caught.value, httpx.TimeoutException) and isinstance(caught.value, InferenceClientError)


class _NotANode(BaseHTTPRequestHandler):
    """Answers 200 with JSON that is not what any node endpoint returns."""

    def do_POST(self) -> None:
        body = json.dumps({"unexpected": True}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_answer_that_is_not_what_the_endpoint_promises_is_an_invalid_response_error() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotANode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with UnifiedInferenceClient(f"http://127.0.0.1:{server.server_address[1]}", timeout=10) as client:
            with pytest.raises(InvalidResponseError, match="no 'data'"):
                client.embed(["x"])
            with pytest.raises(InvalidResponseError, match="no 'choices'"):
                client.chat("hi")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---- content, on the real default models -----------------------------------------------------


@pytest.mark.slow
def test_chat_answers_with_the_real_default_model(real_node: NodeProcess) -> None:
    with UnifiedInferenceClient(real_node.url) as client:
        answer = client.chat(
            [{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0
        )
    assert "Paris" in answer
