"""Finding inference servers already running on this machine.

At start the node probes the ports the usual servers listen on and identifies what
answers, by the endpoints only that server has:

* Ollama: `GET /api/tags` lists models;
* TEI: `GET /info` has `model_type` (an embedding or reranker model);
* TGI: `GET /info` has `model_id` and `max_total_tokens` but no `model_type`;
* anything else answering `GET /v1/models` speaks the OpenAI API: vLLM (`owned_by: vllm`),
  llama.cpp (`owned_by: llamacpp`), LocalAI, text-generation-webui, another p2p-node.

Probes run concurrently with a short timeout; a port nobody listens on costs one refused
connection. Nothing here registers anything: the composition root decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx
import trio

log = logging.getLogger(__name__)

# (port, hint) — the defaults of Ollama, vLLM, llama.cpp/TGI, text-generation-webui, TEI.
DEFAULT_PORTS: tuple[int, ...] = (11434, 8000, 8001, 8080, 5000, 3000)


@dataclass(frozen=True)
class DiscoveredServer:
    kind: str  # ollama | tei | tgi | vllm-server | llamacpp | p2p-node | openai
    port: int
    url: str  # base URL as the matching backend expects it (OpenAI ones include /v1)
    models: tuple[str, ...]


async def discover(
    host: str = "127.0.0.1",
    ports: tuple[int, ...] = DEFAULT_PORTS,
    skip_ports: frozenset[int] = frozenset(),
    timeout_s: float = 1.0,
) -> list[DiscoveredServer]:
    found: dict[int, DiscoveredServer] = {}
    async with httpx.AsyncClient(timeout=timeout_s) as client:

        async def probe_one(port: int) -> None:
            server = await probe(client, host, port)
            if server is not None:
                found[port] = server

        async with trio.open_nursery() as nursery:
            for port in ports:
                if port not in skip_ports:
                    nursery.start_soon(probe_one, port)
    servers = [found[port] for port in ports if port in found]
    for server in servers:
        log.info("discovered %s at %s serving %s", server.kind, server.url, ", ".join(server.models) or "no models")
    return servers


async def probe(client: httpx.AsyncClient, host: str, port: int) -> DiscoveredServer | None:
    """Identify the server at host:port, or None if nothing (we know) answers there."""
    base = f"http://{host}:{port}"
    try:
        tags = await client.get(f"{base}/api/tags")
        if tags.status_code == 200 and isinstance(tags.json().get("models"), list):
            names = tuple(str(m.get("name") or m.get("model")) for m in tags.json()["models"])
            return DiscoveredServer("ollama", port, base, names)
        info = await client.get(f"{base}/info")
        if info.status_code == 200 and isinstance(info.json(), dict):
            body = info.json()
            if "model_type" in body:
                return DiscoveredServer("tei", port, base, (str(body.get("model_id", "")),))
            if "max_total_tokens" in body and "model_id" in body:
                return DiscoveredServer("tgi", port, f"{base}/v1", (str(body["model_id"]),))
        models = await client.get(f"{base}/v1/models")
        if models.status_code == 200 and isinstance(models.json().get("data"), list):
            data = models.json()["data"]
            owners = {str(m.get("owned_by", "")) for m in data}
            kind = "vllm-server" if "vllm" in owners else "llamacpp" if "llamacpp" in owners else "openai"
            if (await client.get(f"{base}/v1/health/inference")).status_code == 200:
                kind = "p2p-node"
            return DiscoveredServer(kind, port, f"{base}/v1", tuple(str(m["id"]) for m in data))
    except (httpx.HTTPError, ValueError, AttributeError, KeyError, TypeError):
        return None
    return None
