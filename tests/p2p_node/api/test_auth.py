"""With API keys configured, every surface but liveness/readiness needs one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import NodeProcess, start_node

KEY = "sk-node-test-1"


@pytest.fixture(scope="module")
def locked_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = start_node(
        tmp_path_factory.mktemp("locked"),
        "[models]\npreload = ['all-MiniLM-L6-v2']\n",
        env={"P2P_NODE_API_KEYS": f"other-key,{KEY}"},
    )
    yield node
    node.stop()


def test_the_openai_client_with_the_key_is_served(locked_node: NodeProcess) -> None:
    client = openai.OpenAI(base_url=locked_node.url + "/v1", api_key=KEY, max_retries=0)
    assert len(client.embeddings.create(input="hello", model="").data[0].embedding) == 384


def test_without_a_key_the_request_is_refused_with_an_openai_error(locked_node: NodeProcess) -> None:
    response = httpx.post(locked_node.url + "/v1/embeddings", json={"input": "hello"}, timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_with_a_wrong_key_the_client_gets_an_authentication_error(locked_node: NodeProcess) -> None:
    client = openai.OpenAI(base_url=locked_node.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_x_api_key_header_is_accepted_and_probes_stay_open(locked_node: NodeProcess) -> None:
    assert httpx.get(locked_node.url + "/status", headers={"x-api-key": KEY}, timeout=10).status_code == 200
    assert httpx.get(locked_node.url + "/status", timeout=10).status_code == 401
    assert httpx.get(locked_node.url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(locked_node.url + "/health", timeout=10).status_code == 200
    assert httpx.get(locked_node.url + "/ready", timeout=10).status_code == 200


def test_the_effective_configuration_log_never_shows_the_keys(locked_node: NodeProcess, tmp_path: Path) -> None:
    log = locked_node.log()
    assert "effective configuration" in log
    assert KEY not in log and "other-key" not in log
