"""The WebSocket API with real clients over real sockets.

Answers are checked against the HTTP API of the same node process (the tiny random Llama,
greedy: gibberish, but deterministic). What a node process can't be made to do on cue —
a client that stops reading, a backend turning unhealthy, peers arriving — runs against
the same router served in-process by hypercorn on a loopback port, around a backend with
a deterministic script. The Python client library (`p2p_node.ws_client`, asyncio and
`websockets`) runs in a worker thread, as an asyncio application would use it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url
from websockets.exceptions import InvalidStatus

from backends.types import BackendStatus
from p2p_node.api.websocket import WebSocketSettings
from p2p_node.ws_client import NodeClient, NodeError, RequestCancelled
from tests.conftest import NodeProcess, wait_until
from tests.p2p_node.api.ws_helpers import ScriptBackend, collect, collect_all, serve_in_process, ws_session

TINY = "tiny-random-llama"
FAST_EVENTS = WebSocketSettings(event_interval_s=0.05, metrics_interval_s=0.2)

T = TypeVar("T")


async def in_asyncio_thread(main: Callable[[], Awaitable[T]]) -> T:
    """Run an asyncio program (the client library) in a worker thread, as its users would."""
    # A thread can't be cancelled from trio: the asyncio side bounds itself.
    return await trio.to_thread.run_sync(lambda: asyncio.run(asyncio.wait_for(main(), 60)))


def inference(
    request_id: str, inputs: Any, task: str = "chat", stream: bool = True, **parameters: Any
) -> dict[str, Any]:
    return {
        "type": "inference",
        "request_id": request_id,
        "task": task,
        "inputs": inputs,
        "parameters": parameters,
        "stream": stream,
    }


async def http_post(node: NodeProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(node.url + path, json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


# ---- against a node process ----------------------------------------------------------


async def test_a_streamed_chat_arrives_in_chunks_that_join_to_the_http_answer(tiny_node: NodeProcess) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about trio"}]
    expected = await http_post(
        tiny_node, "/v1/chat/completions", {"model": TINY, "messages": messages, "max_tokens": 12, "temperature": 0}
    )
    async with ws_session(tiny_node.url, "/ws/streamer") as ws:
        await ws.send({**inference("r1", messages, max_tokens=12, temperature=0), "model": TINY})
        started = await ws.recv()
        chunks, done = await collect(ws, "r1")
    assert started["type"] == "inference_started"
    assert (started["request_id"], started["model"], started["task"]) == ("r1", TINY, "chat")
    assert done["type"] == "inference_complete", done
    assert len(chunks) > 1
    assert "".join(chunks) == expected["choices"][0]["message"]["content"]
    assert done["chunks"] == len(chunks)
    assert done["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert done["usage"] == expected["usage"]
    assert done["backend"] == "local"


async def test_a_seed_style_text_generation_request_gets_the_completion_answer(tiny_node: NodeProcess) -> None:
    expected = await http_post(
        tiny_node, "/v1/completions", {"model": TINY, "prompt": "Hello, world!", "max_tokens": 8, "temperature": 0}
    )
    async with ws_session(tiny_node.url, "/ws/seed-client") as ws:
        # The message seed 001 documents, with its Hugging Face parameter names.
        await ws.send(
            {
                "type": "inference",
                "request_id": "req_123",
                "model": "qwen-coder-1.5b",  # an alias of the tiny model in TINY_CONFIG
                "task": "text-generation",
                "inputs": "Hello, world!",
                "parameters": {"max_length": 8, "do_sample": False},
                "stream": False,
            }
        )
        chunks, done = await collect(ws, "req_123")
    assert chunks == []
    assert done["type"] == "inference_complete", done
    assert done["task"] == "completion" and done["model"] == TINY
    assert done["result"] == expected["choices"][0]["text"]
    assert done["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]


async def test_embeddings_and_rerank_answer_as_over_http(tiny_node: NodeProcess) -> None:
    texts = ["a cat sat on the mat", "stock markets fell"]
    documents = ["dogs bark", "a cat on a mat", "interest rates"]
    vectors = await http_post(tiny_node, "/v1/embeddings", {"input": texts})
    ranked = await http_post(tiny_node, "/v1/rerank", {"query": "cat on mat", "documents": documents, "top_n": 2})
    async with ws_session(tiny_node.url, "/ws/encoder") as ws:
        await ws.send(inference("e", texts, task="embedding"))
        await ws.send(inference("r", {"query": "cat on mat", "documents": documents}, task="rerank", top_n=2))
        answers = await collect_all(ws, ["e", "r"])
    embedded, reranked = answers["e"][1], answers["r"][1]
    assert embedded["type"] == "inference_complete", embedded
    assert len(embedded["result"]) == 2
    for got, want in zip(embedded["result"], vectors["data"], strict=True):
        assert got == pytest.approx(want["embedding"], abs=1e-6)
    assert reranked["type"] == "inference_complete", reranked
    assert [h["index"] for h in reranked["result"]] == [h["index"] for h in ranked["results"]]
    assert reranked["result"][0]["document"] == {"text": "a cat on a mat"}


async def test_cancel_stops_one_stream_frees_its_slot_and_leaves_the_other_running(tiny_node: NodeProcess) -> None:
    async with ws_session(tiny_node.url, "/ws/canceller") as ws:
        await ws.send(inference("long", "write a very long story", max_tokens=400, temperature=0))
        await ws.send(inference("short", "hi", max_tokens=6, temperature=0))
        await ws.recv_until(lambda m: m["type"] == "inference_chunk" and m["request_id"] == "long")
        await ws.send({"type": "cancel", "request_id": "long"})
        seen: list[dict[str, Any]] = []
        with trio.fail_after(60):
            while not {"long", "short"} <= {
                m["request_id"] for m in seen if m["type"] in ("inference_cancelled", "inference_complete")
            }:
                seen.append(await ws.recv())
        long_end = next(m for m in seen if m["request_id"] == "long" and m["type"] != "inference_chunk")
        short_end = next(m for m in seen if m["request_id"] == "short" and m["type"] == "inference_complete")
        assert long_end["type"] == "inference_cancelled"
        assert short_end["usage"]["completion_tokens"] == 6
        long_chunks = sum(1 for m in seen if m["request_id"] == "long" and m["type"] == "inference_chunk")
        assert long_chunks < 100  # stopped long before its 400 tokens
        await ws.send({"type": "status", "request_id": "after"})
        _, status = await ws.recv_until(lambda m: m["type"] == "status")
    manager = status["backend_status"]
    assert manager["pending_requests"] == 0
    assert next(b for b in manager["backends"] if b["id"] == "local")["metrics"]["in_flight"] == 0


async def test_ping_and_status_answer_with_the_request_id(tiny_node: NodeProcess) -> None:
    async with ws_session(tiny_node.url, "/ws/pinger") as ws:
        assert ws.hello["client_id"] == "pinger"
        assert set(ws.hello["topics"]) == {"inference", "status", "backend", "peers", "metrics"}
        pong = await ws.ping("p-1")
        await ws.send({"type": "status", "request_id": "s-1"})
        status = await ws.recv()
    assert pong["type"] == "pong" and isinstance(pong["timestamp"], float)
    assert status["type"] == "status" and status["request_id"] == "s-1"
    assert status["node"]["id"]
    assert [b["id"] for b in status["backend_status"]["backends"]] == ["local"]
    assert status["backend_status"]["default_models"]["chat"] == TINY


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2, 3]", "invalid_message", None),
        ({"request_id": "x"}, "invalid_message", "type"),
        ({"type": "launch_missiles", "request_id": "x"}, "unknown_type", "type"),
        ({"type": "inference", "request_id": "x", "task": "chat"}, "invalid_request", "inputs"),
        ({"type": "inference", "request_id": "x", "inputs": "hi"}, "invalid_request", "task"),
        (inference("x", "hi", task="painting"), "invalid_request", "task"),
        (inference("x", "hi", temperature=5), "invalid_request", "parameters.temperature"),
        (inference("x", "hi", beam_width=4), "invalid_request", "parameters.beam_width"),
        (inference("x", "hi", task="embedding", temperature=0), "invalid_request", "parameters.temperature"),
        (inference("x", [{"role": "wizard", "content": "hi"}]), "invalid_request", "inputs.0.role"),
        (inference("x", {"query": "q"}, task="rerank"), "invalid_request", "inputs.documents"),
        ({**inference("x", "hi"), "model": "gpt-9"}, "model_not_found", "model"),
        ({"type": "subscribe", "request_id": "x", "topics": ["weather"]}, "unknown_topic", "topics"),
        ({"type": "subscribe", "request_id": "x"}, "invalid_request", "topics"),
        ({"type": "cancel", "request_id": "x"}, "unknown_request", None),
        ({"type": "cancel"}, "invalid_request", "request_id"),
    ],
)
async def test_a_bad_message_gets_an_error_with_a_code_and_the_connection_stays_up(
    tiny_node: NodeProcess, message: dict[str, Any] | str, code: str, param: str | None
) -> None:
    async with ws_session(tiny_node.url, "/ws/careless") as ws:
        await ws.send(message)
        error = await ws.recv()
        assert error["type"] == "error", error
        assert error["code"] == code, error
        assert error.get("param") == param, error
        assert error["message"]
        if isinstance(message, dict) and "request_id" in message:
            assert error["request_id"] == message["request_id"]
        assert (await ws.ping())["type"] == "pong"


async def test_the_backend_topic_reports_a_model_unloaded_and_loaded_again(tiny_node: NodeProcess) -> None:
    async with ws_session(tiny_node.url, "/ws/watcher") as ws:
        await ws.send({"type": "subscribe", "topics": ["backend"]})
        snapshot = await ws.event("backend", "snapshot")
        local = next(b for b in snapshot["data"]["backends"] if b["id"] == "local")
        assert {"model": TINY, "task": "chat", "loaded": True} in local["models"]
        try:
            await http_post(tiny_node, "/models/unload", {"model": TINY})
            unloaded = await ws.event("backend", "model_unloaded")
        finally:
            await http_post(tiny_node, "/models/load", {"model": TINY})
        loaded = await ws.event("backend", "model_loaded")
    assert unloaded["data"]["backend_id"] == "local" and unloaded["data"]["model"] == TINY
    assert loaded["data"]["backend_id"] == "local" and loaded["data"]["model"] == TINY


async def test_the_python_client_streams_the_http_answer_and_raises_node_errors(tiny_node: NodeProcess) -> None:
    expected = await http_post(
        tiny_node,
        "/v1/chat/completions",
        {"model": TINY, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10, "temperature": 0},
    )

    async def main() -> tuple[list[str], dict[str, Any], str, NodeError]:
        async with NodeClient(tiny_node.url) as node:
            async with node.stream("chat", "hello there", max_tokens=10, temperature=0) as answer:
                chunks = [chunk async for chunk in answer]
            assert answer.complete is not None
            whole = await node.chat("hello there", max_tokens=10, temperature=0)
            try:
                await node.infer("chat", "hi", model="gpt-9")
            except NodeError as exc:
                error = exc
            return chunks, answer.complete, whole, error

    chunks, complete, whole, error = await in_asyncio_thread(main)
    content = expected["choices"][0]["message"]["content"]
    assert "".join(chunks) == content
    assert whole == content
    assert complete["usage"] == expected["usage"]
    assert error.code == "model_not_found" and "tiny-random-llama" in error.message


# ---- against the router served in-process ----------------------------------------------


async def test_concurrent_requests_on_one_connection_interleave_and_stay_apart() -> None:
    async with serve_in_process(WebSocketSettings(), backend=ScriptBackend(delay=0.01)) as node:
        async with ws_session(node.url) as ws:
            await ws.send(inference("a", "say alpha", max_tokens=5))
            await ws.send(inference("b", "say beta", max_tokens=5))
            messages: list[dict[str, Any]] = []
            done: set[str] = set()
            while done != {"a", "b"}:
                message = await ws.recv()
                messages.append(message)
                if message["type"] == "inference_complete":
                    done.add(message["request_id"])
    chunks = [m for m in messages if m["type"] == "inference_chunk"]
    assert [m["chunk"] for m in chunks if m["request_id"] == "a"] == [f"alpha-{i} " for i in range(5)]
    assert [m["chunk"] for m in chunks if m["request_id"] == "b"] == [f"beta-{i} " for i in range(5)]
    assert [m["index"] for m in chunks if m["request_id"] == "a"] == list(range(5))
    order = [m["request_id"] for m in chunks]
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")  # b started before a finished


async def test_a_cancelled_stream_is_closed_at_the_backend_before_the_client_hears_so() -> None:
    backend = ScriptBackend(delay=0.02)
    async with serve_in_process(WebSocketSettings(), backend=backend) as node, ws_session(node.url) as ws:
        await ws.send(inference("c", "go", max_tokens=10_000))
        await ws.recv_until(lambda m: m["type"] == "inference_chunk")
        assert backend.open_streams == 1
        await ws.send({"type": "cancel", "request_id": "c"})
        _, cancelled = await ws.recv_until(lambda m: m["type"] != "inference_chunk")
        assert cancelled == {"type": "inference_cancelled", "request_id": "c", "timestamp": cancelled["timestamp"]}
        assert backend.open_streams == 0 and node.manager.pending == 0
        # The id is free again once its last message has arrived.
        await ws.send(inference("c", "again", max_tokens=2))
        chunks, done = await collect(ws, "c")
    assert chunks == ["again-0 ", "again-1 "] and done["type"] == "inference_complete"


async def test_a_client_leaving_mid_stream_closes_the_backend_stream() -> None:
    backend = ScriptBackend(delay=0.02)
    async with serve_in_process(WebSocketSettings(), backend=backend) as node:
        async with ws_session(node.url) as ws:
            await ws.send(inference("x", "go", max_tokens=10_000))
            await ws.send(inference("y", "go", max_tokens=10_000))
            await ws.recv_until(lambda m: m["type"] == "inference_chunk" and m["request_id"] == "y")
            assert backend.open_streams == 2
        await wait_until(lambda: not backend.open_streams and not node.manager.pending)
    assert backend.closed_streams == 2


async def test_a_failure_mid_stream_ends_that_request_with_an_error_and_the_connection_stays_up() -> None:
    async with serve_in_process(WebSocketSettings()) as node, ws_session(node.url) as ws:
        await ws.send(inference("f", "please fail-after-2", max_tokens=5))
        chunks, error = await collect(ws, "f")
        assert chunks == ["fail-after-2-0 ", "fail-after-2-1 "]
        assert error["type"] == "error" and error["code"] == "backend_failed" and error["request_id"] == "f"
        assert error["retryable"] is True
        await ws.send(inference("g", "fine now", max_tokens=1))
        assert (await collect(ws, "g"))[1]["type"] == "inference_complete"


async def test_a_request_past_its_timeout_is_a_deadline_exceeded_error() -> None:
    async with serve_in_process(WebSocketSettings(), backend=ScriptBackend(delay=0.1)) as node:
        async with ws_session(node.url) as ws:
            await ws.send(inference("slow", "go", max_tokens=100, timeout=0.35))
            chunks, error = await collect(ws, "slow")
    assert 1 <= len(chunks) <= 5
    assert error["code"] == "deadline_exceeded"


async def test_requests_beyond_the_per_connection_limit_are_refused_and_duplicates_too() -> None:
    settings = WebSocketSettings(max_requests=2)
    async with serve_in_process(settings, backend=ScriptBackend(delay=0.05)) as node, ws_session(node.url) as ws:
        await ws.send(inference("one", "go", max_tokens=4))
        await ws.send(inference("one", "go", max_tokens=4))
        await ws.send(inference("two", "go", max_tokens=4))
        await ws.send(inference("three", "go", max_tokens=4))
        errors: list[dict[str, Any]] = []
        completed: set[str] = set()
        with trio.fail_after(10):
            while completed != {"one", "two"}:
                message = await ws.recv()
                if message["type"] == "error":
                    errors.append(message)
                elif message["type"] == "inference_complete":
                    completed.add(message["request_id"])
    assert [(e["request_id"], e["code"]) for e in errors] == [
        ("one", "duplicate_request_id"),
        ("three", "too_many_requests"),
    ]


async def test_an_oversized_message_is_refused_and_the_connection_stays_up() -> None:
    async with serve_in_process(WebSocketSettings(max_message_bytes=1000)) as node, ws_session(node.url) as ws:
        await ws.send(inference("big", "x " * 1000))
        error = await ws.recv()
        assert error["code"] == "message_too_large"
        assert (await ws.ping())["type"] == "pong"


async def test_a_client_that_stops_reading_is_told_and_dropped_without_holding_the_backend_or_others() -> None:
    settings = WebSocketSettings(queue_size=8, send_timeout_s=0.5)
    backend = ScriptBackend(pad=64 * 1024)  # 64 KiB chunks fill the socket buffers fast
    async with serve_in_process(settings, backend=backend) as node:
        async with ws_session(node.url, "/ws/stalled") as stalled, ws_session(node.url, "/ws/other") as other:
            await stalled.send(inference("flood", "flood", max_tokens=1_000_000))
            # `stalled` reads nothing now. The node must give up on it on its own, and keep
            # serving everyone else meanwhile.
            slowest_pong = 0.0
            with trio.fail_after(30):
                while backend.closed_streams == 0:
                    started = time.perf_counter()
                    await other.ping()
                    slowest_pong = max(slowest_pong, time.perf_counter() - started)
                    await trio.sleep(0.05)
            assert backend.open_streams == 0 and node.manager.pending == 0
            produced = backend.chunks_yielded
            # Now read what reached `stalled`: what the socket held, then the notice, then the close.
            received = 0
            notice: dict[str, Any] | None = None
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    message = await stalled.recv()
                    if message["type"] == "inference_chunk":
                        received += 1
                    elif message["type"] == "error":
                        notice = message
        assert slowest_pong < 2.0
    assert notice is not None and notice["code"] == "slow_consumer"
    assert closed.value.reason is not None and closed.value.reason.code == 1008
    assert received >= 1
    # What the node dropped is bounded by its queue: memory did not grow with the backlog.
    assert produced - received <= settings.queue_size + 1, (produced, received)


async def test_a_client_that_reads_slowly_but_keeps_up_gets_everything() -> None:
    settings = WebSocketSettings(queue_size=4, send_timeout_s=0.5)
    backend = ScriptBackend(pad=64 * 1024)
    async with serve_in_process(settings, backend=backend) as node, ws_session(node.url) as ws:
        await ws.send(inference("steady", "steady", max_tokens=150))
        chunks: list[str] = []
        while True:
            message = await ws.recv()
            if message["type"] == "inference_chunk":
                chunks.append(message["chunk"])
                await trio.sleep(0.005)
            elif message["type"] != "inference_started":
                break
    assert message["type"] == "inference_complete", message
    assert len(chunks) == 150 and chunks[149].startswith("steady-149 ")


async def test_the_backend_topic_reports_health_changes_and_backends_coming_and_going() -> None:
    async with serve_in_process(FAST_EVENTS) as node, ws_session(node.url) as ws:
        await ws.send({"type": "subscribe", "topics": ["backend"], "request_id": "sub"})
        subscribed = await ws.recv()
        assert subscribed["type"] == "subscribed" and subscribed["subscriptions"] == ["backend"]
        assert subscribed["request_id"] == "sub"
        snapshot = await ws.event("backend", "snapshot")
        assert [(b["id"], b["status"]) for b in snapshot["data"]["backends"]] == [("script", "healthy")]

        node.backend.health = BackendStatus.UNHEALTHY
        await node.manager.check_all()
        changed = await ws.event("backend", "backend_status")
        assert changed["data"] == {"backend_id": "script", "status": "unhealthy", "previous": "healthy", "detail": ""}

        await node.manager.add(ScriptBackend("second"))
        added = await ws.event("backend", "backend_added")
        assert added["data"]["backend"]["id"] == "second"
        await node.manager.remove("second")
        removed = await ws.event("backend", "backend_removed")
        assert removed["data"] == {"backend_id": "second"}


async def test_the_peers_and_status_topics_report_peers_and_the_node_refusing_work() -> None:
    async with serve_in_process(FAST_EVENTS) as node, ws_session(node.url) as ws:
        await ws.send({"type": "subscribe", "topics": ["peers", "status"]})
        assert (await ws.event("peers", "snapshot"))["data"] == {"peers": []}
        assert (await ws.event("status", "snapshot"))["data"]["accepting"] is True
        peer = {"peer_id": "12D3KooWPeer", "addrs": ["/ip4/10.0.0.2/tcp/4001"]}
        node.peers.append(peer)
        assert (await ws.event("peers", "peer_joined"))["data"] == {"peer": peer}
        node.peers.clear()
        assert (await ws.event("peers", "peer_left"))["data"] == {"peer_id": "12D3KooWPeer"}
        node.manager.stop_accepting()
        _, status = await ws.recv_until(lambda m: m.get("event") == "status_changed" and not m["data"]["accepting"])
    assert status["data"]["accepting"] is False and status["data"]["changed"] == ["accepting"]


async def test_the_inference_and_metrics_topics_follow_requests_from_other_clients() -> None:
    async with serve_in_process(FAST_EVENTS) as node:
        async with ws_session(node.url, "/ws/dashboard") as dashboard, ws_session(node.url, "/ws/user") as user:
            await dashboard.send({"type": "subscribe", "topics": ["inference", "metrics"]})
            assert (await dashboard.event("inference", "snapshot"))["data"]["pending_requests"] == 0
            await user.send(inference("u", "hello", max_tokens=3))
            assert (await collect(user, "u"))[1]["type"] == "inference_complete"
            _, activity = await dashboard.recv_until(
                lambda m: m.get("event") == "activity" and m["data"]["backends"]["script"]["requests_ok"] == 1
            )
            _, metrics = await dashboard.recv_until(
                lambda m: m.get("event") == "metrics" and m["data"]["backends"][0]["requests_ok"] == 1
            )
    assert activity["data"]["pending_requests"] == 0
    assert metrics["data"]["backends"][0]["id"] == "script"
    assert metrics["data"]["backends"][0]["tokens_generated"] == 3


async def test_after_unsubscribing_no_more_events_arrive() -> None:
    async with serve_in_process(FAST_EVENTS) as node, ws_session(node.url) as ws:
        await ws.send({"type": "subscribe", "topics": "peers"})
        await ws.event("peers", "snapshot")
        await ws.send({"type": "unsubscribe", "topics": ["peers"]})
        unsubscribed = await ws.recv()
        assert unsubscribed["type"] == "unsubscribed" and unsubscribed["subscriptions"] == []
        node.peers.append({"peer_id": "late"})
        await trio.sleep(0.3)
        await ws.send({"type": "ping"})
        before_pong, _ = await ws.recv_until(lambda m: m["type"] == "pong")
    assert before_pong == []


async def test_with_api_keys_a_handshake_without_a_valid_key_is_refused() -> None:
    async with serve_in_process(WebSocketSettings(), api_keys=("sk-ws-1",)) as node:
        url = node.url.replace("http://", "ws://")
        for bad in ("/ws/anon", "/ws/anon?api_key=sk-wrong"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(url + bad):
                    pass
            assert rejected.value.status_code == 403
        async with ws_session(node.url, "/ws/by-query?api_key=sk-ws-1") as ws:
            assert (await ws.ping())["type"] == "pong"
        async with ws_session(node.url, "/ws/by-header", extra_headers=[(b"authorization", b"Bearer sk-ws-1")]) as ws:
            assert (await ws.ping())["type"] == "pong"


async def test_the_python_client_sends_its_api_key_and_is_refused_without_one() -> None:
    async with serve_in_process(WebSocketSettings(), api_keys=("sk-ws-1",)) as node:

        async def main() -> tuple[str, int]:
            async with NodeClient(node.url, api_key="sk-ws-1") as client:
                text = await client.chat("with a key", max_tokens=2)
            try:
                async with NodeClient(node.url):
                    pass
            except InvalidStatus as exc:
                return text, exc.response.status_code
            return text, 0

        text, refused_status = await in_asyncio_thread(main)
    assert text == "key-0 key-1 "
    assert refused_status == 403


async def test_the_python_client_cancels_a_stream_it_leaves_early_and_follows_topics() -> None:
    backend = ScriptBackend(delay=0.02)
    async with serve_in_process(FAST_EVENTS, backend=backend) as node:

        def add_peer() -> None:
            node.peers.append({"peer_id": "from-test"})

        def open_streams() -> int:
            return backend.open_streams

        async def main() -> tuple[list[str], int, list[dict[str, Any]], RequestCancelled | None]:
            async with NodeClient(node.url, client_id="py") as client:
                first: list[str] = []
                async with client.stream("chat", "go", max_tokens=10_000) as answer:
                    async for chunk in answer:
                        first.append(chunk)
                        if len(first) == 3:
                            break
                # Leaving the block cancelled the request; the node closes the backend stream.
                deadline = time.monotonic() + 5
                while trio.from_thread.run_sync(open_streams) and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                open_after = trio.from_thread.run_sync(open_streams)

                assert await client.subscribe("peers") == ["peers"]
                events = client.events()
                snapshot = await anext(events)
                trio.from_thread.run_sync(add_peer)
                joined = await asyncio.wait_for(anext(events), 5)

                call = client.stream("chat", "go", max_tokens=10_000)

                async def cancel_after_first_chunk() -> RequestCancelled | None:
                    sent = False
                    try:
                        async for _ in call:
                            if not sent:
                                sent = True
                                await client.cancel(call.request_id)
                    except RequestCancelled as exc:
                        return exc
                    return None

                cancelled = await asyncio.wait_for(cancel_after_first_chunk(), 10)
                return first, open_after, [snapshot, joined], cancelled

        first, open_after, events, cancelled = await in_asyncio_thread(main)
    assert first == ["go-0 ", "go-1 ", "go-2 "]
    assert open_after == 0
    assert [e["event"] for e in events] == ["snapshot", "peer_joined"]
    assert events[1]["data"]["peer"] == {"peer_id": "from-test"}
    assert cancelled is not None and cancelled.code == "cancelled"


async def test_binary_frames_with_json_are_accepted() -> None:
    async with serve_in_process(WebSocketSettings()) as node, ws_session(node.url) as ws:
        await ws.send(json.dumps({"type": "ping", "request_id": "bin"}).encode())
        assert (await ws.recv())["request_id"] == "bin"


async def test_an_unusable_client_id_is_explained_and_closed_and_ws_alone_gets_an_id() -> None:
    async with serve_in_process(WebSocketSettings()) as node:
        url = node.url.replace("http://", "ws://")
        async with open_websocket_url(f"{url}/ws/{'x' * 200}") as ws:
            with trio.fail_after(10):
                error = json.loads(await ws.get_message())
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
        assert error["code"] == "invalid_client_id" and error["param"] == "client_id"
        assert closed.value.reason is not None and closed.value.reason.code == 1008
        async with ws_session(node.url, "/ws") as anonymous:
            assert anonymous.hello["client_id"].startswith("anon-")
