"""A multi-host test bed on one machine: network namespaces on a bridge, multicast routed.

Each "host" is a namespace with one veth into a shared bridge; the test process reaches
nodes through an address the bridge itself holds. Everything created is removed on exit,
even when the test fails. Needs root and iproute2 (CI has both); callers skip otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT, node_env

MULTICAST = "224.0.0.0/4"  # mDNS sends to 224.0.0.251: without a route they fail


def available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"p2pt-probe-{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Host:
    name: str
    address: str
    veth: str  # the end inside the namespace
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def link(self, up: bool) -> None:
        ip("-n", self.name, "link", "set", self.veth, "up" if up else "down")
        if up:
            # Setting a link down flushes its routes; up restores only the subnet's. Without
            # the multicast route the healed host could no longer send mDNS.
            ip("-n", self.name, "route", "replace", MULTICAST, "dev", self.veth)


@dataclass
class NetnsNode:
    host: Host
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def mesh(self) -> dict:  # type: ignore[type-arg]
        return httpx.get(self.url + "/status", timeout=5).json()["mesh"]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


@contextmanager
def bridge_with_hosts(count: int) -> Iterator[list[Host]]:
    tag = uuid.uuid4().hex[:5]
    bridge = f"p2pbr{tag}"
    subnet = f"10.{77 + int(tag[:2], 16) % 100}.{int(tag[2:4], 16)}"
    hosts = [Host(f"p2pt{tag}{i}", f"{subnet}.{i + 1}", f"e{tag}{i}") for i in range(count)]
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{subnet}.254/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i, host in enumerate(hosts):
            outer = f"v{tag}{i}"
            ip("netns", "add", host.name)
            ip("link", "add", outer, "type", "veth", "peer", "name", host.veth)
            ip("link", "set", outer, "master", bridge, "up")
            ip("link", "set", host.veth, "netns", host.name)
            ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.veth)
            ip("-n", host.name, "link", "set", host.veth, "up")
            ip("-n", host.name, "link", "set", "lo", "up")
            ip("-n", host.name, "route", "add", MULTICAST, "dev", host.veth)
        yield hosts
    finally:
        for host in hosts:
            for process in host.processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(10)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def start_node_in(host: Host, workdir: Path, config: str, port: int = 8000, timeout: float = 120.0) -> NetnsNode:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "node.toml").write_text(config)
    log_path = workdir / "node.log"
    env = node_env(
        {
            "P2P_NODE_IDENTITY_KEY": str(workdir / "identity.key"),
            "LIBP2P_ENABLE_MDNS": "true",
            "P2P_NODE_MESH_LISTEN": "/ip4/0.0.0.0/tcp/4001",
            "P2P_NODE_DISCOVERY": "false",
        }
    )
    command = ["ip", "netns", "exec", host.name, sys.executable, "-m", "p2p_node", "start"]
    command += ["--config", str(workdir / "node.toml"), "--host", "0.0.0.0", "--port", str(port)]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    host.processes.append(process)
    node = NetnsNode(host, f"http://{host.address}:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"node in {host.name} exited:\n{node.log()}")
        try:
            if httpx.get(node.url + "/ready", timeout=2).status_code == 200:
                return node
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"node in {host.name} not ready after {timeout}s:\n{node.log()}")
        time.sleep(0.2)
