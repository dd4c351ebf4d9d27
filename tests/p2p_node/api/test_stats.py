"""`GET /admin/stats` and `GET /v1/status` on a real node: loaded models, memory, cache state.

(GPU memory is checked in test_deployment.py, on a node given a stand-in nvidia-smi.)
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import httpx

from tests.conftest import NodeProcess

TINY = "tiny-random-llama"
MINILM = "all-MiniLM-L6-v2"


def stats(node: NodeProcess, path: str = "/admin/stats") -> dict[str, Any]:
    response = httpx.get(node.url + path, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def local_cache(body: dict[str, Any]) -> dict[str, Any]:
    (cache,) = [c for c in body["cache"]["backends"] if c["backend"] == "local"]
    return cache


def test_stats_list_the_loaded_models_and_the_model_cache(tiny_node: NodeProcess) -> None:
    body = stats(tiny_node)
    assert body["status"] == "ok"
    tiny = [m for m in body["loaded_models"] if m["id"] == TINY]
    assert tiny == [{"id": TINY, "tasks": ["chat", "completion"], "backend": "local", "backend_type": "local"}]
    cache = local_cache(body)
    assert cache["policy"] == "lru" and cache["max_size"] == 3 and cache["device"] == "cpu"
    assert TINY in cache["models"] and cache["size"] == len(cache["models"])
    # What /v1/models says is loaded is what the stats say is loaded.
    listed = httpx.get(tiny_node.url + "/v1/models", timeout=30).json()["data"]
    loaded_ids = {m["id"] for m in listed if m["loaded"] and m.get("owned_by") != "alias"}
    assert loaded_ids == {m["id"] for m in body["loaded_models"]}
    assert body["model_counts"]["loaded"] == len(loaded_ids)


def test_the_cache_shows_models_in_least_recently_used_order(tiny_node: NodeProcess) -> None:
    embedded = httpx.post(tiny_node.url + "/v1/embeddings", json={"input": ["warm the encoder"]}, timeout=120)
    assert embedded.status_code == 200, embedded.text
    cache = local_cache(stats(tiny_node))
    assert cache["models"][-1] == MINILM and TINY in cache["models"]
    chat = httpx.post(
        tiny_node.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    cache = local_cache(stats(tiny_node))
    assert cache["models"][-1] == TINY and cache["models"].index(MINILM) < cache["models"].index(TINY)
    assert MINILM in {m["id"] for m in stats(tiny_node)["loaded_models"]}


def test_an_unloaded_model_leaves_the_stats_and_comes_back_when_used(tiny_node: NodeProcess) -> None:
    httpx.post(tiny_node.url + "/v1/embeddings", json={"input": ["load it"]}, timeout=120).raise_for_status()
    try:
        httpx.post(tiny_node.url + "/models/unload", json={"model": MINILM}, timeout=60).raise_for_status()
        body = stats(tiny_node)
        assert MINILM not in local_cache(body)["models"]
        assert MINILM not in {m["id"] for m in body["loaded_models"]}
    finally:
        httpx.post(tiny_node.url + "/v1/embeddings", json={"input": ["reload it"]}, timeout=120).raise_for_status()
    assert MINILM in local_cache(stats(tiny_node))["models"]


def test_memory_in_use_is_the_processes_resident_set_and_the_machines_ram(tiny_node: NodeProcess) -> None:
    memory = stats(tiny_node)["memory"]
    system = memory["system"]
    assert system["total_bytes"] > system["available_bytes"] > 0
    # A node with torch and a model loaded holds well over 100 MB, and less than the machine.
    assert 100 * 1024 * 1024 < memory["process_rss_bytes"] < system["total_bytes"]
    if shutil.which("nvidia-smi") is None:
        assert memory["gpu_available"] is False and memory["gpu"] == []


def test_v1_status_is_the_node_report_with_models_memory_and_cache(tiny_node: NodeProcess) -> None:
    body = stats(tiny_node, "/v1/status")
    assert {"node", "manager", "mesh"} <= set(body)  # everything /status reports
    assert body["status"] == "ok"
    assert TINY in {m["id"] for m in body["loaded_models"]}
    assert body["memory"]["process_rss_bytes"] > 0 and TINY in local_cache(body)["models"]
    assert body["requests"] == {"pending": 0, "max_pending": body["manager"]["max_pending_requests"]}


def test_text_logs_carry_the_request_id(tiny_node: NodeProcess) -> None:
    httpx.get(tiny_node.url + "/admin/stats", headers={"X-Request-Id": "plain-text-77"}, timeout=30)
    deadline = time.monotonic() + 10
    while "plain-text-77" not in tiny_node.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    (line,) = [line for line in tiny_node.log().splitlines() if "plain-text-77" in line]
    assert not line.startswith("{")
    assert "p2p_node.access: GET /admin/stats 200" in line and line.endswith("[request_id=plain-text-77]")
