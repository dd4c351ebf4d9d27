"""Bad input gets an OpenAI error object with the right status and the node keeps
serving; admin and status endpoints report the truth. Runs against a node whose chat
model is the tiny random Llama (plumbing only: its words mean nothing)."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import TINY_CONFIG, NodeProcess, start_node

TINY = "tiny-random-llama"


def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def assert_still_serving(node: NodeProcess) -> None:
    messages = [{"role": "user", "content": "hi"}]
    answer = client(node).chat.completions.create(model=TINY, messages=messages, max_tokens=3)
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_unknown_model_is_a_404_with_the_available_models(tiny_node: NodeProcess) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(tiny_node).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    assert TINY in info.value.message
    assert_still_serving(tiny_node)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages.0.content"),
        ({}, "messages"),
    ],
)
def test_invalid_chat_parameters_are_400_naming_the_parameter(
    tiny_node: NodeProcess, body: dict[str, object], param: str
) -> None:
    error = assert_error(httpx.post(tiny_node.url + "/v1/chat/completions", json=body, timeout=30), 400)
    assert error["type"] == "invalid_request_error"
    assert str(error["param"]).startswith(param)


def test_invalid_json_is_a_400(tiny_node: NodeProcess) -> None:
    response = httpx.post(
        tiny_node.url + "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    error = assert_error(response, 400)
    assert "JSON" in str(error["message"])


def test_absurd_max_tokens_is_refused_with_the_context_window(tiny_node: NodeProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(tiny_node).chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=100_000
        )
    assert info.value.code == "context_length_exceeded"
    assert "context window" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client(tiny_node).chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=10**12
        )
    assert_still_serving(tiny_node)


def test_absurd_max_tokens_on_a_stream_is_an_error_status_not_a_broken_stream(tiny_node: NodeProcess) -> None:
    response = httpx.post(
        tiny_node.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000, "stream": True},
        timeout=30,
    )
    assert_error(response, 400, "context_length_exceeded")


def test_oversized_body_is_a_413(tiny_node: NodeProcess) -> None:
    huge = "x" * (5 * 1024 * 1024)
    response = httpx.post(
        tiny_node.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": huge}]},
        timeout=60,
    )
    assert_error(response, 413, "request_too_large")
    assert_still_serving(tiny_node)


def test_unsupported_features_are_refused_rather_than_ignored(tiny_node: NodeProcess) -> None:
    response = httpx.post(
        tiny_node.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        timeout=30,
    )
    assert "tools" in str(assert_error(response, 400)["message"])


def test_bad_embedding_and_rerank_input(tiny_node: NodeProcess) -> None:
    assert_error(httpx.post(tiny_node.url + "/v1/embeddings", json={"input": []}, timeout=30), 400)
    assert_error(httpx.post(tiny_node.url + "/v1/embeddings", json={"input": [""]}, timeout=30), 400)
    assert_error(httpx.post(tiny_node.url + "/v1/embeddings", json={"input": "x", "model": "nope"}, timeout=30), 404)
    assert_error(httpx.post(tiny_node.url + "/v1/rerank", json={"query": "q", "documents": []}, timeout=30), 400)
    assert_error(httpx.post(tiny_node.url + "/v1/rerank", json={"documents": ["d"]}, timeout=30), 400)


def test_unknown_route_is_an_openai_shaped_404(tiny_node: NodeProcess) -> None:
    assert_error(httpx.get(tiny_node.url + "/v1/nothing-here", timeout=10), 404)


def test_health_ready_and_status_report_the_node(tiny_node: NodeProcess) -> None:
    assert httpx.get(tiny_node.url + "/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(tiny_node.url + "/ready", timeout=10).json()["ready"] is True
    status = httpx.get(tiny_node.url + "/status", timeout=10).json()
    assert status["node"]["uptime_s"] >= 0
    assert status["node"]["http"] == [tiny_node.url]
    (local,) = status["manager"]["backends"]
    assert local["type"] == "local" and local["status"] == "healthy"
    assert local["capabilities"]["batching"] is True
    assert set(local["metrics"]) >= {"requests_total", "in_flight", "queue_size", "ttft_ewma_ms", "uptime_s"}
    assert TINY in local["details"]["loaded_models"]
    assert httpx.get(tiny_node.url + "/v1/status", timeout=10).status_code == 200


def test_metrics_are_prometheus_text_with_vllm_style_names(tiny_node: NodeProcess) -> None:
    client(tiny_node).chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    stream = client(tiny_node).chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert list(stream)
    with pytest.raises(openai.NotFoundError):
        client(tiny_node).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    response = httpx.get(tiny_node.url + "/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    labels = f'backend="local",model="{TINY}"'
    for name in (
        f"p2p_node:time_to_first_token_seconds_count{{{labels}}}",
        "p2p_node:time_to_first_token_seconds_bucket{",
        f"p2p_node:inter_token_latency_seconds_count{{{labels}}}",
        f'p2p_node:e2e_request_latency_seconds_count{{{labels},task="chat"}}',
        f'p2p_node:requests_total{{{labels},task="chat"}}',
        f"p2p_node:generation_tokens_total{{{labels}}}",
        'p2p_node:num_requests_running{backend="local"} 0.0',
        'p2p_node:num_requests_waiting{backend="local"}',
        "p2p_node:batch_forward_passes_total",
    ):
        assert name in text, name


def test_models_unload_and_load_and_lazy_reload(tiny_node: NodeProcess) -> None:
    def loaded() -> bool:
        models = httpx.get(tiny_node.url + "/v1/models", timeout=10).json()["data"]
        return next(m for m in models if m["id"] == TINY)["loaded"]

    response = httpx.post(tiny_node.url + "/models/unload", json={"model": TINY}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["backends"] == ["local"]
    assert loaded() is False
    assert_still_serving(tiny_node)  # loads again on demand
    assert loaded() is True
    httpx.post(tiny_node.url + "/models/unload", json={"model": TINY}, timeout=60)
    assert httpx.post(tiny_node.url + "/models/load", json={"model": TINY}, timeout=60).status_code == 200
    assert loaded() is True
    assert_error(httpx.post(tiny_node.url + "/models/load", json={"model": "nope"}, timeout=10), 404)
    assert_error(httpx.post(tiny_node.url + "/models/load", json={}, timeout=10), 400)


def test_overload_is_a_429_with_retry_after_and_the_node_recovers(tmp_path: Path) -> None:
    node = start_node(tmp_path, TINY_CONFIG + "\n[routing]\nmax_pending_requests = 2\n")
    try:

        def one(_: int) -> int:
            response = httpx.post(
                node.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200},
                timeout=60,
            )
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"]["type"] == "rate_limit_error"
            return response.status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(8)))
        assert statuses.count(429) >= 1
        assert statuses.count(200) >= 2
        with pytest.raises(openai.RateLimitError):
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                futures = [
                    pool.submit(
                        client(node).chat.completions.create,
                        model=TINY,
                        messages=[{"role": "user", "content": "hi"}],
                        max_tokens=200,
                    )
                    for _ in range(6)
                ]
                for future in futures:
                    future.result()
        assert_still_serving(node)
    finally:
        node.stop()


def test_streaming_error_after_start_arrives_as_an_error_event(tiny_node: NodeProcess) -> None:
    # Unloading the model while a stream runs cancels its generation: the client must be
    # told why, in the stream, instead of seeing it just end.
    with httpx.stream(
        "POST",
        tiny_node.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "stream": True},
        timeout=60,
    ) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: ")
        httpx.post(tiny_node.url + "/models/unload", json={"model": TINY}, timeout=60)
        rest = [line for line in lines if line]
    # 1500 tokens take seconds; the unload lands long before the answer could end.
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: ") :])["error"]
    assert error["code"] == "shutting_down"
    assert_still_serving(tiny_node)
