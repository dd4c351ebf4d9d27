"""Seed 004's API on a real node: `/infer`, `/infer/batch`, `GET /models` and the registry.

Plumbing runs on the tiny random model (its words are noise, its token counts are not);
what the answers say is checked on the real default models, in the slow tests.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2p_node.config import ConfigError, load_config
from tests.conftest import NodeProcess

TINY = "tiny-random-llama"
ENVELOPE_KEYS = {"success", "result", "model_used", "latency_ms", "request_id", "timestamp", "metadata"}


def infer(node: NodeProcess, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(node.url + "/infer", json=body, headers=headers, timeout=120)


def batch(node: NodeProcess, requests: Any) -> httpx.Response:
    return httpx.post(node.url + "/infer/batch", json={"requests": requests}, timeout=120)


def assert_failed(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= ENVELOPE_KEYS | {"error"}
    assert body["success"] is False and body["result"] is None
    assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body


def test_infer_answers_in_seed_004s_envelope(tiny_node: NodeProcess) -> None:
    response = infer(
        tiny_node,
        {"text": "The future of AI is", "model": "generator", "version": "v1", "parameters": {"max_length": 6}},
        **{"X-Request-Id": "seed004-envelope-1"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == ENVELOPE_KEYS
    assert body["success"] is True
    assert body["model_used"] == "generator:v1"
    assert body["request_id"] == "seed004-envelope-1" == response.headers["x-request-id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["timestamp"])
    assert abs(datetime.fromisoformat(body["timestamp"]).timestamp() - datetime.now().timestamp()) < 60
    assert isinstance(body["latency_ms"], float) and body["latency_ms"] > 0
    meta = body["metadata"]
    assert meta["model_type"] == "generator" and meta["version"] == "v1" and meta["model_id"] == TINY
    assert 1 <= meta["usage"]["completion_tokens"] <= 6
    # As the Hugging Face pipeline the seed used: the prompt, then its continuation.
    assert isinstance(body["result"], str) and body["result"].startswith("The future of AI is")


def test_return_full_text_false_gives_only_the_continuation(tiny_node: NodeProcess) -> None:
    params = {"max_length": 5, "temperature": 0.0}
    full = infer(tiny_node, {"text": "Once upon a time", "model": "generator", "parameters": params}).json()
    part = infer(
        tiny_node,
        {"text": "Once upon a time", "model": "generator", "parameters": {**params, "return_full_text": False}},
    ).json()
    assert part["result"] and full["result"] == "Once upon a time" + part["result"]


def test_several_return_sequences_come_back_as_a_list(tiny_node: NodeProcess) -> None:
    params = {"max_length": 4, "num_return_sequences": 3, "temperature": 1.0, "seed": 7}
    body = infer(tiny_node, {"text": "Hello", "model": "generator", "parameters": params}).json()
    assert body["success"] is True
    assert isinstance(body["result"], list) and len(body["result"]) == 3
    assert all(text.startswith("Hello") for text in body["result"])
    assert body["metadata"]["usage"]["completion_tokens"] <= 12
    greedy = infer(tiny_node, {"text": "Hi", "model": "generator", "parameters": {**params, "temperature": 0.0}})
    assert_failed(greedy, 400, "invalid_request", "parameters.num_return_sequences")


def test_a_request_without_a_model_gets_the_default_model(tiny_node: NodeProcess) -> None:
    body = infer(tiny_node, {"text": "Summarize me.", "parameters": {"max_length": 3}}).json()
    assert body["success"] is True, body
    assert body["model_used"] == "summarizer:v1"
    assert body["metadata"]["kind"] == "summarize" and body["metadata"]["usage"]["completion_tokens"] <= 3


def test_model_may_carry_its_version_and_an_unknown_version_is_a_404_listing_the_versions(
    tiny_node: NodeProcess,
) -> None:
    body = infer(tiny_node, {"text": "x", "model": "generator:v1", "parameters": {"max_length": 2}}).json()
    assert body["model_used"] == "generator:v1"
    failed = assert_failed(
        infer(tiny_node, {"text": "x", "model": "generator", "version": "v9"}), 404, "model_not_found"
    )
    assert failed["error"]["param"] == "version"
    assert "v9" in failed["error"]["message"] and "v1" in failed["error"]["message"]
    assert failed["model_used"] is None


def test_an_unknown_model_is_a_404_naming_the_registered_ones(tiny_node: NodeProcess) -> None:
    failed = assert_failed(infer(tiny_node, {"text": "x", "model": "translator"}), 404, "model_not_found", "model")
    message = failed["error"]["message"]
    assert "translator" in message and all(name in message for name in ("generator", "summarizer", "sentiment"))


def test_parameters_a_model_cannot_honour_are_refused_by_name(tiny_node: NodeProcess) -> None:
    unknown = infer(tiny_node, {"text": "x", "model": "summarizer", "parameters": {"num_beams": 4}})
    body = assert_failed(unknown, 400, "invalid_request", "parameters.num_beams")
    assert "num_beams" in body["error"]["message"] and "max_length" in body["error"]["message"]
    assert body["model_used"] == "summarizer:v1"
    wrong_type = infer(tiny_node, {"text": "x", "model": "generator", "parameters": {"max_length": "ten"}})
    assert_failed(wrong_type, 400, "invalid_request", "parameters.max_length")
    out_of_range = infer(tiny_node, {"text": "x", "model": "generator", "parameters": {"temperature": 9}})
    assert_failed(out_of_range, 400, "invalid_request", "parameters.temperature")


def test_malformed_requests_are_400_envelopes(tiny_node: NodeProcess) -> None:
    not_json = httpx.post(
        tiny_node.url + "/infer", content=b"{not json", headers={"content-type": "application/json"}, timeout=30
    )
    assert_failed(not_json, 400, "invalid_request")
    assert_failed(infer(tiny_node, {"model": "generator"}), 400, "invalid_request", "text")
    assert_failed(infer(tiny_node, {"text": "   "}), 400, "invalid_request", "text")
    assert_failed(infer(tiny_node, ["text"]), 400, "invalid_request")
    assert_failed(infer(tiny_node, {"text": "x", "parameters": [1]}), 400, "invalid_request", "parameters")


def test_sentiment_from_a_model_that_cannot_label_is_a_502_saying_what_it_wrote(tiny_node: NodeProcess) -> None:
    failed = assert_failed(infer(tiny_node, {"text": "I love it", "model": "sentiment"}), 502, "backend_failed")
    assert "sentiment label" in failed["error"]["message"] and TINY in failed["error"]["message"]
    assert failed["model_used"] == "sentiment:v1"


def test_a_batch_answers_the_good_requests_and_reports_the_bad_one(tiny_node: NodeProcess) -> None:
    response = batch(
        tiny_node,
        [
            {"text": "First text to process", "model": "generator", "parameters": {"max_length": 3}},
            {"text": "Second text to process", "model": "no-such-model"},
            {"text": "Third text", "model": "summarizer", "parameters": {"max_length": 2}},
            {"model": "generator"},
            "not an object",
        ],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == 5 and body["succeeded"] == 2 and body["failed"] == 3 and body["success"] is False
    first, second, third, fourth, fifth = body["results"]
    assert first["success"] and first["model_used"] == "generator:v1" and first["result"].startswith("First")
    assert third["success"] and third["model_used"] == "summarizer:v1"
    assert not second["success"] and second["error"]["code"] == "model_not_found"
    assert second["error"]["param"] == "requests[1].model" and "no-such-model" in second["error"]["message"]
    assert not fourth["success"] and fourth["error"]["param"] == "requests[3].text"
    assert not fifth["success"] and fifth["error"]["param"] == "requests[4]"
    ids = [item["request_id"] for item in body["results"]]
    assert len(set(ids)) == 5 and all(i.startswith(body["request_id"]) for i in ids)


def test_batch_items_run_concurrently(tiny_node: NodeProcess) -> None:
    items = [{"text": f"Item {i}", "model": "generator", "parameters": {"max_length": 12}} for i in range(4)]
    body = batch(tiny_node, items).json()
    assert body["succeeded"] == 4
    # One after the other, the batch would take the sum of its items' latencies.
    assert body["latency_ms"] < 0.8 * sum(item["latency_ms"] for item in body["results"])


def test_a_batch_that_is_not_a_list_or_is_too_long_is_refused_whole(tiny_node: NodeProcess) -> None:
    assert_failed(batch(tiny_node, []), 400, "invalid_request", "requests")
    assert_failed(batch(tiny_node, {"text": "x"}), 400, "invalid_request", "requests")
    too_many = batch(tiny_node, [{"text": "x", "model": "nope"}] * 65)
    assert "at most 64" in assert_failed(too_many, 400, "invalid_request", "requests")["error"]["message"]


def test_models_lists_the_registry_with_the_concrete_models_behind_it(tiny_node: NodeProcess) -> None:
    body = httpx.get(tiny_node.url + "/models", timeout=30).json()
    assert body["default_model"] == "summarizer"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"generator", "summarizer", "sentiment"} and body["count"] == 3
    for name, task in (("generator", "completion"), ("summarizer", "chat"), ("sentiment", "completion")):
        entry = by_name[name]
        assert entry["default_version"] == "v1"
        (version,) = entry["versions"]
        assert version["model_used"] == f"{name}:v1" and version["default"] is True
        assert version["model_id"] == TINY and version["task"] == task
        assert version["available"] is True and version["loaded"] is True


def test_a_default_version_that_does_not_exist_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[registry.models.summarizer]\ndefault_version = "v7"\n')
    with pytest.raises(ConfigError, match="summarizer has no version 'v7'"):
        load_config(config, env={})
    config.write_text(
        '[registry.models.summarizer]\nversions.v2 = { kind = "summarize", parameters = { beams = 2 } }\n'
    )
    with pytest.raises(ConfigError, match="beams"):
        load_config(config, env={})
    with pytest.raises(ConfigError, match="'translate' is not a registered model"):
        load_config(None, env={"DEFAULT_MODEL": "translate"})


# ---- what the answers say, on the real default models --------------------------------------


@pytest.mark.slow
def test_sentiment_labels_obvious_sentences_with_a_confidence_score(real_node: NodeProcess) -> None:
    happy = infer(real_node, {"text": "I love this AI inference backend! It works perfectly.", "model": "sentiment"})
    body = happy.json()
    assert body["success"] is True, body
    assert body["result"]["label"] == "positive" and 0.5 < body["result"]["score"] <= 1.0
    votes = body["metadata"]["votes"]
    assert sum(votes.values()) == 3 and votes["positive"] == round(body["result"]["score"] * 3)
    angry = infer(
        real_node, {"text": "This is the worst product I have ever used. Total garbage.", "model": "sentiment"}
    ).json()
    assert angry["result"]["label"] == "negative", angry


@pytest.mark.slow
def test_summarizer_returns_a_shorter_text_about_the_same_thing(real_node: NodeProcess) -> None:
    text = (
        "The city council voted on Tuesday to build a new public library downtown. The library will cost "
        "12 million dollars and open in 2027. Council members said it will include a children's wing and a "
        "free computer lab."
    )
    body = infer(real_node, {"text": text, "model": "summarizer", "parameters": {"max_length": 40}}).json()
    assert body["success"] is True, body
    summary = body["result"]
    assert 0 < len(summary) < len(text) and "library" in summary.lower()


@pytest.mark.slow
def test_generator_continues_the_text(real_node: NodeProcess) -> None:
    body = infer(
        real_node,
        {"text": "The capital of France is", "model": "generator", "parameters": {"max_length": 4, "do_sample": False}},
    ).json()
    assert body["success"] is True, body
    assert body["result"].startswith("The capital of France is") and "Paris" in body["result"]
