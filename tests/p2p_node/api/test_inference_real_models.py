"""The embedded default models, served by a real node process, used through the
official `openai` client and plain HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import NodeProcess

pytestmark = pytest.mark.slow

CHAT_MODEL = "SmolLM2-135M-Instruct"
EMBED_MODEL = "all-MiniLM-L6-v2"


def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


def test_default_chat_model_knows_the_capital_of_france(real_node: NodeProcess) -> None:
    answer = client(real_node).chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.prompt_tokens > 5
    assert 0 < answer.usage.completion_tokens <= 24


def test_chat_without_a_model_uses_the_endpoint_default(real_node: NodeProcess) -> None:
    response = httpx.post(
        real_node.url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 24,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == CHAT_MODEL
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_seed_model_name_reaches_the_default_chat_model(real_node: NodeProcess) -> None:
    answer = client(real_node).chat.completions.create(
        model="qwen-coder-1.5b", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert answer.model == CHAT_MODEL
    assert answer.choices[0].message.content


def test_streamed_chat_arrives_token_by_token_and_matches_the_plain_answer(real_node: NodeProcess) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    plain = client(real_node).chat.completions.create(
        model=CHAT_MODEL,
        messages=messages,
        temperature=0,
        max_tokens=20,  # type: ignore[arg-type]
    )
    stream = client(real_node).chat.completions.create(
        model=CHAT_MODEL,
        messages=messages,
        temperature=0,
        max_tokens=20,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) >= 5  # many small chunks, not one blob
    assert "".join(pieces) == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert usage is not None and plain.usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_raw_sse_stream_ends_with_done(real_node: NodeProcess) -> None:
    with httpx.stream(
        "POST",
        real_node.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True},
        timeout=120,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: ") :])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_completion_usage_counts_the_real_prompt_tokens(real_node: NodeProcess) -> None:
    from transformers import AutoTokenizer

    prompt = "The quick brown fox jumps over the lazy dog because"
    cache = Path("~/.cache/p2p-node/models/smollm2-135m-instruct-bf16").expanduser()
    expected_prompt_tokens = len(AutoTokenizer.from_pretrained(cache)(prompt, add_special_tokens=False)["input_ids"])
    answer = client(real_node).completions.create(model=CHAT_MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == expected_prompt_tokens
    assert answer.choices[0].text
    if answer.choices[0].finish_reason == "length":
        assert answer.usage.completion_tokens == 12


def test_streamed_completion(real_node: NodeProcess) -> None:
    stream = client(real_node).completions.create(
        model=CHAT_MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    texts = [choice.text for chunk in stream for choice in chunk.choices]
    assert len([t for t in texts if t]) >= 3


def test_stop_sequence_ends_the_answer_before_it(real_node: NodeProcess) -> None:
    answer = client(real_node).completions.create(
        model=CHAT_MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0, stop=["8"]
    )
    text = answer.choices[0].text
    assert "8" not in text
    assert answer.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(real_node: NodeProcess) -> None:
    def sample() -> str:
        answer = client(real_node).chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "Tell me a word."}],
            temperature=1.0,
            top_p=0.9,
            seed=1234,
            max_tokens=12,
        )
        return answer.choices[0].message.content or ""

    assert sample() == sample()


def test_embeddings_of_a_string_and_a_list(real_node: NodeProcess) -> None:
    api = client(real_node)
    single = api.embeddings.create(model=EMBED_MODEL, input="hello world")
    assert len(single.data) == 1 and len(single.data[0].embedding) == 384
    batch = api.embeddings.create(model=EMBED_MODEL, input=["a", "b", "c"], encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.usage.prompt_tokens == 9  # [CLS] x [SEP] for each one-token text
    # The client's default (base64) and float encodings carry the same vector.
    again = api.embeddings.create(model=EMBED_MODEL, input="hello world", encoding_format="float")
    assert cosine(single.data[0].embedding, again.data[0].embedding) == pytest.approx(1.0, abs=1e-6)


def test_related_sentences_embed_closer_than_unrelated_ones(real_node: NodeProcess) -> None:
    data = (
        client(real_node)
        .embeddings.create(
            model="bge-base-en",  # the seed's name reaches the embedded model
            input=["What is the capital of France?", "Paris is the capital of France.", "I like playing the guitar."],
        )
        .data
    )
    question, related, unrelated = (d.embedding for d in data)
    assert cosine(question, related) > 0.6
    assert cosine(question, related) > cosine(question, unrelated) + 0.4


def test_rerank_puts_the_relevant_document_first(real_node: NodeProcess) -> None:
    documents = [
        "The guitar has six strings.",
        "Paris is the capital and largest city of France.",
        "Bananas are rich in potassium.",
    ]
    response = httpx.post(
        real_node.url + "/v1/rerank",
        json={"query": "What is the capital of France?", "documents": documents, "top_n": 2},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    assert results[0]["index"] == 1
    assert results[0]["document"]["text"] == documents[1]
    assert results[0]["relevance_score"] > results[1]["relevance_score"]


def test_rerank_accepts_the_seed_model_name_and_document_objects(real_node: NodeProcess) -> None:
    response = httpx.post(
        real_node.url + "/v1/rerank",
        json={
            "model": "bge-reranker",
            "query": "fruit",
            "documents": [{"text": "a red car"}, {"text": "apples and pears"}],
            "return_documents": False,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [1, 0]
    assert "document" not in results[0]


def test_models_list_shows_the_defaults_and_their_aliases(real_node: NodeProcess) -> None:
    models = {m.id: m for m in client(real_node).models.list()}
    assert {CHAT_MODEL, EMBED_MODEL, "bge-base-en", "qwen-coder-1.5b"} <= set(models)
    assert models[CHAT_MODEL].model_extra["loaded"] is True  # type: ignore[index]


def test_concurrent_requests_share_forward_passes(real_node: NodeProcess) -> None:
    def one(i: int) -> str:
        answer = client(real_node).chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=16,
        )
        return answer.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert all(answers)
    metrics = httpx.get(real_node.url + "/metrics", timeout=10).text
    match = re.search(r'p2p_node:batch_size_max\{backend="local",model="SmolLM2-135M-Instruct"\} (\S+)', metrics)
    assert match and float(match.group(1)) >= 2, metrics


def test_client_disconnecting_mid_stream_frees_its_slot(real_node: NodeProcess) -> None:
    def engine() -> dict[str, int]:
        status = httpx.get(real_node.url + "/status", timeout=10).json()
        local = next(b for b in status["manager"]["backends"] if b["id"] == "local")
        return {"in_flight": local["metrics"]["in_flight"], **local["details"]["loaded_models"][CHAT_MODEL]["engine"]}

    before = engine()["tokens_generated"]
    with httpx.stream(
        "POST",
        real_node.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400, "stream": True},
        timeout=120,
    ) as response:
        received = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                received += 1
            if received >= 3:
                break
    deadline = time.monotonic() + 15
    while True:
        state = engine()
        if state["in_flight"] == 0 and state["active"] == 0:
            break
        assert time.monotonic() < deadline, f"slot still held: {state}"
        time.sleep(0.1)
    assert state["tokens_generated"] - before < 300  # generation stopped well before max_tokens
