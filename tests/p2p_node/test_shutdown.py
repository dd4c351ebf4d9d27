"""SIGTERM / SIGINT: stop taking requests, let in-flight streams finish within the grace
period, tell the clients of those that don't, exit 0."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_CONFIG, NodeProcess, start_node

# The tiny model makes a few hundred tokens a second here: 600 take a couple of seconds,
# 2000 (close to its context window) far longer than a 1 s grace period.
LONG_ANSWER = 600
LONGER_THAN_GRACE = 2000


def tiny_node_with_grace(tmp_path: Path, grace_s: float) -> NodeProcess:
    return start_node(tmp_path, TINY_CONFIG + f"\n[server]\nshutdown_grace_s = {grace_s}\n")


def stream_lines(node: NodeProcess, max_tokens: int) -> Iterator[str]:
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        yield from (line for line in response.iter_lines() if line)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_stream_lets_the_stream_finish_and_exits_zero(tmp_path: Path, sig: signal.Signals) -> None:
    node = tiny_node_with_grace(tmp_path, grace_s=60)
    lines = stream_lines(node, LONG_ANSWER)
    assert next(lines).startswith("data: ")
    node.process.send_signal(sig)

    # While draining, the node still answers, but refuses new work in the OpenAI shape.
    ready = httpx.get(node.url + "/ready", timeout=10)
    assert ready.status_code == 503
    refused = httpx.post(node.url + "/v1/embeddings", json={"input": "hi"}, timeout=10)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"

    rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: ") :]) for line in rest[:-1]]
    assert not any("error" in event for event in events)
    usage = events[-1]["usage"]
    finish = next(e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"])
    assert finish in {"length", "stop"}
    if finish == "length":
        assert usage["completion_tokens"] == LONG_ANSWER
    assert node.process.wait(60) == 0
    assert "stopped" in node.log()


def test_stream_outliving_the_grace_period_ends_with_a_shutting_down_error(tmp_path: Path) -> None:
    node = tiny_node_with_grace(tmp_path, grace_s=1)
    lines = stream_lines(node, LONGER_THAN_GRACE)
    assert next(lines).startswith("data: ")
    node.process.send_signal(signal.SIGTERM)
    rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: ") :])["error"]
    assert error["code"] == "shutting_down"
    assert "shut down" in error["message"]
    assert node.process.wait(60) == 0


def test_idle_node_stops_promptly_on_sigterm(tmp_path: Path) -> None:
    node = tiny_node_with_grace(tmp_path, grace_s=60)
    node.process.send_signal(signal.SIGTERM)
    # Nothing in flight: the grace period must not be waited out.
    assert node.process.wait(20) == 0
