"""Identifying the inference servers running on this machine by what they answer."""

from __future__ import annotations

from urllib.parse import urlsplit

import trio

from backends.discovery import discover
from tests.backends.remote.openai_standin import OpenAIStandin
from tests.backends.remote.standins import OllamaStandIn, TEIStandIn
from tests.conftest import free_port


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


async def test_each_kind_of_server_is_identified_and_empty_ports_are_skipped(nursery: trio.Nursery) -> None:
    ollama, tei = OllamaStandIn(), TEIStandIn()
    vllm = OpenAIStandin(models=[{"id": "meta-llama/Llama-3.1-8B-Instruct", "owned_by": "vllm"}])
    plain = OpenAIStandin()
    for standin in (ollama, tei):
        await nursery.start(standin.serve)
    await nursery.start(vllm.serve)
    await nursery.start(plain.serve)
    nobody = free_port()
    ports = (port_of(ollama.url), port_of(tei.url), port_of(vllm.url), nobody, port_of(plain.url))

    found = await discover(ports=ports, timeout_s=2)

    assert [(s.kind, s.port) for s in found] == [
        ("ollama", ports[0]),
        ("tei", ports[1]),
        ("vllm-server", ports[2]),
        ("openai", ports[4]),
    ]
    assert found[0].url == ollama.url.rstrip("/") and found[0].models
    assert found[2].url.endswith("/v1") and found[2].models == ("meta-llama/Llama-3.1-8B-Instruct",)


async def test_skipped_ports_are_not_probed(nursery: trio.Nursery) -> None:
    plain = OpenAIStandin()
    await nursery.start(plain.serve)
    port = port_of(plain.url)
    assert await discover(ports=(port,), skip_ports=frozenset({port})) == []
    assert plain.requests == []
