"""MCP tool-call latency: what an agent pays per call, against the same work over plain HTTP.

    .venv/bin/python benchmarks/mcp_calls.py            # 300 calls per path, ~2 minutes
    .venv/bin/python benchmarks/mcp_calls.py --quick    # 60 calls per path

Starts one real node process (`python -m p2p_node start`, the tiny random-weight chat model
preloaded, discovery and mesh off) and, for `--stdio`, one `p2p-node mcp` process with the
same configuration. One client process (trio) then measures, sequentially, in interleaved
blocks so that noise on this shared machine lands on every path alike:

- status: `GET /v1/models` over HTTP (keep-alive httpx) against the `list_models` tool over
  streamable HTTP (`mcp.Client`, one session) and over stdio;
- inference: `POST /v1/chat/completions` (1 token, temperature 0) against
  `route_inference_request` with the same request, over streamable HTTP and stdio;
- session set-up: connecting a new `mcp.Client` over HTTP (its protocol negotiation), one
  `list_peers` call, and closing the session, which an agent host pays once per server.

Prints one markdown table: p50/p90/p99 in ms, the ratio of p50s to the HTTP baseline, and the
CPU time the client process spent per call (the rest of a call is the server and the wait).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import trio

from mcp import Client, StdioServerParameters

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCK = 20  # calls per path before moving to the next
WARM_UP = 30  # calls per path before measuring

CONFIG = """
[models]
default_chat = "tiny-random-llama"
chat = { "tiny-random-llama" = "builtin:tiny-random" }
preload = ["tiny-random-llama"]
[discovery]
enabled = false
[mesh]
enabled = false
[logging]
level = "WARNING"
"""
MESSAGES = [{"role": "user", "content": "Say hi."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2P_NODE_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)})
    return env


@contextmanager
def running_node(workdir: Path) -> Iterator[str]:
    port = free_port()
    config = workdir / "node.toml"
    config.write_text(CONFIG)
    with (workdir / "node.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "p2p_node", "start", "--config", str(config), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=node_env(),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"node exited: {(workdir / 'node.log').read_text()}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("node not ready after 300 s")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def stdio_params(workdir: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "p2p_node", "mcp", "--config", str(workdir / "node.toml")],
        env=node_env(),
        cwd=workdir,
    )


Call = Callable[[], Awaitable[None]]


async def timed(samples: dict[str, list[float]], cpu: dict[str, float], name: str, call: Call, count: int) -> None:
    for _ in range(count):
        started, cpu_started = time.perf_counter(), time.process_time()
        await call()
        samples.setdefault(name, []).append((time.perf_counter() - started) * 1000)
        cpu[name] = cpu.get(name, 0.0) + (time.process_time() - cpu_started) * 1000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(url: str, workdir: Path, calls: int, stdio: bool) -> tuple[dict[str, list[float]], dict[str, float]]:
    samples: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}  # this client process's CPU time per path, ms
    chat_body = {"messages": MESSAGES, "max_tokens": 1, "temperature": 0}
    route_args = {"task": "chat", "messages": MESSAGES, "max_tokens": 1, "temperature": 0}

    async with httpx.AsyncClient(base_url=url, timeout=60) as http, Client(url + "/mcp") as over_http:
        clients = {"mcp-http": over_http}
        stdio_client = Client(stdio_params(workdir)) if stdio else None
        if stdio_client is not None:
            clients["mcp-stdio"] = await stdio_client.__aenter__()
        try:

            async def http_models() -> None:
                (await http.get("/v1/models")).raise_for_status()

            async def http_chat() -> None:
                (await http.post("/v1/chat/completions", json=chat_body)).raise_for_status()

            def tool(client: Client, name: str, arguments: dict[str, object]) -> Call:
                async def call() -> None:
                    result = await client.call_tool(name, arguments)
                    if result.is_error:
                        raise RuntimeError(result.content)

                return call

            async def new_session() -> None:
                async with Client(url + "/mcp") as fresh:
                    await tool(fresh, "list_peers", {})()

            paths: list[tuple[str, Call]] = [("status: HTTP GET /v1/models", http_models)]
            paths += [(f"status: {kind} list_models", tool(c, "list_models", {})) for kind, c in clients.items()]
            paths.append(("chat 1 token: HTTP POST /v1/chat/completions", http_chat))
            paths += [
                (f"chat 1 token: {kind} route_inference_request", tool(c, "route_inference_request", route_args))
                for kind, c in clients.items()
            ]
            paths.append(("session: connect + list_peers + close (HTTP)", new_session))
            # Warm-up: the first few dozen generations of a fresh model process run slower
            # (allocator and kernel caches), as do first calls (imports, schema caches).
            for _, call in paths:
                await timed({}, {}, "", call, WARM_UP)
            for block in range(0, calls, BLOCK):
                for name, call in paths:
                    count = min(BLOCK, calls - block)
                    if name.startswith("session"):
                        count = max(1, count // 4)  # sessions are rare and slower
                    await timed(samples, cpu, name, call, count)
        finally:
            if stdio_client is not None:
                await stdio_client.__aexit__(None, None, None)
    return samples, cpu


def report(samples: dict[str, list[float]], cpu: dict[str, float]) -> str:
    baselines = {
        "status": "status: HTTP GET /v1/models",
        "chat 1 token": "chat 1 token: HTTP POST /v1/chat/completions",
    }
    lines = [
        "| path | calls | p50 ms | p90 ms | p99 ms | p50 vs HTTP | client CPU ms/call |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in samples.items():
        base = baselines.get(name.split(":")[0])
        ratio = f"{statistics.median(values) / statistics.median(samples[base]):.2f}x" if base else "-"
        lines.append(
            f"| {name} | {len(values)} | {statistics.median(values):.2f} | {percentile(values, 0.9):.2f} "
            f"| {percentile(values, 0.99):.2f} | {ratio} | {cpu[name] / len(values):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="60 calls per path")
    parser.add_argument("--no-stdio", dest="stdio", action="store_false", help="skip the stdio server")
    args = parser.parse_args()
    calls = 60 if args.quick else args.calls
    with tempfile.TemporaryDirectory() as tmp, running_node(Path(tmp)) as url:
        samples, cpu = trio.run(measure, url, Path(tmp), calls, args.stdio)
    print(report(samples, cpu))


if __name__ == "__main__":
    main()
