"""The node's MCP server as agents use it: the official `mcp.Client` over streamable HTTP
(at a real node's `/mcp`) and over stdio (`p2p-node mcp` as a subprocess)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import trio
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult

from mcp import Client, StdioServerParameters
from tests.conftest import TINY_CONFIG, NodeProcess, node_env, start_node

TINY = "tiny-random-llama"
FLUSH_AFTER_DRAIN_S = 5.0  # p2p_node.node: how long hypercorn may wait on connections at shutdown
MINILM = "all-MiniLM-L6-v2"
KEY = "sk-mcp-test"
TOOLS = {
    "list_inference_backends",
    "get_backend_status",
    "select_backend_for_inference",
    "route_inference_request",
    "get_supported_tasks",
    "list_peers",
    "list_models",
    "load_model",
    "unload_model",
}
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}},
}


# ---- helpers --------------------------------------------------------------------------


@asynccontextmanager
async def mcp_over_http(node: NodeProcess, headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120)) as http:
        async with Client(streamable_http_client(node.url + "/mcp", http_client=http)) as client:
            yield client


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, error_text(result)
    assert result.structured_content is not None
    return result.structured_content


async def call_error(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return error_text(result)


def error_text(result: CallToolResult) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


async def http_post(node: NodeProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(node.url + path, json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def stdio_server(workdir: Path, config: str, env: dict[str, str] | None = None) -> StdioServerParameters:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "node.toml").write_text(config)
    variables = {"P2P_NODE_IDENTITY_KEY": str(workdir / "identity.key"), **(env or {})}
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "p2p_node", "mcp", "--config", str(workdir / "node.toml")],
        env=node_env(variables),
        cwd=workdir,
    )


@pytest.fixture(scope="module")
def locked_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """API keys required, and one extra name and origin allowed for MCP."""
    node = start_node(
        tmp_path_factory.mktemp("mcp-locked"),
        TINY_CONFIG,
        env={
            "P2P_NODE_API_KEYS": KEY,
            "P2P_NODE_MCP_ALLOWED_HOSTS": "node.example:*",
            "P2P_NODE_MCP_ALLOWED_ORIGINS": "https://console.example",
        },
    )
    yield node
    node.stop()


# ---- over HTTP: discovery and status ------------------------------------------------------


async def test_every_tool_is_listed_with_typed_input_and_output_schemas(tiny_node: NodeProcess) -> None:
    async with mcp_over_http(tiny_node) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and tool.output_schema, tool.name
    route = tools["route_inference_request"].input_schema
    assert route["required"] == ["task"]
    assert {"messages", "prompt", "inputs", "query", "documents", "max_tokens", "timeout_s"} <= set(route["properties"])
    assert tools["load_model"].input_schema["required"] == ["model_id"]
    assert tools["list_models"].annotations is not None and tools["list_models"].annotations.read_only_hint


async def test_backends_tasks_and_models_describe_the_node(tiny_node: NodeProcess) -> None:
    async with mcp_over_http(tiny_node) as client:
        backends = await call(client, "list_inference_backends")
        tasks = await call(client, "get_supported_tasks")
        models = await call(client, "list_models")
        chat_models = await call(client, "list_models", task="chat")
    local = next(b for b in backends["backends"] if b["id"] == "local")
    assert local["type"] == "local" and local["routable"]
    assert set(local["tasks"]) == {"chat", "completion", "embedding", "rerank"}
    assert TINY in local["loaded_models"]
    by_task = {t["task"]: t for t in tasks["tasks"]}
    assert by_task["chat"]["default_model"] == TINY and "local" in by_task["chat"]["backends"]
    assert by_task["embedding"]["models"] == [MINILM]
    by_id = {m["id"]: m for m in models["models"]}
    assert by_id[TINY]["tasks"] == ["chat", "completion"] and by_id[TINY]["loaded"]
    assert by_id["qwen-coder-1.5b"]["alias_of"] == TINY
    assert models["default_models"]["embedding"] == MINILM
    assert MINILM not in {m["id"] for m in chat_models["models"]}


async def test_backend_status_is_the_node_report_or_one_backend(tiny_node: NodeProcess) -> None:
    async with httpx.AsyncClient() as http:
        node_id = (await http.get(tiny_node.url + "/status")).json()["node"]["id"]
    async with mcp_over_http(tiny_node) as client:
        whole = await call(client, "get_backend_status")
        local = await call(client, "get_backend_status", backend_id="local")
    assert whole["node"]["id"] == node_id
    assert [b["id"] for b in whole["manager"]["backends"]] == ["local"]
    assert local["id"] == "local" and "metrics" in local and "circuit" in local


async def test_selection_names_the_backend_and_the_concrete_model(tiny_node: NodeProcess) -> None:
    async with mcp_over_http(tiny_node) as client:
        chosen = await call(client, "select_backend_for_inference", task="text-generation", model="qwen-coder-1.5b")
        preferring_api = await call(client, "select_backend_for_inference", task="chat", preferred_types=["api"])
    assert chosen["task"] == "completion"  # the seed's task name
    assert chosen["model"] == TINY  # the alias, resolved
    assert chosen["backend_id"] == "local" and chosen["candidates"] == ["local"]
    # No API backend here: the preference is reported as unmet, and the local one is chosen.
    assert preferring_api["preferred_types_matched"] is False and preferring_api["backend_id"] == "local"


async def test_peers_are_those_of_the_mesh_status(tiny_node: NodeProcess) -> None:
    async with httpx.AsyncClient() as http:
        mesh = (await http.get(tiny_node.url + "/status")).json()["mesh"]
    async with mcp_over_http(tiny_node) as client:
        peers = await call(client, "list_peers")
    assert peers["mesh_enabled"] is True
    assert peers["peer_id"] == mesh["peer_id"] and peers["addrs"] == mesh["addrs"]
    assert [p["peer_id"] for p in peers["peers"]] == [p["peer_id"] for p in mesh["peers"]]


async def test_status_is_also_readable_as_resources(tiny_node: NodeProcess) -> None:
    async with mcp_over_http(tiny_node) as client:
        uris = {str(r.uri) for r in (await client.list_resources()).resources}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        status = json.loads((await client.read_resource("p2p-node://status")).contents[0].text)  # type: ignore[union-attr]
        local = json.loads((await client.read_resource("p2p-node://backends/local")).contents[0].text)  # type: ignore[union-attr]
        models = json.loads((await client.read_resource("p2p-node://models")).contents[0].text)  # type: ignore[union-attr]
        with pytest.raises(MCPError, match="no backend with id 'nowhere'") as missing:
            await client.read_resource("p2p-node://backends/nowhere")
    assert missing.value.code == -32602  # invalid params: the resource does not exist
    assert {"p2p-node://status", "p2p-node://backends", "p2p-node://models", "p2p-node://health/inference"} <= uris
    assert templates == {"p2p-node://backends/{backend_id}"}
    assert status["manager"]["backends"][0]["id"] == "local"
    assert local["id"] == "local"
    assert TINY in {m["id"] for m in models["models"]}


# ---- over HTTP: inference ---------------------------------------------------------------


async def test_chat_through_mcp_is_the_answer_the_http_api_gives(tiny_node: NodeProcess) -> None:
    async with mcp_over_http(tiny_node) as client:
        outcome = await call(
            client, "route_inference_request", task="chat", messages=MESSAGES, max_tokens=12, temperature=0
        )
    expected = await http_post(
        tiny_node, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    )
    assert outcome["text"] and outcome["text"] == expected["choices"][0]["message"]["content"]
    assert outcome["usage"] == expected["usage"]
    assert outcome["backend_id"] == "local" and outcome["model"] == TINY
    assert outcome["finish_reason"] == expected["choices"][0]["finish_reason"]


async def test_completion_through_mcp_is_the_answer_the_http_api_gives(tiny_node: NodeProcess) -> None:
    prompt = "Once upon a time"
    async with mcp_over_http(tiny_node) as client:
        outcome = await call(
            client, "route_inference_request", task="completion", prompt=prompt, max_tokens=8, temperature=0
        )
    expected = await http_post(tiny_node, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert outcome["text"] == expected["choices"][0]["text"]
    assert outcome["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]


async def test_embeddings_and_rerank_through_mcp_match_the_http_api(tiny_node: NodeProcess) -> None:
    texts = ["the cat sat on the mat", "stock markets fell today"]
    documents = ["Paris is the capital of France.", "Cats purr when content.", "The stock market closed lower."]
    async with mcp_over_http(tiny_node) as client:
        embedded = await call(client, "route_inference_request", task="embeddings", inputs=texts)
        ranked = await call(
            client, "route_inference_request", task="rerank", query="why do cats purr?", documents=documents, top_n=2
        )
    expected = await http_post(tiny_node, "/v1/embeddings", {"input": texts})
    assert embedded["dimensions"] == 384 and len(embedded["embeddings"]) == 2
    for ours, theirs in zip(embedded["embeddings"], expected["data"], strict=True):
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(ours, theirs["embedding"], strict=True))
    over_http = await http_post(
        tiny_node, "/v1/rerank", {"query": "why do cats purr?", "documents": documents, "top_n": 2}
    )
    assert [r["index"] for r in ranked["results"]] == [r["index"] for r in over_http["results"]]
    assert ranked["results"][0] == {
        "index": 1,
        "relevance_score": pytest.approx(over_http["results"][0]["relevance_score"], abs=1e-5),
        "document": documents[1],
    }


async def test_load_and_unload_model_change_what_is_loaded(tiny_node: NodeProcess) -> None:
    async def minilm_loaded(client: Client) -> bool:
        models = await call(client, "list_models", task="embedding")
        return bool(next(m for m in models["models"] if m["id"] == MINILM)["loaded"])

    async with mcp_over_http(tiny_node) as client:
        loaded = await call(client, "load_model", model_id=MINILM)
        assert loaded == {"status": "loaded", "model_id": MINILM, "backends": ["local"]}
        assert await minilm_loaded(client)
        unloaded = await call(client, "unload_model", model_id=MINILM, backend_id="local")
        assert unloaded == {"status": "unloaded", "model_id": MINILM, "backends": ["local"]}
        assert not await minilm_loaded(client)


# ---- over HTTP: errors an agent can act on ----------------------------------------------


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        (
            "route_inference_request",
            {"task": "chat", "model": "nowhere", "prompt": "hi"},
            "model_not_found: model 'nowhere'",
        ),
        ("route_inference_request", {"task": "translate", "prompt": "hi"}, "invalid_request: unknown task 'translate'"),
        ("route_inference_request", {"task": "chat"}, "invalid_request: task 'chat' needs messages"),
        (
            "route_inference_request",
            {"task": "embedding", "inputs": ["a"], "max_tokens": 3},
            "max_tokens does not apply",
        ),
        ("route_inference_request", {"task": "rerank", "query": "q"}, "task 'rerank' needs documents"),
        ("route_inference_request", {"task": "chat", "prompt": "hi", "temperature": 5}, "temperature"),
        (
            "get_backend_status",
            {"backend_id": "nowhere"},
            "invalid_request: no backend with id 'nowhere'; known backends: local",
        ),
        (
            "load_model",
            {"model_id": "nowhere"},
            "model_not_found: no backend offers model 'nowhere' (argument: model_id)",
        ),
        ("unload_model", {"model_id": MINILM, "backend_id": "gpu-9"}, "no backend with id 'gpu-9'"),
        ("list_models", {"task": "juggling"}, "unknown task 'juggling'"),
        ("juggle", {}, "Unknown tool: juggle"),
    ],
)
async def test_bad_requests_come_back_as_tool_errors_that_say_what_to_change(
    tiny_node: NodeProcess, tool: str, arguments: dict[str, Any], expected: str
) -> None:
    async with mcp_over_http(tiny_node) as client:
        message = await call_error(client, tool, **arguments)
    assert expected in message


async def test_an_unknown_model_error_lists_the_models_that_exist(tiny_node: NodeProcess) -> None:
    async with mcp_over_http(tiny_node) as client:
        message = await call_error(client, "route_inference_request", task="chat", model="gpt-9", prompt="hi")
    assert f"available: {TINY}" in message and "list_models" in message


async def test_a_request_past_its_timeout_is_a_deadline_error(tiny_node: NodeProcess) -> None:
    async with mcp_over_http(tiny_node) as client:
        message = await call_error(
            client, "route_inference_request", task="chat", prompt="hi", max_tokens=500, timeout_s=0.001
        )
        # The node is fine afterwards.
        after = await call(client, "route_inference_request", task="chat", prompt="hi", max_tokens=2)
    assert message.startswith("Error executing tool route_inference_request: deadline_exceeded:")
    assert after["usage"]["completion_tokens"] == 2


# ---- over HTTP: authentication and DNS-rebinding protection ---------------------------------


async def test_with_api_keys_mcp_needs_one_like_every_other_path(locked_node: NodeProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        refused = await http.post(locked_node.url + "/mcp", json=INITIALIZE, headers=_mcp_headers())
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    async with mcp_over_http(locked_node, {"authorization": f"Bearer {KEY}"}) as client:
        peers = await call(client, "list_peers")
    assert peers["mesh_enabled"] is True


async def test_the_mcp_client_without_the_key_fails_at_once_instead_of_hanging(locked_node: NodeProcess) -> None:
    refused: list[MCPError] = []
    with trio.fail_after(30):
        try:
            async with mcp_over_http(locked_node) as client:
                await client.list_tools()
        except* MCPError as group:
            refused = [exc for exc in _leaves(group) if isinstance(exc, MCPError)]
    assert refused and "error response" in refused[0].message


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


@pytest.mark.parametrize(
    ("host", "origin", "status"),
    [
        ("evil.example", None, 421),
        ("node.example", None, 200),
        ("node.example", "https://evil.example", 403),
        ("node.example", "https://console.example", 200),
        ("localhost", "http://localhost:3000", 200),
    ],
)
def test_host_and_origin_headers_are_checked_against_the_configured_names(
    locked_node: NodeProcess, host: str, origin: str | None, status: int
) -> None:
    port = locked_node.url.rsplit(":", 1)[1]
    headers = {**_mcp_headers(), "host": f"{host}:{port}", "x-api-key": KEY}
    if origin:
        headers["origin"] = origin
    response = httpx.post(locked_node.url + "/mcp", json=INITIALIZE, headers=headers, timeout=10)
    assert response.status_code == status, response.text


async def test_stopping_a_node_does_not_wait_on_an_open_mcp_session(tmp_path: Path) -> None:
    """An agent keeps its session's event stream open between calls; the node ends it after
    the drain instead of letting the HTTP server wait its whole graceful timeout."""
    node = start_node(tmp_path, "[models]\npreload = []\n[discovery]\nenabled = false\n", wait_ready=False)
    try:
        # The handshake-era protocol: the client holds a GET stream open for the session.
        async with Client(node.url + "/mcp", mode="legacy") as client:
            assert (await call(client, "list_peers"))["mesh_enabled"]
            started = time.monotonic()
            node.process.send_signal(signal.SIGTERM)
            while node.process.poll() is None:
                assert time.monotonic() - started < 30
                await trio.sleep(0.05)
            stopped_after = time.monotonic() - started
    except BaseExceptionGroup as group:  # the client, closing, finds the node gone
        if any(isinstance(leaf, AssertionError) for leaf in _leaves(group)):
            raise
    finally:
        node.stop()
    assert node.process.returncode == 0
    assert stopped_after < FLUSH_AFTER_DRAIN_S, node.log()


def _mcp_headers() -> dict[str, str]:
    return {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def test_transport_security_accepts_loopback_the_bound_address_and_the_configured_names() -> None:
    from p2p_node.mcp_server.http import McpHttpSettings, transport_security

    default = transport_security(McpHttpSettings())
    assert default.enable_dns_rebinding_protection
    assert {"127.0.0.1:*", "localhost:*", "[::1]:*"} <= set(default.allowed_hosts)
    bound = transport_security(McpHttpSettings(bind_host="10.1.2.3", allowed_hosts=("node.lan:8000",)))
    assert {"10.1.2.3:*", "node.lan:8000"} <= set(bound.allowed_hosts)
    assert "http://10.1.2.3:*" in bound.allowed_origins
    everywhere = transport_security(McpHttpSettings(bind_host="0.0.0.0"))
    assert not any(h.startswith("0.0.0.0") for h in everywhere.allowed_hosts)
    assert not transport_security(McpHttpSettings(allowed_hosts=("*",))).enable_dns_rebinding_protection


def test_client_snippets_are_valid_and_point_at_this_node() -> None:
    """The files agent hosts copy: JSON they can load, the /mcp path, the mcp subcommand."""
    folder = Path(__file__).resolve().parents[2] / "mcp"
    assert not list(folder.glob("*.py")) and not (folder / "__init__.py").exists()
    snippets = {path.name: json.loads(path.read_text()) for path in folder.glob("*.json")}
    assert set(snippets) == {
        "claude_desktop_config.json",
        "claude-code.mcp.json",
        "cursor.mcp.json",
        "vscode.mcp.json",
    }
    for name, snippet in snippets.items():
        servers = snippet.get("mcpServers") or snippet["servers"]
        for server in servers.values():
            if "url" in server:
                assert server["url"].endswith("/mcp"), name
            else:
                assert server["command"].endswith("p2p-node") and server["args"][0] == "mcp", name


# ---- over stdio -------------------------------------------------------------------------

NO_LOCAL_CHAT = """
[models]
chat = {}
default_chat = "tiny-random-llama"
preload = []
[discovery]
enabled = false
"""


@pytest.mark.slow
async def test_stdio_node_runs_on_its_own_and_reaches_a_peer_through_the_mesh(
    tiny_node: NodeProcess, tmp_path: Path
) -> None:
    """`p2p-node mcp` embeds a node: its own embedding model, and the mesh, through which
    it answers chat with the peer's model exactly as the peer does over HTTP."""
    async with httpx.AsyncClient() as http:
        peer = (await http.get(tiny_node.url + "/status")).json()["mesh"]
    params = stdio_server(tmp_path, NO_LOCAL_CHAT, {"LIBP2P_BOOTSTRAP_PEERS": peer["addrs"][0]})
    with trio.fail_after(90):
        async with Client(params) as client:
            assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
            while True:
                peers = await call(client, "list_peers")
                known = {p["peer_id"]: p for p in peers["peers"]}
                if known.get(peer["peer_id"], {}).get("backend_id"):
                    break
                await trio.sleep(0.2)
            peer_backend = known[peer["peer_id"]]["backend_id"]
            assert TINY in known[peer["peer_id"]]["models"]

            backends = {b["id"]: b for b in (await call(client, "list_inference_backends"))["backends"]}
            assert backends["local"]["tasks"] == ["embedding", "rerank"]
            assert backends[peer_backend]["type"] == "p2p"
            assert (await call(client, "get_backend_status", backend_id=peer_backend))["type"] == "p2p"
            chosen = await call(client, "select_backend_for_inference", task="chat", preferred_types=["local"])
            assert chosen["backend_id"] == peer_backend and chosen["preferred_types_matched"] is False
            tasks = {t["task"]: t for t in (await call(client, "get_supported_tasks"))["tasks"]}
            assert tasks["chat"]["backends"] == [peer_backend]
            models = {m["id"]: m for m in (await call(client, "list_models"))["models"]}
            assert models[TINY]["backends"] == [peer_backend]

            outcome = await call(
                client, "route_inference_request", task="chat", messages=MESSAGES, max_tokens=12, temperature=0
            )
            assert outcome["backend_id"] == peer_backend
            assert await call(client, "load_model", model_id=MINILM, backend_id="local")
            embedded = await call(client, "route_inference_request", task="embedding", inputs=["hello"])
            assert len(embedded["embeddings"][0]) == 384
            assert (await call(client, "unload_model", model_id=MINILM, backend_id="local"))["backends"] == ["local"]
            message = await call_error(client, "route_inference_request", task="chat", model="nowhere", prompt="hi")
            assert message.startswith("Error executing tool route_inference_request: model_not_found:")
    expected = await http_post(
        tiny_node, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    )
    assert outcome["text"] == expected["choices"][0]["message"]["content"]


STANDALONE = """
[models]
default_chat = "tiny-random-llama"
chat = { "tiny-random-llama" = "builtin:tiny-random" }
preload = []
[discovery]
enabled = false
[mesh]
enabled = false
"""


async def test_stdio_server_serves_the_tools_with_its_own_models(tiny_node: NodeProcess, tmp_path: Path) -> None:
    texts = ["the cat sat on the mat", "stock markets fell today"]
    with trio.fail_after(60):
        async with Client(stdio_server(tmp_path, STANDALONE)) as client:
            assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
            backends = await call(client, "list_inference_backends")
            outcome = await call(client, "route_inference_request", task="embedding", inputs=texts)
            message = await call_error(client, "route_inference_request", task="completion")
            peers = await call(client, "list_peers")
    assert [b["id"] for b in backends["backends"]] == ["local"]
    assert outcome["backend_id"] == "local"
    # The same embedded model as the HTTP node's: the same vectors.
    expected = await http_post(tiny_node, "/v1/embeddings", {"input": texts})
    for ours, theirs in zip(outcome["embeddings"], expected["data"], strict=True):
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(ours, theirs["embedding"], strict=True))
    assert "invalid_request: task 'completion' needs prompt" in message
    assert peers == {"mesh_enabled": False, "peer_id": None, "addrs": [], "peers": []}


def _spawn_stdio(tmp_path: Path) -> subprocess.Popen[bytes]:
    params = stdio_server(tmp_path, STANDALONE)
    return subprocess.Popen(
        [params.command, *params.args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=params.env,
        cwd=params.cwd,
    )


def _exchange(process: subprocess.Popen[bytes], message: dict[str, Any]) -> dict[str, Any]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(json.dumps(message).encode() + b"\n")
    process.stdin.flush()
    answer: dict[str, Any] = json.loads(process.stdout.readline())
    return answer


def test_stdout_carries_only_the_protocol_and_logs_go_to_stderr(tmp_path: Path) -> None:
    process = _spawn_stdio(tmp_path)
    try:
        assert _exchange(process, INITIALIZE)["result"]["serverInfo"]["name"] == "p2p-node"
        assert process.stdin is not None
        process.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode() + b"\n")
        listed = _exchange(process, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert {tool["name"] for tool in listed["result"]["tools"]} == TOOLS
        process.stdin.close()  # how agent hosts end a stdio session
        process.wait(30)
        assert process.stdout is not None and process.stderr is not None
        rest, errors = process.stdout.read(), process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, errors.decode()
    assert rest == b""  # nothing but the two answers ever reached stdout
    log = errors.decode()
    assert "effective configuration" in log and "serving MCP on stdio" in log and "stdin closed" in log


def test_sigterm_stops_the_stdio_server_while_the_host_keeps_stdin_open(tmp_path: Path) -> None:
    process = _spawn_stdio(tmp_path)
    try:
        assert _exchange(process, INITIALIZE)["id"] == 1
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(20)
        assert time.monotonic() - started < 20
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0
