"""Models loaded on demand give their memory back when idle and load again when asked."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import start_node

CONFIG = """
[models]
default_chat = "tiny-random-llama"
chat = { "tiny-random-llama" = "builtin:tiny-random" }
preload = ["all-MiniLM-L6-v2"]
idle_unload = 1.5
"""


def loaded(url: str) -> dict[str, bool]:
    models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
    return {m["id"]: m["loaded"] for m in models if "owned_by" in m and m["owned_by"] != "alias"}


def ask(url: str) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_a_lazily_loaded_model_is_unloaded_when_idle_and_reloaded_on_demand(tmp_path: Path) -> None:
    node = start_node(tmp_path, CONFIG)
    try:
        assert loaded(node.url)["tiny-random-llama"] is False
        assert ask(node.url).status_code == 200
        assert loaded(node.url)["tiny-random-llama"] is True
        deadline = time.monotonic() + 20
        while loaded(node.url)["tiny-random-llama"]:
            assert time.monotonic() < deadline, "the idle model was never unloaded"
            time.sleep(0.25)
        assert loaded(node.url)["all-MiniLM-L6-v2"] is True  # preloaded models stay
        assert ask(node.url).status_code == 200
        assert loaded(node.url)["tiny-random-llama"] is True
    finally:
        node.stop()
