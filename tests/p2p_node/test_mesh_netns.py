"""Real multi-host behaviour: nodes in separate network namespaces on one bridge find each
other by mDNS with no configuration, serve each other's models, and heal after a partition."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import TINY_CONFIG, wait_for
from tests.p2p_node import netns

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

TINY = "tiny-random-llama"
NO_LOCAL_CHAT = """
[models]
chat = {}
default_chat = "tiny-random-llama"
preload = []
"""


def peer_ids(node: netns.NetnsNode, with_models: bool = True) -> set[str]:
    return {p["peer_id"] for p in node.mesh()["peers"] if p["models"] or not with_models}


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[netns.NetnsNode]]:
    with netns.bridge_with_hosts(4) as hosts:
        base = tmp_path_factory.mktemp("lan")
        server = netns.start_node_in(hosts[0], base / "a", TINY_CONFIG)
        others = [netns.start_node_in(h, base / h.name, NO_LOCAL_CHAT) for h in hosts[1:3]]
        spare = netns.start_node_in(hosts[3], base / "spare", TINY_CONFIG)
        yield [server, *others, spare]


def test_nodes_find_each_other_by_mdns_without_configuration(lan: list[netns.NetnsNode]) -> None:
    ids = {node.mesh()["peer_id"] for node in lan}
    for node in lan:
        wait_for(lambda node=node: peer_ids(node, with_models=False) == ids - {node.mesh()["peer_id"]})


def test_a_model_only_another_host_serves_is_streamed_from_it(lan: list[netns.NetnsNode]) -> None:
    server, asker = lan[0], lan[1]
    server_id = server.mesh()["peer_id"]
    wait_for(lambda: server_id in peer_ids(asker))
    body = {"model": TINY, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0}
    with httpx.stream("POST", asker.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        serving_ids = {f"peer:{server_id}", f"peer:{lan[3].mesh()['peer_id']}"}
        assert r.headers["x-backend-id"] in serving_ids
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 3
    direct = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    through = httpx.post(asker.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert through["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]


def test_a_partitioned_host_is_forgotten_and_found_again_when_healed(lan: list[netns.NetnsNode]) -> None:
    server, cut = lan[0], lan[2]
    server_id, cut_id = server.mesh()["peer_id"], cut.mesh()["peer_id"]
    wait_for(lambda: server_id in peer_ids(cut))
    cut.host.link(up=False)
    try:
        wait_for(lambda: cut_id not in peer_ids(server, with_models=False), timeout=40)
    finally:
        cut.host.link(up=True)
    wait_for(lambda: server_id in peer_ids(cut) and cut_id in peer_ids(server, with_models=False), timeout=60)
    body = {"model": TINY, "messages": [{"role": "user", "content": "back?"}], "max_tokens": 4}
    assert httpx.post(cut.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_a_host_killed_mid_stream_is_replaced_and_the_answer_completes(lan: list[netns.NetnsNode]) -> None:
    import json

    asker = lan[1]
    servers = {node.mesh()["peer_id"]: node for node in (lan[0], lan[3])}
    wait_for(lambda: set(servers) <= peer_ids(asker))
    body = {"model": TINY, "messages": [{"role": "user", "content": "a long story"}], "max_tokens": 400}
    body.update(temperature=0, stream=True)
    texts: list[str] = []
    with httpx.stream("POST", asker.url + "/v1/chat/completions", json=body, timeout=120) as response:
        victim = servers.pop(response.headers["x-backend-id"].removeprefix("peer:"))
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    texts.append(event["choices"][0]["delta"]["content"])
                    if len(texts) == 20:
                        victim.kill()
    (survivor,) = servers.values()
    direct = httpx.post(survivor.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert "".join(texts) == direct["choices"][0]["message"]["content"]
