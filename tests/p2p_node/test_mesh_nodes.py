"""Separate node processes on loopback joined through a bootstrap address: a request to
one node for a model only the other serves is answered, streamed, as if it were local."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import TINY_CONFIG, NodeProcess, start_node, wait_for

TINY = "tiny-random-llama"
NO_LOCAL_CHAT = """
[models]
chat = {}
default_chat = "tiny-random-llama"
preload = ["all-MiniLM-L6-v2"]
"""
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


def mesh_status(node: NodeProcess) -> dict:  # type: ignore[type-arg]
    return httpx.get(node.url + "/status", timeout=10).json()["mesh"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = start_node(tmp_path_factory.mktemp("server"), TINY_CONFIG)
    yield node
    node.stop()


@pytest.fixture(scope="module")
def asker(tmp_path_factory: pytest.TempPathFactory, server: NodeProcess) -> Iterator[NodeProcess]:
    bootstrap = mesh_status(server)["addrs"][0]
    node = start_node(tmp_path_factory.mktemp("asker"), NO_LOCAL_CHAT, env={"LIBP2P_BOOTSTRAP_PEERS": bootstrap})
    wait_for(lambda: any(p["models"] for p in mesh_status(node)["peers"]))
    yield node
    node.stop()


def ask(node: NodeProcess, **extra: object) -> httpx.Response:
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 16, "temperature": 0, **extra}
    return httpx.post(node.url + "/v1/chat/completions", json=body, timeout=60)


def test_each_node_sees_the_other_with_its_models_and_rtt(server: NodeProcess, asker: NodeProcess) -> None:
    server_id = mesh_status(server)["peer_id"]
    peers = {p["peer_id"]: p for p in mesh_status(asker)["peers"]}
    assert TINY in peers[server_id]["models"]
    wait_for(lambda: {p["peer_id"]: p for p in mesh_status(asker)["peers"]}[server_id]["rtt_ms"] is not None)
    asker_id = mesh_status(asker)["peer_id"]
    wait_for(lambda: asker_id in {p["peer_id"] for p in mesh_status(server)["peers"]})
    # The server's advert lists only what it serves itself.
    assert "all-MiniLM-L6-v2" in {p["peer_id"]: p for p in mesh_status(server)["peers"]}[asker_id]["models"]


def test_a_model_only_the_peer_serves_is_answered_through_the_mesh(server: NodeProcess, asker: NodeProcess) -> None:
    through = ask(asker)
    assert through.status_code == 200, through.text
    assert through.headers["x-backend-id"] == "peer:" + mesh_status(server)["peer_id"]
    direct = ask(server).json()
    assert through.json()["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert through.json()["usage"] == direct["usage"]


def test_streaming_through_the_mesh_arrives_token_by_token(server: NodeProcess, asker: NodeProcess) -> None:
    client = openai.OpenAI(base_url=asker.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=16, temperature=0, stream=True)  # type: ignore[arg-type]
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 3
    assert "".join(pieces) == ask(server).json()["choices"][0]["message"]["content"]


def test_embeddings_can_be_served_by_either(server: NodeProcess, asker: NodeProcess) -> None:
    response = httpx.post(asker.url + "/v1/embeddings", json={"input": ["a", "b"]}, timeout=60)
    assert response.status_code == 200
    assert len(response.json()["data"]) == 2


def test_unknown_model_anywhere_is_still_a_404(asker: NodeProcess) -> None:
    assert ask(asker, model="nowhere-model").status_code == 404


@pytest.mark.slow
def test_peer_death_mid_stream_resumes_on_next_peer(tmp_path_factory: pytest.TempPathFactory) -> None:
    import json
    import signal

    started: list[NodeProcess] = []
    try:
        first = start_node(tmp_path_factory.mktemp("first"), TINY_CONFIG)
        started.append(first)
        second = start_node(tmp_path_factory.mktemp("second"), TINY_CONFIG)
        started.append(second)
        peers = {mesh_status(n)["peer_id"]: n for n in (first, second)}
        bootstrap = ",".join(mesh_status(n)["addrs"][0] for n in (first, second))
        env = {"LIBP2P_BOOTSTRAP_PEERS": bootstrap}
        asker = start_node(tmp_path_factory.mktemp("asker2"), NO_LOCAL_CHAT, env=env)
        started.append(asker)
        wait_for(lambda: len([p for p in mesh_status(asker)["peers"] if p["models"]]) == 2)
        body = {"model": TINY, "messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        texts: list[str] = []
        with httpx.stream("POST", asker.url + "/v1/chat/completions", json=body, timeout=120) as response:
            victim = peers[response.headers["x-backend-id"].removeprefix("peer:")]
            survivor = second if victim is first else first
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                assert "error" not in event, event
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    texts.append(event["choices"][0]["delta"]["content"])
                    if len(texts) == 20:
                        victim.stop(signal.SIGKILL)
                if event.get("usage"):
                    usage = event["usage"]
        assert victim.process.poll() is not None and len(texts) > 20
        # Greedy decoding, same weights: the survivor continued exactly where the victim stopped.
        direct = ask(survivor, max_tokens=400).json()
        assert "".join(texts) == direct["choices"][0]["message"]["content"]
        assert usage["completion_tokens"] == direct["usage"]["completion_tokens"]
    finally:
        for node in started:
            node.stop()


def peer_backend(node: NodeProcess, peer_id: str) -> dict:  # type: ignore[type-arg]
    backends = httpx.get(node.url + "/status", timeout=10).json()["manager"]["backends"]
    return next(b for b in backends if b["id"] == "peer:" + peer_id)


def test_a_peer_is_one_backend_reached_over_libp2p_http_and_websocket(server: NodeProcess, asker: NodeProcess) -> None:
    server_id = mesh_status(server)["peer_id"]

    def all_protocols_up() -> bool:
        report = peer_backend(asker, server_id)
        protocols = report["details"].get("protocols", [])
        return report["type"] == "p2p" and bool(protocols) and all(p["status"] == "healthy" for p in protocols)

    wait_for(all_protocols_up)
    report = peer_backend(asker, server_id)
    assert [p["id"].split("/")[-1] for p in report["details"]["protocols"]] == ["libp2p", "http", "websocket"]
    assert report["details"]["api"] == server.url
    direct = ask(server).json()["choices"][0]["message"]["content"]
    # Unmeasured protocols are tried first, so a few requests go over each of them.
    for _ in range(4):
        through = ask(asker)
        assert through.status_code == 200 and through.headers["x-backend-id"] == "peer:" + server_id
        assert through.json()["choices"][0]["message"]["content"] == direct
    served = {p["id"].split("/")[-1]: p["ttft_ms"] for p in peer_backend(asker, server_id)["details"]["protocols"]}
    assert all(ttft is not None for ttft in served.values()), served


def test_a_request_that_came_from_a_peer_is_never_forwarded_to_one(server: NodeProcess, asker: NodeProcess) -> None:
    server_id = mesh_status(server)["peer_id"]
    assert ask(asker).status_code == 200  # the asker reaches the model through its peer...
    from_peer = httpx.post(
        asker.url + "/v1/chat/completions",
        json={"model": TINY, "messages": MESSAGES, "max_tokens": 4},
        headers={"x-p2p-node-hops": server_id},
        timeout=60,
    )
    # ...but not for a request that already came through that peer: no loops.
    assert from_peer.status_code == 503, from_peer.text
    assert from_peer.json()["error"]["code"] == "backend_unavailable"
    assert "not forwarded again" in from_peer.json()["error"]["message"]


def test_a_websocket_request_that_came_from_a_peer_is_never_forwarded(server: NodeProcess, asker: NodeProcess) -> None:
    import json

    from websockets.sync.client import connect

    server_id = mesh_status(server)["peer_id"]
    message = {"type": "inference", "task": "chat", "model": TINY, "inputs": MESSAGES, "request_id": "r1"}
    with connect(asker.url.replace("http", "ws") + "/ws/hops-test", open_timeout=10) as ws:
        replies = []
        for hops in ([], [server_id]):
            ws.send(json.dumps({**message, "hops": hops}))
            while True:
                reply = json.loads(ws.recv(timeout=60))
                if reply["type"] in ("inference_complete", "error"):
                    replies.append(reply)
                    break
    assert replies[0]["type"] == "inference_complete"
    assert replies[1]["type"] == "error" and replies[1]["code"] == "backend_unavailable", replies[1]


def test_streamed_chunks_carry_token_ids_when_asked(server: NodeProcess) -> None:
    import json

    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    body.update(return_token_ids=True, stream_options={"include_usage": True})
    ids: list[int] = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                for choice in event["choices"]:
                    if choice["delta"].get("content"):
                        ids += choice["token_ids"]
                if event.get("usage"):
                    usage = event["usage"]
    assert len(ids) == usage["completion_tokens"] and all(isinstance(i, int) for i in ids)


def test_peers_command_lists_the_peer_with_models_and_rtt(server: NodeProcess, asker: NodeProcess) -> None:
    import subprocess
    import sys

    from tests.conftest import node_env

    server_id = mesh_status(server)["peer_id"]
    wait_for(lambda: {p["peer_id"]: p for p in mesh_status(asker)["peers"]}[server_id]["rtt_ms"] is not None)
    result = subprocess.run(
        [sys.executable, "-m", "p2p_node", "peers", "--url", asker.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=node_env(),
    )
    assert result.returncode == 0, result.stderr
    assert server_id in result.stdout and "connected" in result.stdout and TINY in result.stdout
    assert "ms" in result.stdout


def test_join_bootstraps_through_the_given_peer(tmp_path: Path, server: NodeProcess) -> None:
    import subprocess
    import sys

    from tests.conftest import free_port, node_env

    port = free_port()
    command = [sys.executable, "-m", "p2p_node", "join", mesh_status(server)["addrs"][0], "--port", str(port)]
    env = node_env({"P2P_NODE_IDENTITY_KEY": str(tmp_path / "key"), "P2P_NODE_PRELOAD": ""})
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        joined = NodeProcess(f"http://127.0.0.1:{port}", process, tmp_path / "none.log")

        def sees_server() -> bool:
            try:
                return any(p["models"] for p in mesh_status(joined)["peers"])
            except httpx.HTTPError:
                return False

        wait_for(sees_server, timeout=60)
    finally:
        process.terminate()
        process.wait(30)


def test_peers_appear_in_metrics(server: NodeProcess, asker: NodeProcess) -> None:
    text = httpx.get(asker.url + "/metrics", timeout=10).text
    assert 'p2p_node:mesh_peers{state="connected"} 1.0' in text
    assert "p2p_node:mesh_adverts_sent_total" in text
