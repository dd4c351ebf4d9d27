"""Shared fixtures: real node processes on loopback ports.

Node processes run `python -m p2p_node start` exactly as a user would, with a TOML
config written per test session; tests talk to them over real sockets with the
official clients.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Never reach for a model hub, in this process or in the nodes it starts.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
os.environ.update(OFFLINE_ENV)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class NodeProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    from p2p_node.config import ENV_VARIABLES

    # The node reads these: whatever the developer's shell has set must not leak into tests.
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES and not k.startswith("P2P_NODE_")}
    env.update(OFFLINE_ENV)
    env["PYTHONPATH"] = str(REPO_ROOT)
    # Test nodes meet only the peers a test introduces: loopback, no mDNS (the mDNS tests
    # run in network namespaces and turn it back on).
    env["LIBP2P_ENABLE_MDNS"] = "false"
    env["P2P_NODE_MESH_LISTEN"] = "/ip4/127.0.0.1/tcp/0"
    env.update(extra or {})
    return env


def start_node(
    workdir: Path,
    config_toml: str = "",
    *,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 180.0,
    port: int | None = None,
) -> NodeProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config_path = workdir / "node.toml"
    config_path.write_text(config_toml)
    log_path = workdir / "node.log"
    # Each node its own identity (a shared key would make every test node the same peer).
    node_vars = {"P2P_NODE_IDENTITY_KEY": str(workdir / "identity.key"), **(env or {})}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "p2p_node", "start", "--config", str(config_path), "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=node_env(node_vars),
            cwd=workdir,
        )
    node = NodeProcess(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    probe = "/ready" if wait_ready else "/health"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode} before serving:\n{node.log()}")
        try:
            if httpx.get(node.url + probe, timeout=2).status_code == 200:
                return node
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            node.stop(signal.SIGKILL)
            raise RuntimeError(f"node not ready after {timeout}s:\n{node.log()}")
        time.sleep(0.2)


def wait_for(predicate: Callable[[], object], timeout: float = 60.0) -> float:
    """Polls `predicate` until it is true; fails the test after `timeout` seconds. Returns
    how long it took (for the tests that report discovery times)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.1)
    return time.monotonic() - started


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Waits, inside trio, until `predicate()` holds; fails the test after `timeout` seconds.
    Polling is the point: it observes state other components own and signal nothing about
    (libp2p's tasks, process deaths, counters)."""
    import trio

    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


TINY_CONFIG = """
[models]
default_chat = "tiny-random-llama"
chat = { "tiny-random-llama" = "builtin:tiny-random" }
preload = ["tiny-random-llama"]
aliases = { "qwen-coder-1.5b" = "tiny-random-llama" }
default_max_tokens = 16

[batching]
max_batch_size = 8
batch_timeout_ms = 20
"""


@pytest.fixture(scope="session")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node on its embedded defaults: SmolLM2 chat, MiniLM embeddings and rerank."""
    node = start_node(tmp_path_factory.mktemp("real-node"))
    yield node
    node.stop()


@pytest.fixture(scope="session")
def tiny_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node whose chat model is the tiny random Llama: for plumbing, never for quality."""
    node = start_node(tmp_path_factory.mktemp("tiny-node"), TINY_CONFIG)
    yield node
    node.stop()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2 checkpoint (install.sh prepares it; this is a no-op then)."""
    from backends.local._models import prepare_smollm2

    return prepare_smollm2(Path("~/.cache/p2p-node/models").expanduser())
