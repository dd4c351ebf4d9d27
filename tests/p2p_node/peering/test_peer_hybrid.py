"""Which of a peer's protocols this node can use, from the peer's advert alone."""

from __future__ import annotations

from typing import Any

from p2p_node.peering.peer_backend import PeerBackend
from p2p_node.peering.peer_hybrid import ApiAddress, PeerHybrid, build_peer_backend, reachable_api

LAN_PEER = ["/ip4/192.168.1.20/tcp/4001/p2p/Qm", "/ip4/10.9.0.3/tcp/4001/p2p/Qm", "/ip4/127.0.0.1/tcp/4001/p2p/Qm"]
LOOPBACK_PEER = ["/ip4/127.0.0.1/tcp/4001/p2p/Qm"]
MY_IPS = ["192.168.1.5"]


def advert(addrs: list[str], **api: Any) -> dict[str, Any]:
    return {"addrs": addrs, "models": [{"id": "m", "task": "chat"}], "api": {"port": 8000, **api}}


class Mesh:
    peer_id = "QmSelf"

    def open_inference(self, peer: str, request: dict[str, Any]) -> Any:
        raise AssertionError("not called here")


def test_an_api_on_every_interface_is_reached_at_the_peers_address_on_our_network() -> None:
    assert reachable_api(advert(LAN_PEER), MY_IPS) == ApiAddress("http://192.168.1.20:8000")


def test_a_peer_on_this_machine_is_reached_over_loopback() -> None:
    assert reachable_api(advert(LOOPBACK_PEER, host="127.0.0.1"), MY_IPS) == ApiAddress("http://127.0.0.1:8000")
    assert reachable_api(advert(LAN_PEER), ["192.168.1.20"]) == ApiAddress("http://127.0.0.1:8000")


def test_an_api_bound_to_loopback_on_another_machine_is_not_used() -> None:
    assert reachable_api(advert(LAN_PEER, host="127.0.0.1"), MY_IPS) is None


def test_an_api_behind_keys_is_not_used_and_a_public_url_wins() -> None:
    assert reachable_api(advert(LAN_PEER, auth=True), MY_IPS) is None
    public = advert(LAN_PEER, url="https://node-b.example.org/")
    assert reachable_api(public, MY_IPS) == ApiAddress("https://node-b.example.org")
    assert ApiAddress("https://node-b.example.org").websocket_url == "wss://node-b.example.org"


def test_a_peer_without_a_reachable_api_is_a_plain_libp2p_peer() -> None:
    no_api = {"addrs": LAN_PEER, "models": []}
    assert isinstance(build_peer_backend(Mesh(), "QmB", no_api, None, ("http",), MY_IPS), PeerBackend)
    assert isinstance(build_peer_backend(Mesh(), "QmB", advert(LAN_PEER), None, (), MY_IPS), PeerBackend)
    malformed = {"addrs": LAN_PEER, "models": [], "api": {"port": "eighty"}}
    assert isinstance(build_peer_backend(Mesh(), "QmB", malformed, None, ("http",), MY_IPS), PeerBackend)


def test_a_reachable_peer_is_one_backend_over_the_protocols_both_sides_allow() -> None:
    backend = build_peer_backend(
        Mesh(), "QmB", advert(LAN_PEER, protocols=["http", "websocket"]), 0.002, ("websocket",), MY_IPS
    )
    assert isinstance(backend, PeerHybrid)
    assert backend.id == "peer:QmB" and backend.is_peer
    assert [child.id for child in backend.children] == ["peer:QmB/libp2p", "peer:QmB/websocket"]
    assert {card.id for card in backend.capabilities.models} == {"m"}  # from the advert, not the API
