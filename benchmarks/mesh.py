"""The mesh: what serving through a peer costs, how fast nodes find each other, the gap a
client sees when its peer dies, and advert traffic.

    .venv/bin/python benchmarks/mesh.py               # everything (root needed for discovery)
    .venv/bin/python benchmarks/mesh.py --quick       # fewer requests, 2 and 5 hosts
    .venv/bin/python benchmarks/mesh.py --skip-discovery
    .venv/bin/python benchmarks/mesh.py --peer-only       # only the peer-against-local rows
    .venv/bin/python benchmarks/mesh.py --peer-only --model default   # ... with SmolLM2
    .venv/bin/python benchmarks/mesh.py --peer-only --two-machines    # serving node on its own core

All nodes are real processes (`python -m p2p_node start`). The chat model is the tiny
built-in one (random weights, ~350 tokens/s here): a fast model makes per-token overhead
visible, where SmolLM2's own 60 ms per token hides it; `--model default` measures the
embedded default, what a node serves out of the box.

1. Peer against local: the same streamed requests sent straight to the serving node
   (local), through a bare TCP relay process (the floor of what any per-token relay costs
   here), and to nodes without the model that forward them over libp2p, or over libp2p,
   HTTP or WebSocket (the hybrid); paths interleaved, one request at a time. Added TTFT
   p50 (from many short answers), the tokens/s ratio (from long ones) and the CPU each
   process spends per chunk: on two shared cores, every microsecond a relay spends is
   taken from the generation it relays.
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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools
import resource

from _procstat import cpu_seconds

from tests.conftest import TINY_CONFIG, NodeProcess, free_port, start_node
from tests.p2p_node import netns

TINY = "tiny-random-llama"
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


@dataclass(frozen=True)
class ChatModel:
    name: str
    serving_config: str  # the serving node's config: the model preloaded
    label: str


TINY_MODEL = ChatModel(TINY, TINY_CONFIG, "the tiny built-in model (~350 tokens/s: per-token costs exposed)")
DEFAULT_MODEL = ChatModel(
    "SmolLM2-135M-Instruct",
    '[models]\npreload = ["SmolLM2-135M-Instruct"]\n',
    "the embedded default, SmolLM2-135M (what a node serves out of the box)",
)


def no_local_chat(model: ChatModel) -> str:
    """An asking node's config: no chat model of its own, `model` named as its default."""
    return f'[models]\nchat = {{}}\ndefault_chat = "{model.name}"\npreload = []\n'


def stream_timings(url: str, max_tokens: int, model: str = TINY) -> tuple[float, float, list[float]]:
    """(TTFT s, tokens/s after the first, arrival times of content chunks)."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    body = {**BODY, "model": model, "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
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


RELAYED = "local through a bare TCP relay (the floor of any relay)"


def _start_tcp_relay(target_port: int) -> tuple[str, subprocess.Popen[str]]:
    """A process piping connections to the serving node, for the relay-floor row."""
    port = free_port()
    relay = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_tcp_relay.py")), str(port), str(target_port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
    return f"http://127.0.0.1:{port}", relay


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class PathRuns:
    url: str
    relay_pid: int | None  # the process between the client and the serving node, if any
    ttfts: list[float] = field(default_factory=list)  # from the short requests
    rates: list[float] = field(default_factory=list)  # from the long ones
    # CPU seconds during the long requests: serving node, relaying process, client; chunks.
    cpu: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])


def peer_vs_local(
    workdir: Path, requests: int, max_tokens: int, model: ChatModel = TINY_MODEL, two_machines: bool = False
) -> None:
    """TTFT from 3 x `requests` short answers (4 tokens), tokens/s and CPU from `requests`
    answers of `max_tokens`; every path in turn, one request at a time."""
    # Two machines emulated on this one: the serving node on the last core, the client and
    # the asking nodes on the others (CPU affinity is inherited by the processes started here).
    everything = os.sched_getaffinity(0)
    if two_machines:
        os.sched_setaffinity(0, {max(everything)})
    server = start_node(workdir / "server", model.serving_config, timeout=600)
    if two_machines:
        os.sched_setaffinity(0, everything - {max(everything)})
    bootstrap = {"LIBP2P_BOOTSTRAP_PEERS": mesh(server)["addrs"][0]}
    # One asker reaches the peer over libp2p only; the other also over the peer's HTTP API
    # and WebSocket (the default when the API is reachable) and picks the fastest per request.
    askers = {
        "through a peer, libp2p only": start_node(
            workdir / "asker-libp2p", no_local_chat(model), env={**bootstrap, "P2P_NODE_PEER_PROTOCOLS": ""}
        ),
        "through a peer, libp2p + HTTP + WebSocket": start_node(
            workdir / "asker-hybrid", no_local_chat(model), env=bootstrap
        ),
    }
    relay = _start_tcp_relay(int(server.url.rsplit(":", 1)[1]))
    paths = {
        "local": PathRuns(server.url, None),
        RELAYED: PathRuns(relay[0], relay[1].pid),
        **{name: PathRuns(a.url, a.process.pid) for name, a in askers.items()},
    }
    try:
        for asker in askers.values():
            wait_for(lambda asker=asker: any(p["models"] for p in mesh(asker)["peers"]))  # type: ignore[misc]
        time.sleep(3)  # the hybrid's HTTP and WebSocket protocols connect and pass a health check
        for path in paths.values():
            for _ in range(4):
                stream_timings(path.url, 8, model.name)  # warm-up; the hybrid measures each protocol
        for _ in range(3 * requests):
            for path in paths.values():
                path.ttfts.append(stream_timings(path.url, 4, model.name)[0])
        for _ in range(requests):
            for path in paths.values():
                pids = (server.process.pid, path.relay_pid)
                before = [cpu_seconds(pid) if pid else 0.0 for pid in pids] + [_own_cpu()]
                _, tokens_per_s, arrivals = stream_timings(path.url, max_tokens, model.name)
                after = [cpu_seconds(pid) if pid else 0.0 for pid in pids] + [_own_cpu()]
                path.rates.append(tokens_per_s)
                for i in range(3):
                    path.cpu[i] += after[i] - before[i]
                path.cpu[3] += len(arrivals)
        hybrid = askers["through a peer, libp2p + HTTP + WebSocket"]
        backends = httpx.get(hybrid.url + "/status", timeout=10).json()["manager"]["backends"]
        protocols = next(b for b in backends if b["id"].startswith("peer:"))["details"].get("protocols", [])
    finally:
        relay[1].kill()
        relay[1].wait()
        for asker in askers.values():
            asker.stop()
        server.stop()
        os.sched_setaffinity(0, everything)
    ttft = {name: statistics.median(path.ttfts) * 1000 for name, path in paths.items()}
    rate = {name: statistics.median(path.rates) for name, path in paths.items()}
    where = "; serving node on its own core, client and askers on the other" if two_machines else ""
    print(f"\n### Peer-served against local: {model.label}{where}\n")
    print(
        f"TTFT: {3 * requests} streamed requests of 4 tokens per path; tokens/s and CPU: {requests} of "
        f"{max_tokens} tokens per path; paths interleaved, one request at a time.\n"
    )
    print(
        "| path | TTFT p50 (ms) | added TTFT p50 (ms) | tokens/s p50 | tokens/s ratio "
        "| CPU µs per chunk: serving node / relaying process / client |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, path in paths.items():
        added = ttft[name] - ttft["local"]
        served, relayed, client, chunks = path.cpu
        per_chunk = " / ".join(f"{seconds / max(chunks, 1) * 1e6:.0f}" for seconds in (served, relayed, client))
        print(
            f"| {name} | {ttft[name]:.1f} | {added:+.1f} | {rate[name]:.1f} | {rate[name] / rate['local']:.3f} "
            f"| {per_chunk} |"
        )
    measured = ", ".join(
        f"{p['id'].split('/')[-1]} {p['ttft_ms']} ms / {p.get('tpot_ms')} ms per token" for p in protocols
    )
    print(f"\nThe hybrid's measured TTFT / time per token per protocol (peak EWMAs): {measured or 'not a hybrid'}")


def failover_gap(workdir: Path, max_tokens: int) -> None:
    first = start_node(workdir / "f1", TINY_CONFIG)
    second = start_node(workdir / "f2", TINY_CONFIG)
    by_id = {mesh(n)["peer_id"]: n for n in (first, second)}
    bootstrap = ",".join(mesh(n)["addrs"][0] for n in (first, second))
    asker = start_node(workdir / "fa", no_local_chat(TINY_MODEL), env={"LIBP2P_BOOTSTRAP_PEERS": bootstrap})
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
        "--model",
        choices=["tiny", "default"],
        default="tiny",
        help="peer against local with the tiny built-in model (default) or the embedded SmolLM2",
    )
    parser.add_argument(
        "--two-machines",
        action="store_true",
        help="peer against local with the serving node pinned to one core and the client and asking nodes "
        "to the rest, as when they run on different machines",
    )
    args = parser.parse_args()
    model = DEFAULT_MODEL if args.model == "default" else TINY_MODEL
    # SmolLM2's 60 ms per token: fewer, shorter answers (its speed varies ±15% per request here).
    requests, max_tokens = (10, 64) if args.quick else (20, 48) if model is DEFAULT_MODEL else (30, 128)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        peer_vs_local(workdir, requests, max_tokens, model, args.two_machines)
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
