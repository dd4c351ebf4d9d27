"""A peer reached over several protocols: libp2p, and its HTTP API and WebSocket when its
advert says where they are and this node can reach them.

The libp2p protocol is always there (it is how the peer is known) and is the authority on
what the peer serves: its advert lists the peer's own models, while its HTTP API would also
offer what it reaches through its peers. HTTP and WebSocket requests carry the hops, so the
peer serves them itself and never forwards them back; they ask for token ids, so a failover
after them continues exactly (continuations themselves go over libp2p).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from backends.base import Backend
from backends.hybrid import HybridBackend
from backends.remote.openai_compat import OpenAIBackendSettings, OpenAICompatibleBackend
from backends.remote.websocket import WebSocketBackend, WebSocketBackendSettings
from backends.types import BackendType
from p2p_node.peering.peer_backend import MeshClient, PeerBackend

EXTRA_PROTOCOLS = ("http", "websocket")  # besides libp2p, which every peer has


@dataclass(frozen=True)
class ApiAddress:
    """Where a peer's HTTP API is, as this node can reach it."""

    base_url: str  # http://host:port, no trailing slash

    @property
    def websocket_url(self) -> str:
        return "ws" + self.base_url.removeprefix("http")


def reachable_api(advert: dict[str, Any], local_ips: list[str]) -> ApiAddress | None:
    """The peer's HTTP API as this node can reach it, or None: not advertised, behind API
    keys (peers hold none), or bound to loopback on another machine."""
    api = advert.get("api")
    if not isinstance(api, dict) or api.get("auth"):
        return None
    url = api.get("url")
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return ApiAddress(url.rstrip("/"))
    port = api.get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    peer_ips = _advertised_ips(advert)
    host = api.get("host")
    if isinstance(host, str) and host:
        if _is_loopback(host) and not _same_machine(peer_ips, local_ips):
            return None
        return ApiAddress(f"http://{_bracketed(host)}:{port}")
    chosen = _nearest_ip(peer_ips, local_ips)
    return None if chosen is None else ApiAddress(f"http://{_bracketed(chosen)}:{port}")


def _advertised_ips(advert: dict[str, Any]) -> list[str]:
    ips = []
    for addr in advert.get("addrs", []):
        parts = str(addr).split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            ips.append(parts[2])
    return list(dict.fromkeys(ips))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _same_machine(peer_ips: list[str], local_ips: list[str]) -> bool:
    return all(_is_loopback(ip) for ip in peer_ips) or bool(set(peer_ips) & set(local_ips))


def _nearest_ip(peer_ips: list[str], local_ips: list[str]) -> str | None:
    """An address of the peer on a network this node is on; a peer on this machine is
    reached over loopback."""
    if _same_machine(peer_ips, local_ips):
        return "127.0.0.1"
    for ip in peer_ips:
        if _is_loopback(ip):
            continue
        if any(_same_network(ip, mine) for mine in local_ips):
            return ip
    return next((ip for ip in peer_ips if not _is_loopback(ip)), None)


def _same_network(a: str, b: str) -> bool:
    try:
        first, second = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    if first.version != second.version:
        return False
    prefix = 24 if first.version == 4 else 64
    return ipaddress.ip_network(f"{a}/{prefix}", strict=False) == ipaddress.ip_network(f"{b}/{prefix}", strict=False)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class PeerHybrid(HybridBackend):
    """One peer, registered once, over libp2p plus its HTTP API and WebSocket. It shows as a
    P2P backend (a peer is a peer, whichever protocol a request takes); its protocols are in
    its details."""

    backend_type = BackendType.P2P

    def __init__(self, peer: PeerBackend, extra: list[Backend], api: ApiAddress) -> None:
        super().__init__(f"peer:{peer.peer_id}", [peer, *extra], name=peer.name, capabilities_from=peer)
        self.peer = peer
        self.peer_id = peer.peer_id
        self.api = api

    def update(self, advert: dict[str, Any], rtt_s: float | None, connected: bool) -> None:
        self.peer.update(advert, rtt_s, connected)
        self.status = self._combined_status()

    def describe(self) -> dict[str, object]:
        return {**self.peer.describe(), "api": self.api.base_url, **super().describe()}


def build_peer_backend(
    mesh: MeshClient,
    peer_id: str,
    advert: dict[str, Any],
    rtt_s: float | None,
    protocols: tuple[str, ...],
    local_ips: list[str],
) -> PeerBackend | PeerHybrid:
    """The backend for a peer: a PeerHybrid when it can be reached over more than libp2p."""
    api = reachable_api(advert, local_ips) if protocols else None
    offered = advert["api"].get("protocols", EXTRA_PROTOCOLS) if api is not None else ()
    wanted = set(protocols) & set(offered)
    if api is None or not wanted:
        return PeerBackend(mesh, peer_id, advert, rtt_s)
    backend_id = f"peer:{peer_id}"
    peer = PeerBackend(mesh, peer_id, advert, rtt_s, backend_id=f"{backend_id}/libp2p")
    extra: list[Backend] = []
    if "http" in wanted:
        extra.append(
            OpenAICompatibleBackend(
                OpenAIBackendSettings(
                    backend_id=f"{backend_id}/http",
                    base_url=f"{api.base_url}/v1",
                    return_token_ids=True,
                    mesh_hop=mesh.peer_id,
                )
            )
        )
    if "websocket" in wanted:
        extra.append(
            WebSocketBackend(
                WebSocketBackendSettings(
                    backend_id=f"{backend_id}/websocket", url=api.websocket_url, mesh_hop=mesh.peer_id
                )
            )
        )
    return PeerHybrid(peer, extra, api)
