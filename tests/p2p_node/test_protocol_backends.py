"""A second node reached by the first over each protocol in turn (WebSocket, MCP,
several at once), killed and restarted mid-run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_CONFIG, NodeProcess, free_port, start_node, wait_for

TINY = "tiny-random-llama"
GATEWAY = """
[models]
chat = {{}}
default_chat = "tiny-random-llama"
preload = []

[mesh]
enabled = false

[routing]
health_check_interval = 0.5

[[backends]]
id = "remote"
type = "{kind}"
url = "{url}"
"""
BODY = {"model": TINY, "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 12}


def ask(node: NodeProcess, **extra: object) -> httpx.Response:
    return httpx.post(node.url + "/v1/chat/completions", json={**BODY, "temperature": 0, **extra}, timeout=60)


def backend_status(node: NodeProcess, backend_id: str) -> str:
    backends = httpx.get(node.url + "/status", timeout=10).json()["manager"]["backends"]
    return next(b["status"] for b in backends if b["id"] == backend_id)


def serves_tiny(node: NodeProcess) -> bool:
    try:
        return ask(node).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_websocket_backend_serves_streams_and_survives_a_restart_of_the_remote(tmp_path: Path) -> None:
    port = free_port()
    remote = start_node(tmp_path / "remote", TINY_CONFIG + "\n[mesh]\nenabled = false\n", port=port)
    try:
        gateway = start_node(tmp_path / "gateway", GATEWAY.format(kind="websocket", url=f"ws://127.0.0.1:{port}"))
    except BaseException:
        remote.stop()  # the remote must not outlive a gateway that failed to start
        raise
    try:
        wait_for(lambda: serves_tiny(gateway))
        through = ask(gateway)
        assert through.headers["x-backend-id"] == "remote"
        expected = ask(remote).json()["choices"][0]["message"]["content"]
        assert through.json()["choices"][0]["message"]["content"] == expected
        streamed = httpx.post(
            gateway.url + "/v1/chat/completions", json={**BODY, "temperature": 0, "stream": True}, timeout=60
        )
        lines = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        pieces = [json.loads(x)["choices"][0]["delta"].get("content") or "" for x in lines[:-1]]
        assert "".join(pieces) == expected and len(pieces) > 2

        remote.stop(signal.SIGKILL)
        failed = ask(gateway)
        assert failed.status_code in (502, 503) and failed.json()["error"]["message"]
        wait_for(lambda: backend_status(gateway, "remote") == "unhealthy", timeout=30)

        remote = start_node(tmp_path / "remote2", TINY_CONFIG + "\n[mesh]\nenabled = false\n", port=port)
        wait_for(lambda: serves_tiny(gateway), timeout=90)
        assert ask(gateway).json()["choices"][0]["message"]["content"] == expected
    finally:
        gateway.stop()
        remote.stop()


def test_a_websocket_backend_with_an_http_url_is_a_clear_error_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import node_env

    config = tmp_path / "node.toml"
    config.write_text(GATEWAY.format(kind="websocket", url="http://127.0.0.1:1"))
    result = subprocess.run(
        [sys.executable, "-m", "p2p_node", "start", "--config", str(config), "--port", "0"],
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "ws://" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_mcp_backend_over_http_serves_and_reconnects_after_the_remote_restarts(tmp_path: Path) -> None:
    port = free_port()
    remote = start_node(tmp_path / "remote", TINY_CONFIG + "\n[mesh]\nenabled = false\n", port=port)
    try:
        gateway = start_node(tmp_path / "gateway", GATEWAY.format(kind="mcp", url=f"http://127.0.0.1:{port}/mcp"))
    except BaseException:
        remote.stop()  # the remote must not outlive a gateway that failed to start
        raise
    try:
        wait_for(lambda: serves_tiny(gateway))
        through = ask(gateway)
        assert through.headers["x-backend-id"] == "remote"
        expected = ask(remote).json()["choices"][0]["message"]["content"]
        assert through.json()["choices"][0]["message"]["content"] == expected
        assert through.json()["usage"] == ask(remote).json()["usage"]
        missing = ask(gateway, model="nowhere")
        assert missing.status_code == 404

        remote.stop(signal.SIGKILL)
        wait_for(lambda: backend_status(gateway, "remote") == "unhealthy", timeout=30)
        remote = start_node(tmp_path / "remote2", TINY_CONFIG + "\n[mesh]\nenabled = false\n", port=port)
        wait_for(lambda: serves_tiny(gateway), timeout=90)
        again = ask(gateway)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"] == expected
    finally:
        gateway.stop()
        remote.stop()


@pytest.mark.slow
def test_mcp_backend_over_stdio_runs_a_node_as_a_subprocess(tmp_path: Path) -> None:
    import sys

    remote_config = tmp_path / "remote.toml"
    remote_config.write_text(TINY_CONFIG + "\n[mesh]\nenabled = false\n[discovery]\nenabled = false\n")
    config = GATEWAY.format(kind="mcp", url="").replace('url = ""\n', "")
    config += (
        f'options = {{ command = ["{sys.executable}", "-m", "p2p_node", "mcp", "--config", "{remote_config}"] }}\n'
    )
    gateway = start_node(tmp_path / "gateway", config)
    try:
        wait_for(lambda: serves_tiny(gateway), timeout=120)
        answer = ask(gateway)
        assert answer.headers["x-backend-id"] == "remote"
        assert answer.json()["usage"]["completion_tokens"] > 0
        embedded = httpx.post(
            gateway.url + "/v1/embeddings", json={"input": ["a b"], "model": "all-MiniLM-L6-v2"}, timeout=60
        )
        assert embedded.status_code == 200 and len(embedded.json()["data"][0]["embedding"]) == 384
    finally:
        gateway.stop()


@pytest.mark.slow
def test_hybrid_backend_registers_the_node_once_and_routes_around_a_dead_protocol(tmp_path: Path) -> None:
    port, dead = free_port(), free_port()
    remote = start_node(tmp_path / "remote", TINY_CONFIG + "\n[mesh]\nenabled = false\n", port=port)
    config = GATEWAY.format(kind="hybrid", url="").replace('url = ""\n', "")
    config += (
        f'options = {{ websocket = "ws://127.0.0.1:{dead}", http = "http://127.0.0.1:{port}/v1", '
        f'mcp = "http://127.0.0.1:{port}/mcp" }}\n'
    )
    try:
        gateway = start_node(tmp_path / "gateway", config)
    except BaseException:
        remote.stop()  # the remote must not outlive a gateway that failed to start
        raise
    try:
        wait_for(lambda: serves_tiny(gateway))
        expected = ask(remote).json()["choices"][0]["message"]["content"]
        for _ in range(4):
            response = ask(gateway)
            assert response.headers["x-backend-id"] == "remote"
            assert response.json()["choices"][0]["message"]["content"] == expected
        backends = httpx.get(gateway.url + "/status", timeout=10).json()["manager"]["backends"]
        hybrid = next(b for b in backends if b["id"] == "remote")
        assert hybrid["type"] == "hybrid" and len([b for b in backends if b["id"].startswith("remote")]) == 1
        protocols = {p["id"]: p for p in hybrid["details"]["protocols"]}
        assert protocols["remote/ws"]["status"] == "unhealthy"
        assert protocols["remote/http"]["ttft_ms"] is not None or protocols["remote/mcp"]["ttft_ms"] is not None
        wait_for(lambda: backend_status(gateway, "remote") == "degraded", timeout=30)

        remote.stop(signal.SIGKILL)
        wait_for(lambda: backend_status(gateway, "remote") == "unhealthy", timeout=30)
        assert ask(gateway).status_code in (502, 503)
        remote = start_node(tmp_path / "remote2", TINY_CONFIG + "\n[mesh]\nenabled = false\n", port=port)
        wait_for(lambda: serves_tiny(gateway), timeout=90)
        assert ask(gateway).json()["choices"][0]["message"]["content"] == expected
    finally:
        gateway.stop()
        remote.stop()
