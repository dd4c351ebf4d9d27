"""Proxy overhead: what a request pays for going through a node, against LiteLLM's proxy.

    .venv/bin/python benchmarks/overhead.py            # 300 + 60 requests per target, ~4 minutes
    .venv/bin/python benchmarks/overhead.py --quick    # 100 + 10, under a minute plus start-up

One fast simulated OpenAI-compatible upstream (`_sim_upstreams.py`: TTFT 20 ms, 2 ms per
token, tokens sent on a schedule so that its pace is the simulated engine's and not how
soon this 2-core machine gives its sleeping loop a core; `--sleep-paced` for the older
sleep-after-each-send upstream) is reached three ways, in one run:

(a) direct: the client talks to the upstream itself;
(b) p2p-node: a real node process (`python -m p2p_node start`) whose only `[[backends]]`
    entry is that upstream (`type = "openai"`), with no local model preloaded and
    discovery off;
(c) LiteLLM: its proxy (`litellm --config`, one uvicorn worker, no auth like the node)
    from its own virtual environment (see `_litellm_side.py`), with that upstream as its
    only deployment.

The same client (httpx, keep-alive, trio) measures every target, in interleaved blocks so
that noise on this shared machine lands on all three alike: non-streamed chat latency over
sequential requests (16 tokens each), then streamed chat (256 tokens each) counting
content tokens per second of each request, send to last token (the median is reported:
one request slowed by a neighbour on this shared machine should not set the figure).
The CPU time the proxy process (and its children) spends while streaming, per token
relayed, is what bounds how many streams one proxy can carry. The upstream also counts
the TCP connections it accepts while each target is measured: a proxy that keeps its
upstream connections alive opens none after warm-up (the client's own idle connections
expire after 5 s, hence a few on every path).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _litellm_side
from _procstat import cpu_seconds
from _sim_upstreams import MODEL, Profile, free_ports, running_upstreams

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCK = 10  # requests per target before moving to the next


@contextmanager
def running_node(upstream_url: str) -> Iterator[tuple[str, int]]:
    """A node process whose only backend is the upstream: its URL and process id."""
    port = free_ports(1)[0]
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "node.toml"
        config.write_text(
            "[models]\npreload = []\n[discovery]\nenabled = false\n[logging]\nlevel = 'WARNING'\n"
            f'[[backends]]\nid = "sim"\ntype = "openai"\nurl = "{upstream_url}"\napi_key = "x"\n'
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
        log_path = Path(workdir) / "node.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "p2p_node", "start", "--config", str(config), "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 120
                while not _ready(url):
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"node did not start:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.2)
                yield url, process.pid
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ---- measuring ----------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str  # up to and including /v1
    latencies: list[float] = field(default_factory=list)
    stream_rates: list[float] = field(default_factory=list)  # tokens/s of each streamed request
    stream_ttfts: list[float] = field(default_factory=list)
    connections: int = 0  # TCP connections the upstream accepted while this target was measured
    pid: int | None = None  # the proxy's process, whose CPU time is counted
    stream_cpu_s: float = 0.0  # the proxy's CPU time (its process and children) while streaming
    streamed_tokens: int = 0


def body(index: int, max_tokens: int, stream: bool) -> dict[str, object]:
    messages = [{"role": "user", "content": f"Request {index}: say something about rivers."}]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": stream}


async def chat_once(client: httpx.AsyncClient, target: Target, index: int, max_tokens: int) -> float:
    sent = time.perf_counter()
    response = await client.post(target.url + "/chat/completions", json=body(index, max_tokens, False))
    elapsed = time.perf_counter() - sent
    response.raise_for_status()
    answer = response.json()
    if answer["usage"]["completion_tokens"] != max_tokens:
        raise RuntimeError(f"{target.name} answered {answer['usage']} for {max_tokens} tokens")
    return elapsed


async def stream_once(
    client: httpx.AsyncClient, target: Target, index: int, max_tokens: int
) -> tuple[int, float, float]:
    """Tokens, seconds, TTFT."""
    sent = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", target.url + "/chat/completions", json=body(index, max_tokens, True)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"{target.name}: {event['error']}")
            choices = event.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                tokens += 1
                first = first or time.perf_counter()
    if tokens != max_tokens:
        raise RuntimeError(f"{target.name} streamed {tokens} tokens for {max_tokens}")
    return tokens, time.perf_counter() - sent, (first or sent) - sent


async def measure(
    targets: list[Target], stats_url: str, requests: int, streams: int, chat_tokens: int, stream_tokens: int
) -> None:
    clients = {t.name: httpx.AsyncClient(timeout=60) for t in targets}
    stats = httpx.AsyncClient(timeout=10)  # one kept-alive connection, opened before the first count

    async def upstream_connections() -> int:
        return int((await stats.get(stats_url)).json()["connections"])

    try:
        for target in targets:  # warm-up: connections, caches, first-request paths
            for i in range(5):
                await chat_once(clients[target.name], target, i, chat_tokens)
            await stream_once(clients[target.name], target, 0, stream_tokens)
        for start in range(0, requests, BLOCK):
            for target in targets:
                before = await upstream_connections()
                for i in range(start, min(start + BLOCK, requests)):
                    target.latencies.append(await chat_once(clients[target.name], target, i, chat_tokens))
                target.connections += await upstream_connections() - before
        for start in range(0, streams, BLOCK // 2):
            for target in targets:
                before = await upstream_connections()
                cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
                for i in range(start, min(start + BLOCK // 2, streams)):
                    tokens, seconds, ttft = await stream_once(clients[target.name], target, i, stream_tokens)
                    target.stream_rates.append(tokens / seconds)
                    target.stream_ttfts.append(ttft)
                    target.streamed_tokens += tokens
                if target.pid:
                    target.stream_cpu_s += cpu_seconds(target.pid) - cpu_before
                target.connections += await upstream_connections() - before
    finally:
        await stats.aclose()
        for client in clients.values():
            await client.aclose()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---- report -------------------------------------------------------------------------------


def report(targets: list[Target], args: argparse.Namespace, note: str) -> None:
    direct = targets[0]
    p50_direct = percentile(direct.latencies, 0.5)
    rate_direct = percentile(direct.stream_rates, 0.5)
    added = {t.name: percentile(t.latencies, 0.5) - p50_direct for t in targets}
    pacing = "sleep-paced" if args.sleep_paced else "scheduled tokens"
    print(
        f"\n### Overhead: one upstream (TTFT 20 ms, 2 ms/token, {pacing}); {args.requests} sequential non-streamed "
        f"requests of {args.chat_tokens} tokens, {args.streams} streamed of {args.stream_tokens} tokens\n"
    )
    print(
        "| path | p50 (ms) | p99 (ms) | added p50 vs direct (ms) | added p99 vs direct (ms) "
        "| streamed tokens/s p50 | vs direct | streamed TTFT p50 (ms) | proxy CPU per streamed token (µs) "
        "| upstream connections opened |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in targets:
        p50, p99 = percentile(t.latencies, 0.5), percentile(t.latencies, 0.99)
        rate = percentile(t.stream_rates, 0.5)
        cpu_per_token = f"{t.stream_cpu_s / t.streamed_tokens * 1e6:.0f}" if t.pid and t.streamed_tokens else "-"
        print(
            f"| {t.name} | {p50 * 1000:.1f} | {p99 * 1000:.1f} | {added[t.name] * 1000:+.1f} | "
            f"{(p99 - percentile(direct.latencies, 0.99)) * 1000:+.1f} | {rate:.0f} | {rate / rate_direct:.3f}x | "
            f"{percentile(t.stream_ttfts, 0.5) * 1000:.1f} | {cpu_per_token} | {t.connections} |"
        )
    if "LiteLLM proxy" in added and added["LiteLLM proxy"] > 0:
        print(f"\nAdded p50, p2p-node / LiteLLM: {added['p2p-node'] / added['LiteLLM proxy']:.2f}x")
    if note:
        print(f"\n{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="non-streamed requests per target")
    parser.add_argument("--streams", type=int, default=60, help="streamed requests per target")
    parser.add_argument("--chat-tokens", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--litellm-python", help="an interpreter that has litellm (default: benchmarks/.venv-litellm)")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument(
        "--sleep-paced",
        action="store_true",
        help="the upstream sleeps TPOT after each token it sends, as before 2026-11-24 (its pace then "
        "depends on how busy this machine's cores are), instead of sending tokens on a schedule",
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.streams = 100, 10

    python, why_not = (None, "skipped (--no-litellm)")
    if not args.no_litellm:
        python, why_not = _litellm_side.litellm_python(args.litellm_python)
    note = f"LiteLLM {_litellm_side.litellm_version(python)} proxy." if python else f"LiteLLM row skipped: {why_not}."

    upstream = Profile(
        "upstream", free_ports(1)[0], ttft_s=0.020, tpot_s=0.002, capacity=64, scheduled=not args.sleep_paced
    )
    with ExitStack() as stack:
        direct_url = stack.enter_context(running_upstreams([upstream]))[0]
        targets = [Target("direct", direct_url)]
        node_url, node_pid = stack.enter_context(running_node(direct_url))
        targets.append(Target("p2p-node", node_url + "/v1", pid=node_pid))
        if python is not None:
            try:
                proxy = _litellm_side.running_proxy(python, direct_url, free_ports(1)[0], MODEL)
                proxy_url, proxy_pid = stack.enter_context(proxy)
                targets.append(Target("LiteLLM proxy", proxy_url + "/v1", pid=proxy_pid))
            except RuntimeError as exc:
                note = f"LiteLLM row skipped: {exc}"
        print(f"[overhead] targets ready: {', '.join(t.name for t in targets)}", file=sys.stderr)
        started = time.monotonic()
        stats_url = direct_url.removesuffix("/v1") + "/_sim/stats"
        trio.run(measure, targets, stats_url, args.requests, args.streams, args.chat_tokens, args.stream_tokens)
        print(f"[overhead] measured in {time.monotonic() - started:.0f} s", file=sys.stderr)
    report(targets, args, note)


if __name__ == "__main__":
    main()
