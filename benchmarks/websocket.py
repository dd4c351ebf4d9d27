"""WebSocket against SSE through the node, for the same backend.

    .venv/bin/python benchmarks/websocket.py           # prints markdown tables (~2 minutes)
    .venv/bin/python benchmarks/websocket.py --quick   # smoke run

One real node process (`python -m p2p_node start`) fronts one OpenAI-compatible backend:
the simulated upstream of `_sim_upstreams.py` with no think time (TTFT and TPOT 0), so
what is measured is the node's path and its output transport, not a model. The same
requests then go out two ways:

* SSE: `POST /v1/chat/completions` with `stream: true`, read with httpx (`aiter_lines`);
* WebSocket: `inference` messages on `/ws/{client_id}`, read with trio-websocket.

Measured, interleaved (WS, SSE, WS, SSE...) for `--reps` repetitions, medians reported:

* one long stream: chunks per second of a `--tokens`-token answer;
* `--concurrency` streams at once of 256 tokens: aggregate chunks per second (SSE uses
  that many HTTP connections; WebSocket one connection carrying every request, and also
  one connection per stream);
* per-message latency: sequential 1-token requests, request sent → `[DONE]` or
  `inference_complete` received (p50, p99), and a bare ping (`GET /health` against a
  WebSocket `ping`).

Client and node share the machine's cores; the clients are in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sim_upstreams import MODEL, Profile, free_ports, running_upstreams

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def running_node(upstream_url: str) -> Iterator[tuple[str, int]]:
    (port,) = free_ports(1)
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "node.toml"
        config.write_text(
            f"""
[models]
default_chat = "{MODEL}"
preload = []
[routing]
max_pending_requests = 100000
[discovery]
enabled = false
[mesh]
enabled = false
[logging]
level = "WARNING"
[[backends]]
id = "sim"
type = "openai"
url = "{upstream_url}"
api_key = "unused"
models = ["{MODEL}"]
discover_models = false
"""
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
        log_path = Path(workdir) / "node.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "p2p_node", "start", "--config", str(config), "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"node exited: {log_path.read_text()}")
                try:
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node not ready after 120 s: {log_path.read_text()}")
                time.sleep(0.2)
            yield url, process.pid
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


# ---- SSE ----------------------------------------------------------------------------------


def chat_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
    }


async def sse_stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> int:
    """Chunks of content received."""
    chunks = 0
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(prompt, max_tokens)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                chunks += 1
    return chunks


# ---- WebSocket ----------------------------------------------------------------------------


class WsClient:
    """Several requests on one connection: one reader counts each request's chunks and
    wakes the request when its `inference_complete` arrives (no per-message task hop)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.chunks: dict[str, int] = {}
        self.done: dict[str, trio.Event] = {}
        self.counter = 0

    async def read(self) -> None:
        while True:
            message = json.loads(await self.ws.get_message())
            request_id = message.get("request_id", "")
            kind = message["type"]
            if kind == "inference_chunk":
                self.chunks[request_id] += 1
            elif kind in ("inference_complete", "pong"):
                self.done[request_id].set()
            elif kind == "error":
                raise RuntimeError(message)

    async def _call(self, message: dict[str, Any]) -> int:
        self.counter += 1
        request_id = message["request_id"] = f"r{self.counter}"
        self.chunks[request_id] = 0
        done = self.done[request_id] = trio.Event()
        await self.ws.send_message(json.dumps(message))
        await done.wait()
        del self.done[request_id]
        return self.chunks.pop(request_id)

    async def stream(self, prompt: str, max_tokens: int) -> int:
        message = {"type": "inference", "task": "chat", "inputs": prompt, "stream": True}
        return await self._call({**message, "parameters": {"max_tokens": max_tokens}})

    async def ping(self) -> None:
        await self._call({"type": "ping"})


async def with_ws_clients(url: str, count: int, work: Callable[[list[WsClient]], Awaitable[None]]) -> None:
    ws_url = url.replace("http://", "ws://")
    async with AsyncExitStack() as stack:
        clients: list[WsClient] = []
        for index in range(count):
            ws = await stack.enter_async_context(
                open_websocket_url(f"{ws_url}/ws/bench-{index}", max_message_size=1 << 24, receive_buffer_size=65536)
            )
            await ws.get_message()  # the `connection` greeting
            clients.append(WsClient(ws))
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.read)
            await work(clients)
            nursery.cancel_scope.cancel()


# ---- measurements -----------------------------------------------------------------------


class NodeCpu:
    """CPU seconds the node process has used (user + system, all threads), from /proc."""

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/stat")
        self.tick = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        fields = self.path.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick


async def throughput(cpu: NodeCpu, run: Callable[[], Awaitable[int]]) -> tuple[float, float]:
    """Chunks per second, and node CPU milliseconds per 1000 chunks."""
    used = cpu.seconds()
    started = time.perf_counter()
    chunks = await run()
    elapsed = time.perf_counter() - started
    return chunks / elapsed, 1e6 * (cpu.seconds() - used) / chunks


async def gather_counts(jobs: Sequence[Callable[[], Awaitable[int]]]) -> int:
    total = 0

    async def one(job: Callable[[], Awaitable[int]]) -> None:
        nonlocal total
        chunks = await job()  # not `total += await job()`: that reads `total` before awaiting
        total += chunks

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job)
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(url: str, pid: int, args: argparse.Namespace) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {}
    cpu = NodeCpu(pid)

    def record(name: str, value: Any) -> None:
        results.setdefault(name, []).append(value)

    concurrency = args.concurrency
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        # Warm both paths (connections, the backend's HTTP pool, code paths).
        await sse_stream(http, "warm up", 64)

        async def warm(clients: list[WsClient]) -> None:
            await clients[0].stream("warm up", 64)

        await with_ws_clients(url, 1, warm)

        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr)

            async def ws_single(clients: list[WsClient]) -> None:
                record("single ws", await throughput(cpu, lambda: clients[0].stream("one long answer", args.tokens)))

            await with_ws_clients(url, 1, ws_single)
            record("single sse", await throughput(cpu, lambda: sse_stream(http, "one long answer", args.tokens)))

            async def ws_multiplexed(clients: list[WsClient]) -> None:
                jobs = [partial(clients[0].stream, f"stream {i}", 256) for i in range(concurrency)]
                record("concurrent ws-1conn", await throughput(cpu, partial(gather_counts, jobs)))

            await with_ws_clients(url, 1, ws_multiplexed)

            async def ws_per_stream(clients: list[WsClient]) -> None:
                jobs = [partial(c.stream, f"stream {i}", 256) for i, c in enumerate(clients)]
                record("concurrent ws-Nconn", await throughput(cpu, partial(gather_counts, jobs)))

            await with_ws_clients(url, concurrency, ws_per_stream)
            sse_jobs = [partial(sse_stream, http, f"stream {i}", 256) for i in range(concurrency)]
            record("concurrent sse", await throughput(cpu, partial(gather_counts, sse_jobs)))

            async def ws_latency(clients: list[WsClient]) -> None:
                for _ in range(args.requests):
                    started = time.perf_counter()
                    await clients[0].stream("hi", 1)
                    record("latency ws", time.perf_counter() - started)
                for _ in range(args.requests):
                    started = time.perf_counter()
                    await clients[0].ping()
                    record("ping ws", time.perf_counter() - started)

            await with_ws_clients(url, 1, ws_latency)
            for _ in range(args.requests):
                started = time.perf_counter()
                await sse_stream(http, "hi", 1)
                record("latency sse", time.perf_counter() - started)
            for _ in range(args.requests):
                started = time.perf_counter()
                (await http.get("/health")).raise_for_status()
                record("ping sse", time.perf_counter() - started)
    return results


def report(results: dict[str, list[Any]], args: argparse.Namespace) -> None:
    def median(name: str, index: int) -> float:
        return statistics.median(value[index] for value in results[name])

    print(f"\n### Streaming (median of {args.reps}; node CPU = ms of node CPU per 1000 chunks)\n")
    print("| load | SSE chunks/s | WS chunks/s | WS / SSE | SSE node CPU | WS node CPU |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = (
        (f"one stream, {args.tokens} tokens", "single sse", "single ws"),
        (f"{args.concurrency} streams x 256 tokens, WS on one connection", "concurrent sse", "concurrent ws-1conn"),
        (f"{args.concurrency} streams x 256 tokens, WS one connection each", "concurrent sse", "concurrent ws-Nconn"),
    )
    for label, sse, ws in rows:
        print(
            f"| {label} | {median(sse, 0):,.0f} | {median(ws, 0):,.0f} | {median(ws, 0) / median(sse, 0):.2f}x "
            f"| {median(sse, 1):.0f} | {median(ws, 1):.0f} |"
        )
    print(f"\n### Per-message latency (ms, {args.requests} sequential requests x {args.reps})\n")
    print("| message | SSE / HTTP p50 | p99 | WebSocket p50 | p99 |")
    print("|---|---:|---:|---:|---:|")
    for label, kind in (("1-token streamed request, until done", "latency"), ("ping (`GET /health`)", "ping")):
        http_values, ws_values = results[f"{kind} sse"], results[f"{kind} ws"]
        print(
            f"| {label} | {1000 * percentile(http_values, 0.5):.2f} | {1000 * percentile(http_values, 0.99):.2f} "
            f"| {1000 * percentile(ws_values, 0.5):.2f} | {1000 * percentile(ws_values, 0.99):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4000, help="tokens of the single long stream")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per latency sample")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.concurrency, args.requests, args.reps = 500, 4, 30, 1
    (port,) = free_ports(1)
    profile = Profile("sim", port, ttft_s=0.0, tpot_s=0.0, capacity=100_000)
    with running_upstreams([profile]) as urls, running_node(urls[0]) as node:
        results = trio.run(measure, *node, args)
    report(results, args)


if __name__ == "__main__":
    main()
