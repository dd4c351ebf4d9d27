"""What a deployed node shows its operators: versions added to the model registry in its
config file, seed 004's DEFAULT_MODEL from the environment, GPU memory in its stats, and
structured JSON logs (or plain text) that carry each request's id.

The deployed node runs the tiny random model. There is no GPU here, so a stand-in
`nvidia-smi` on the node's PATH answers the exact query the node makes
(`--query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits`) in
nvidia-smi's CSV format, and fails on any other arguments.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_CONFIG, NodeProcess, start_node

pytestmark = pytest.mark.slow  # a node of its own: ~20 s to start on a busy machine

TINY = "tiny-random-llama"
GPU_NAME = "NVIDIA H100 80GB HBM3"
GPU_TOTAL_MIB = 81559
GPU_USED_MIB = 20480
MIB = 1024 * 1024

REGISTRY_CONFIG = """
[registry.models.summarizer]
default_version = "v2"
versions.v2 = { kind = "summarize", parameters = { max_length = 3 }, description = "terse" }

[registry.models.echo]
versions.v1 = { kind = "chat", model = "qwen-coder-1.5b", parameters = { max_tokens = 2, temperature = 0.0 } }
versions.v3 = { kind = "chat", parameters = { max_tokens = 4, temperature = 0.0 } }
versions.v10 = { kind = "generate", parameters = { max_length = 5, temperature = 0.0 } }
"""

FAKE_NVIDIA_SMI = f"""#!/bin/sh
if [ "$1" = "--query-gpu=name,memory.total,memory.used" ] && [ "$2" = "--format=csv,noheader,nounits" ] && [ $# -eq 2 ]
then
    echo "{GPU_NAME}, {GPU_TOTAL_MIB}, {GPU_USED_MIB}"
    exit 0
fi
echo "nvidia-smi stand-in: unexpected arguments: $*" >&2
exit 2
"""


@pytest.fixture(scope="module")
def deployed_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("deployed-node")
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(0o755)
    env = {
        "P2P_NODE_LOG_FORMAT": "json",
        "DEFAULT_MODEL": "generator",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    node = start_node(Path(workdir), TINY_CONFIG + REGISTRY_CONFIG, env=env)
    yield node
    node.stop()


def infer(node: NodeProcess, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(node.url + "/infer", json=body, headers=headers, timeout=120)


def log_records(node: NodeProcess, request_id: str, deadline_s: float = 10.0) -> list[dict[str, Any]]:
    """The node's JSON log records carrying `request_id` (waiting briefly for the access line)."""
    deadline = time.monotonic() + deadline_s
    while True:
        records = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
        found = [r for r in records if r.get("request_id") == request_id]
        if any(r["logger"] == "p2p_node.access" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# ---- the registry from the config file and the environment ----------------------------------


def test_configured_versions_live_beside_the_builtin_ones(deployed_node: NodeProcess) -> None:
    models = {m["name"]: m for m in httpx.get(deployed_node.url + "/models", timeout=30).json()["models"]}
    assert models["summarizer"]["default_version"] == "v2"
    assert [v["version"] for v in models["summarizer"]["versions"]] == ["v1", "v2"]
    # With no default configured the latest version is the default, in natural order.
    assert models["echo"]["default_version"] == "v10"
    assert [v["version"] for v in models["echo"]["versions"]] == ["v1", "v3", "v10"]
    echo_v1 = models["echo"]["versions"][0]
    assert echo_v1["model_id"] == TINY and echo_v1["kind"] == "chat"  # qwen-coder-1.5b is an alias of it

    v2 = infer(deployed_node, {"text": "A long text to summarize.", "model": "summarizer"}).json()
    assert v2["model_used"] == "summarizer:v2" and v2["metadata"]["usage"]["completion_tokens"] <= 3
    assert v2["metadata"]["parameters"] == {"max_length": 3}
    v1 = infer(
        deployed_node, {"text": "Text.", "model": "summarizer", "version": "v1", "parameters": {"max_length": 5}}
    )
    assert v1.json()["model_used"] == "summarizer:v1"
    # A request's parameters go over the version's.
    echo = infer(deployed_node, {"text": "hi", "model": "echo", "version": "v1", "parameters": {"max_tokens": 1}})
    assert echo.json()["metadata"]["usage"]["completion_tokens"] == 1
    assert echo.json()["metadata"]["parameters"] == {"max_tokens": 1, "temperature": 0.0}


def test_default_model_comes_from_the_environment(deployed_node: NodeProcess) -> None:
    body = infer(deployed_node, {"text": "Tell me", "parameters": {"max_length": 2}}).json()
    assert body["model_used"] == "generator:v1"
    assert httpx.get(deployed_node.url + "/models", timeout=30).json()["default_model"] == "generator"


# ---- GPU memory -------------------------------------------------------------------------------


def test_stats_report_gpu_memory_from_nvidia_smi(deployed_node: NodeProcess) -> None:
    for path in ("/admin/stats", "/v1/status"):
        memory = httpx.get(deployed_node.url + path, timeout=30).json()["memory"]
        assert memory["gpu_available"] is True
        assert memory["gpu"] == [
            {"index": 0, "name": GPU_NAME, "total_bytes": GPU_TOTAL_MIB * MIB, "used_bytes": GPU_USED_MIB * MIB}
        ]
    assert "unexpected arguments" not in deployed_node.log()


# ---- logs -------------------------------------------------------------------------------------


def test_json_logs_carry_the_clients_request_id(deployed_node: NodeProcess) -> None:
    response = infer(
        deployed_node,
        {"text": "Trace me", "model": "generator", "parameters": {"max_length": 2}},
        **{"X-Request-Id": "trace-4242"},
    )
    assert response.headers["x-request-id"] == "trace-4242" == response.json()["request_id"]
    records = log_records(deployed_node, "trace-4242")
    access = [r for r in records if r["logger"] == "p2p_node.access"]
    assert len(access) == 1
    assert access[0]["method"] == "POST" and access[0]["path"] == "/infer" and access[0]["status"] == 200
    assert access[0]["duration_ms"] > 0 and access[0]["level"] == "INFO"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", access[0]["ts"])
    inferred = [r for r in records if r.get("model_used") == "generator:v1"]
    assert len(inferred) == 1 and inferred[0]["latency_ms"] > 0


def test_every_log_line_is_one_json_object(deployed_node: NodeProcess) -> None:
    httpx.get(deployed_node.url + "/v1/status", timeout=30)
    lines = [line for line in deployed_node.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)
        assert {"ts", "level", "logger", "message"} <= set(record), line


def test_a_request_without_a_usable_id_gets_a_fresh_one(deployed_node: NodeProcess) -> None:
    plain = httpx.get(deployed_node.url + "/models", timeout=30)
    minted = plain.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", minted)
    assert log_records(deployed_node, minted)
    # An id that would smuggle spaces (or a newline) into the logs is replaced, not echoed.
    hostile = httpx.get(deployed_node.url + "/models", headers={"X-Request-Id": "x y\tz"}, timeout=30)
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])
    too_long = httpx.get(deployed_node.url + "/models", headers={"X-Request-Id": "a" * 200}, timeout=30)
    assert too_long.headers["x-request-id"] != "a" * 200


def test_refused_requests_are_logged_with_their_id_too(deployed_node: NodeProcess) -> None:
    response = infer(deployed_node, {"text": "x", "model": "nope"}, **{"X-Request-Id": "refused-1"})
    assert response.status_code == 404
    access = [r for r in log_records(deployed_node, "refused-1") if r["logger"] == "p2p_node.access"]
    assert access and access[0]["status"] == 404
