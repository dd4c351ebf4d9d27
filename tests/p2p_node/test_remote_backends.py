"""A node reaching another node's OpenAI-compatible API as a backend, configured the seed-002
way (INFERENCE_PROVIDER, LOCAL_INFERENCE_URL, ENABLE_FALLBACK, FALLBACK_CHAIN), and
falling back to its own local model when the upstream dies."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import TINY_CONFIG, NodeProcess, start_node, wait_for

TINY = "tiny-random-llama"
FAST_HEALTH = "\n[routing]\nhealth_check_interval = 0.5\nhealth_check_timeout = 2\n"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[NodeProcess]:
    node = start_node(tmp_path / "upstream", TINY_CONFIG)
    yield node
    node.stop()


@pytest.fixture
def gateway(tmp_path: Path, upstream: NodeProcess) -> Iterator[NodeProcess]:
    env = {
        "INFERENCE_PROVIDER": "vllm",  # any OpenAI-compatible server; seed 002 gives its URL without /v1
        "LOCAL_INFERENCE_URL": upstream.url,
        "LOCAL_MODEL_NAME": TINY,
        "ENABLE_FALLBACK": "true",
        "FALLBACK_CHAIN": "local",
    }
    node = start_node(tmp_path / "gateway", TINY_CONFIG + FAST_HEALTH, env=env)
    yield node
    node.stop()


def chat(node: NodeProcess, **extra: object) -> httpx.Response:
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, **extra}
    return httpx.post(node.url + "/v1/chat/completions", json=body, timeout=60)


def test_primary_provider_serves_and_answers_exactly_as_the_upstream(
    gateway: NodeProcess, upstream: NodeProcess
) -> None:
    direct = chat(upstream).json()
    through = chat(gateway)
    assert through.status_code == 200, through.text
    assert through.headers["x-backend-id"] == "vllm"
    answer = through.json()
    # The tiny model's weights are seeded: the same greedy answer in every process.
    assert answer["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert answer["usage"] == direct["usage"]


def test_streaming_through_the_gateway_matches_the_upstream(gateway: NodeProcess, upstream: NodeProcess) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=TINY,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == chat(upstream).json()["choices"][0]["message"]["content"]


def test_health_inference_reports_primary_and_fallbacks(gateway: NodeProcess) -> None:
    report = httpx.get(gateway.url + "/v1/health/inference", timeout=10).json()
    assert report["primary"]["type"] == "vllm"
    assert report["primary"]["healthy"] is True
    assert TINY in report["primary"]["models"]
    assert [f["type"] for f in report["fallbacks"]] == ["local"]
    assert report["fallbacks"][0]["healthy"] is True


def test_upstream_killed_the_fallback_serves_the_request(gateway: NodeProcess, upstream: NodeProcess) -> None:
    assert chat(gateway).headers["x-backend-id"] == "vllm"
    upstream.stop(signal.SIGKILL)
    # No health check has noticed yet: the request itself meets the dead upstream,
    # and is retried on the next tier before any token was sent.
    response = chat(gateway)
    assert response.status_code == 200, response.text
    assert response.headers["x-backend-id"] == "local"
    assert response.json()["choices"][0]["message"]["content"]

    def primary_unhealthy() -> bool:
        report = httpx.get(gateway.url + "/v1/health/inference", timeout=10).json()
        return report["primary"]["healthy"] is False and "unreachable" in report["primary"].get("error", "")

    wait_for(primary_unhealthy)
    # Streaming requests fall back too.
    streamed = chat(gateway, stream=True)
    assert streamed.status_code == 200
    assert streamed.headers["x-backend-id"] == "local"
    assert streamed.text.rstrip().endswith("data: [DONE]")


def test_missing_openai_key_is_one_clear_line_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import node_env

    result = subprocess.run(
        [sys.executable, "-m", "p2p_node", "start", "--port", "0"],
        env=node_env({"INFERENCE_PROVIDER": "openai", "OPENAI_API_KEY": ""}),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("p2p-node: ") and "OPENAI_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_provider_is_one_clear_line_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import node_env

    result = subprocess.run(
        [sys.executable, "-m", "p2p_node", "start", "--port", "0"],
        env=node_env({"INFERENCE_PROVIDER": "skynet"}),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "unknown inference provider 'skynet'" in result.stderr


def test_a_server_found_by_discovery_serves_the_models_only_it_has(tmp_path: Path, upstream: NodeProcess) -> None:
    port = int(upstream.url.rsplit(":", 1)[1])
    config = f"""
[models]
chat = {{}}
preload = []

[discovery]
ports = [{port}]
"""
    node = start_node(tmp_path / "discovering", config)
    try:
        response = chat(node)
        assert response.status_code == 200, response.text
        assert response.headers["x-backend-id"] == f"p2p-node-{port}"
        assert (
            response.json()["choices"][0]["message"]["content"]
            == chat(upstream).json()["choices"][0]["message"]["content"]
        )
        backends = {b["id"]: b for b in httpx.get(node.url + "/status", timeout=10).json()["manager"]["backends"]}
        assert backends[f"p2p-node-{port}"]["type"] == "api"
        assert backends[f"p2p-node-{port}"]["endpoint"] == upstream.url + "/v1"
    finally:
        node.stop()


def test_a_configured_cli_tool_serves_chat_through_the_openai_api(tmp_path: Path) -> None:
    import sys

    from tests.conftest import REPO_ROOT

    tool = REPO_ROOT / "tests" / "backends" / "cli" / "tools" / "fake_llm.py"
    config = f"""
[models]
preload = []

[[backends]]
id = "llm-cli"
type = "cli"
models = ["cli-echo"]
options = {{ command = "{sys.executable} {tool} -m {{model}} {{prompt}}" }}
"""
    node = start_node(tmp_path / "cli-node", config)
    try:
        client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="cli-echo",
            messages=[{"role": "user", "content": "say 'quoted; words' back"}],
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert "say 'quoted; words' back" in text
        health = httpx.get(node.url + "/v1/health/inference", timeout=10).json()
        assert {f["type"]: f["healthy"] for f in health["fallbacks"]} == {"llm-cli": True}
    finally:
        node.stop()


def test_a_malformed_cli_template_is_one_clear_line_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import node_env

    config = tmp_path / "node.toml"
    config.write_text(
        '[[backends]]\nid = "bad"\ntype = "cli"\nmodels = ["x"]\noptions = { command = "claude -p {pompt}" }\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "p2p_node", "start", "--config", str(config), "--port", "0"],
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]  # after the effective-configuration log line
    assert last_line.startswith("p2p-node: ") and "{pompt}" in last_line
    assert "Traceback" not in result.stderr


def test_an_unreachable_backend_url_is_reported_clearly_and_the_node_still_serves(tmp_path: Path) -> None:
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = TINY_CONFIG + f'\n[[backends]]\nid = "nowhere"\ntype = "openai"\nurl = "{dead}"\nmodels = ["{TINY}"]\n'
    node = start_node(tmp_path / "unreachable", config)
    try:
        warning = [line for line in node.log().splitlines() if "nowhere" in line and "not healthy at start" in line]
        assert len(warning) == 1 and "unreachable" in warning[0]
        response = chat(node)  # an unhealthy backend gets no traffic while a healthy one can serve
        assert response.status_code == 200
        assert response.headers["x-backend-id"] == "local"
        backends = {b["id"]: b for b in httpx.get(node.url + "/status", timeout=10).json()["manager"]["backends"]}
        assert backends["nowhere"]["status"] == "unhealthy"
    finally:
        node.stop()


def test_a_supervised_vllm_configured_in_toml_serves_chat(tmp_path: Path) -> None:
    import sys

    from tests.conftest import REPO_ROOT

    fake = REPO_ROOT / "tests" / "backends" / "gpu" / "fake_vllm.py"
    config = f"""
[models]
preload = []

[[backends]]
id = "gpu"
type = "vllm"
models = ["qwen-7b"]

[backends.options]
model = "Qwen/Qwen2.5-7B-Instruct"
executable = ["{sys.executable}", "{fake}"]
tensor_parallel_size = 1
"""
    node = start_node(tmp_path / "vllm-node", config)
    try:

        def vllm_ready() -> bool:
            backends = httpx.get(node.url + "/status", timeout=10).json()["manager"]["backends"]
            return any(b["id"] == "gpu" and b["status"] == "healthy" for b in backends)

        wait_for(vllm_ready, timeout=60)
        body = {"model": "qwen-7b", "messages": [{"role": "user", "content": "echo these four words"}]}
        response = httpx.post(node.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["x-backend-id"] == "gpu"
        assert response.json()["choices"][0]["message"]["content"] == "echo these four words"
    finally:
        assert node.stop() == 0
