"""The mesh: what serving through a peer costs, how fast nodes find each other, the gap a
client sees when its peer dies, and advert traffic.

    .venv/bin/python benchmarks/mesh.py               # everything (root needed for discovery)
    .venv/bin/python benchmarks/mesh.py --quick       # fewer requests, 2 and 5 hosts
    .venv/bin/python benchmarks/mesh.py --skip-discovery
    .venv/bin/python benchmarks/mesh.py --peer-only       # only the peer-against-local rows

All nodes are real processes (`python -m p2p_node start`). The chat model is the tiny
built-in one (random weights, ~350 tokens/s here): a fast model makes per-token overhead
visible, where SmolLM2's own 60 ms per token would hide it.

1. Peer against local: the same streamed requests sent straight to the serving node
   (local) and to a node without the model that forwards them over libp2p (peer),
   interleaved, sequentially. Added TTFT p50 and the tokens/s ratio.
2. Discovery: N hosts in network namespaces on one bridge, mDNS only. From the moment the
   last node is serving, how long until each node sees all N-1 others (p50, p95 over nodes).
3. Failover gap: two serving nodes and an asking node; the peer serving a long stream is
   killed after 20 chunks; the largest gap between chunks the client sees, against the
   median gap.
4. Advert traffic: adverts each node sent per peer per second over an idle minute (the
   advert stream also carries one ping and pong per advert).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from tests.conftest import TINY_CONFIG, NodeProcess, start_node
from tests.p2p_node import netns

TINY = "tiny-random-llama"
NO_LOCAL_CHAT = '[models]\nchat = {}\ndefault_chat = "tiny-random-llama"\npreload = []\n'
BODY = {
    "model": TINY,
    "messages": [{"role": "user", "content": "Tell me about the sea."}],
    "temperature": 0,
    "stream": True,
}


def mesh(node: NodeProcess) -> dict:  # type: ignore[type-arg]
    return httpx.get(node.url + "/status", timeout=10).json()["mesh"]


def wait_for(predicate: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def stream_timings(url: str, max_tokens: int) -> tuple[float, float, list[float]]:
    """(TTFT s, tokens/s after the first, arrival times of content chunks)."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    body = {**BODY, "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    ttft = arrivals[0] - sent
    rate = (tokens - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    return ttft, rate, arrivals


def peer_vs_local(workdir: Path, requests: int, max_tokens: int, two_machines: bool = False) -> None:
    # Two machines emulated on this one: the serving node on the last core, the client and
    # the asking nodes on the others (CPU affinity is inherited by the nodes started here).
    everything = os.sched_getaffinity(0)
    if two_machines:
        os.sched_setaffinity(0, {max(everything)})
    server = start_node(workdir / "server", TINY_CONFIG)
    if two_machines:
        os.sched_setaffinity(0, everything - {max(everything)})
    bootstrap = {"LIBP2P_BOOTSTRAP_PEERS": mesh(server)["addrs"][0]}
    # One asker reaches the peer over libp2p only; the other also over the peer's HTTP API
    # and WebSocket (the default when the API is reachable) and picks the fastest per request.
    askers = {
        "through a peer, libp2p only": start_node(
            workdir / "asker-libp2p", NO_LOCAL_CHAT, env={**bootstrap, "P2P_NODE_PEER_PROTOCOLS": ""}
        ),
        "through a peer, libp2p + HTTP + WebSocket": start_node(workdir / "asker-hybrid", NO_LOCAL_CHAT, env=bootstrap),
    }
    try:
        for asker in askers.values():
            wait_for(lambda asker=asker: any(p["models"] for p in mesh(asker)["peers"]))  # type: ignore[misc]
        time.sleep(3)  # the hybrid's HTTP and WebSocket protocols connect and pass a health check
        for url in (server.url, *(a.url for a in askers.values())):
            for _ in range(4):
                stream_timings(url, 8)  # warm-up; the hybrid measures each protocol
        runs: dict[str, list[tuple[float, float]]] = {"local": [], **{name: [] for name in askers}}
        for _ in range(requests):
            runs["local"].append(stream_timings(server.url, max_tokens)[:2])
            for name, asker in askers.items():
                runs[name].append(stream_timings(asker.url, max_tokens)[:2])
        hybrid = askers["through a peer, libp2p + HTTP + WebSocket"]
        backends = httpx.get(hybrid.url + "/status", timeout=10).json()["manager"]["backends"]
        protocols = next(b for b in backends if b["id"].startswith("peer:"))["details"].get("protocols", [])
    finally:
        for asker in askers.values():
            asker.stop()
        server.stop()
        os.sched_setaffinity(0, everything)
    ttft = {name: statistics.median(t for t, _ in timings) * 1000 for name, timings in runs.items()}
    rate = {name: statistics.median(r for _, r in timings) for name, timings in runs.items()}
    where = "; serving node on its own core, client and askers on the other" if two_machines else ""
    print(f"\n### Peer-served against local ({requests} streamed requests each, {max_tokens} tokens{where})\n")
    print("| path | TTFT p50 (ms) | added TTFT p50 (ms) | tokens/s p50 | tokens/s ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in runs:
        added = ttft[name] - ttft["local"]
        print(f"| {name} | {ttft[name]:.1f} | {added:+.1f} | {rate[name]:.1f} | {rate[name] / rate['local']:.3f} |")
    measured = ", ".join(
        f"{p['id'].split('/')[-1]} {p['ttft_ms']} ms / {p.get('tpot_ms')} ms per token" for p in protocols
    )
    print(f"\nThe hybrid's measured TTFT / time per token per protocol (peak EWMAs): {measured or 'not a hybrid'}")


def failover_gap(workdir: Path, max_tokens: int) -> None:
    first = start_node(workdir / "f1", TINY_CONFIG)
    second = start_node(workdir / "f2", TINY_CONFIG)
    by_id = {mesh(n)["peer_id"]: n for n in (first, second)}
    bootstrap = ",".join(mesh(n)["addrs"][0] for n in (first, second))
    asker = start_node(workdir / "fa", NO_LOCAL_CHAT, env={"LIBP2P_BOOTSTRAP_PEERS": bootstrap})
    try:
        wait_for(lambda: len([p for p in mesh(asker)["peers"] if p["models"]]) == 2)
        body = {**BODY, "max_tokens": max_tokens}
        arrivals: list[float] = []
        killed_at = 0.0
        with httpx.stream("POST", asker.url + "/v1/chat/completions", json=body, timeout=120) as response:
            victim = by_id[response.headers["x-backend-id"].removeprefix("peer:")]
            for line in response.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    arrivals.append(time.perf_counter())
                    if len(arrivals) == 20:
                        killed_at = time.perf_counter()
                        victim.process.send_signal(signal.SIGKILL)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        after_kill = [b for b in arrivals if b > killed_at]
        gap = (after_kill[0] - killed_at) if after_kill else float("nan")
        print(f"\n### Failover gap (serving peer SIGKILLed after 20 of {max_tokens} tokens)\n")
        print("| median gap between chunks (ms) | kill → next chunk (ms) | largest gap (ms) | chunks received |")
        print("|---:|---:|---:|---:|")
        print(f"| {statistics.median(gaps) * 1000:.1f} | {gap * 1000:.0f} | {max(gaps) * 1000:.0f} | {len(arrivals)} |")
    finally:
        for node in (asker, first, second):
            node.stop()


def discovery(workdir: Path, sizes: list[int]) -> None:
    print("\n### mDNS discovery in network namespaces\n")
    print("| hosts | all peers seen, p50 (s) | p95 (s) |")
    print("|---:|---:|---:|")
    for size in sizes:
        with netns.bridge_with_hosts(size) as hosts:
            nodes = [
                netns.start_node_in(h, workdir / f"d{size}-{i}", "[models]\npreload = []\n", timeout=300)
                for i, h in enumerate(hosts)
            ]
            ready_at = time.monotonic()
            seen_at: dict[int, float] = {}
            deadline = ready_at + 120
            while len(seen_at) < size and time.monotonic() < deadline:
                for i, node in enumerate(nodes):
                    if i not in seen_at and len(node.mesh()["peers"]) >= size - 1:
                        seen_at[i] = time.monotonic() - ready_at
                time.sleep(0.05)
            delays = sorted(seen_at.values()) + [float("inf")] * (size - len(seen_at))
            p95 = delays[min(len(delays) - 1, round(0.95 * (len(delays) - 1)))]
            print(f"| {size} | {statistics.median(delays):.2f} | {p95:.2f} |")


def advert_traffic(workdir: Path, seconds: float) -> None:
    a = start_node(workdir / "ad1", "[models]\npreload = []\n")
    b = start_node(workdir / "ad2", "[models]\npreload = []\n", env={"LIBP2P_BOOTSTRAP_PEERS": mesh(a)["addrs"][0]})
    try:
        wait_for(lambda: mesh(b)["peers"] and mesh(a)["peers"])
        before = mesh(a)["adverts_sent"]
        time.sleep(seconds)
        rate = (mesh(a)["adverts_sent"] - before) / seconds
    finally:
        b.stop()
        a.stop()
    print(f"\n### Advert traffic (idle, {seconds:.0f} s)\n")
    print(f"adverts sent per peer per second: {rate:.2f} (limit: 1; keep-alive alone: 0.2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-discovery", action="store_true")
    parser.add_argument("--peer-only", action="store_true", help="only the peer-against-local comparison")
    parser.add_argument(
        "--two-machines",
        action="store_true",
        help="peer against local with the serving node pinned to one core and the client and asking nodes "
        "to the rest, as when they run on different machines",
    )
    args = parser.parse_args()
    requests, max_tokens = (10, 64) if args.quick else (30, 128)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        peer_vs_local(workdir, requests, max_tokens, args.two_machines)
        if args.peer_only:
            return
        failover_gap(workdir, 600)
        advert_traffic(workdir, 15 if args.quick else 60)
        if not args.skip_discovery and netns.available():
            discovery(workdir, [2, 5] if args.quick else [2, 5, 10])
        elif not args.skip_discovery:
            print("\n(discovery skipped: needs root and iproute2)")


if __name__ == "__main__":
    main()
