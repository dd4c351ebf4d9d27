"""LAN discovery over mDNS, with python-zeroconf (not libp2p's built-in one, which binds
every interface and only fills the peerstore).

Each node registers `<peer id>._p2p-node._tcp.local.` with its libp2p TCP port, its IPv4
addresses and its peer id in a TXT record, and browses for the others; a found peer is
handed to `on_found` as dialable multiaddrs. Zeroconf works on its own threads: results
cross into trio through the trio token. Registration skips name probing (the name is our
peer id: unique) but still waits for its broadcasts, so it runs in a worker thread.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

import ifaddr
import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2p-node._tcp.local."


def interface_addresses(interfaces: list[str] | None = None, include_loopback: bool = False) -> list[str]:
    """IPv4 addresses of the named interfaces (all, if none named)."""
    found = []
    for adapter in ifaddr.get_adapters():
        if interfaces and adapter.nice_name not in interfaces and adapter.name not in interfaces:
            continue
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and (include_loopback or not ip.ip.startswith("127.")):
                found.append(ip.ip)
    return found


class MdnsDiscovery:
    def __init__(
        self, peer_id: str, tcp_port: int, on_found: Callable[[list[str]], None], interfaces: list[str] | None = None
    ) -> None:
        self.peer_id = peer_id
        self.tcp_port = tcp_port
        self.on_found = on_found
        self.interfaces = interfaces or []
        self.found: set[str] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        addresses = interface_addresses(self.interfaces)
        if self.interfaces and not addresses:
            raise ValueError(f"no IPv4 address on the mDNS interfaces {self.interfaces}")
        token = trio.lowlevel.current_trio_token()
        zc = await trio.to_thread.run_sync(self._open, addresses)
        try:
            info = ServiceInfo(
                SERVICE_TYPE,
                f"{self.peer_id}.{SERVICE_TYPE}",
                port=self.tcp_port,
                addresses=[socket.inet_aton(a) for a in addresses],
                properties={"peer_id": self.peer_id},
            )
            # Browse first: finding the others needn't wait for our own announcement.
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._handler(token)])
            # The name holds our peer id, so no other node can own it: skip the ~1.5 s of
            # conflict probing (RFC 6762 §8.1) and answer queries at once.
            await trio.to_thread.run_sync(partial(zc.register_service, info, cooperating_responders=True))
            log.info("mDNS: announcing %s on %s", self.peer_id, ", ".join(addresses) or "all interfaces")
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                browser.cancel()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(zc.unregister_service, info)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(zc.close)

    def _open(self, addresses: list[str]) -> Zeroconf:
        if self.interfaces:
            return Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        return Zeroconf(ip_version=IPVersion.V4Only)

    def _handler(self, token: trio.lowlevel.TrioToken) -> Callable[..., None]:
        def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
                return
            info = zeroconf.get_service_info(service_type, name, timeout=3000)
            if info is None:
                return
            peer = _text(info.properties.get(b"peer_id"))
            if not peer or peer == self.peer_id:
                return
            addrs = [f"/ip4/{ip}/tcp/{info.port}/p2p/{peer}" for ip in info.parsed_addresses(IPVersion.V4Only)]
            if addrs:
                try:
                    trio.from_thread.run_sync(self._found, peer, addrs, trio_token=token)
                except trio.RunFinishedError:
                    pass

        return on_change

    def _found(self, peer: str, addrs: list[str]) -> None:
        if peer not in self.found:
            log.info("mDNS: found peer %s at %s", peer, ", ".join(addrs))
        self.found.add(peer)
        self.on_found(addrs)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ""
