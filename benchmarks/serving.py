"""End-to-end serving benchmark: dynamic batching on against off, through the HTTP API.

    .venv/bin/python benchmarks/serving.py            # prints markdown tables
    .venv/bin/python benchmarks/serving.py --quick    # fewer requests, for a smoke run

For each mode the script starts a real node process (`python -m p2p_node start`) on a free
loopback port with the embedded default models, waits until it is ready, and drives it with
concurrent streaming clients, exactly as users do. Modes run one after the other in this
one script, so the ratios compare like with like on the same machine at the same time.

Chat: SmolLM2-135M-Instruct, greedy, `max_tokens` per request, at concurrency 1, 4 and 8
(closed loop: each client sends its next request when the previous one ends).
Throughput counts completion tokens reported in `usage`; TTFT is the time from sending the
request to the first content chunk.

Embeddings: all-MiniLM-L6-v2. The baseline sends one text per request, one request at a
time, to a node with batching off. Against it: concurrent single-text requests that the
node micro-batches, and clients sending lists of texts in one request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import start_node  # noqa: E402  (the test suite's node launcher)

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "List some tips for learning a new language.",
    "Describe the water cycle to a child.",
    "What are the benefits of regular exercise?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a bicycle stay upright?",
    "Give me a recipe for pancakes.",
]

SENTENCES = [
    f"Sentence number {i} talks about {topic} in a few plain words."
    for i, topic in enumerate(["rivers", "bread", "engines", "music", "planets", "forests", "markets", "birds"] * 64)
]


# ---- node processes -----------------------------------------------------------------------


@contextmanager
def running_node(max_batch_size: int, batch_timeout_ms: float) -> Iterator[str]:
    config = (
        f"[batching]\nmax_batch_size = {max_batch_size}\nbatch_timeout_ms = {batch_timeout_ms}\n"
        "[routing]\nmax_pending_requests = 4096\n[logging]\nlevel = 'WARNING'\n"
    )
    with tempfile.TemporaryDirectory() as workdir:
        node = start_node(Path(workdir), config, timeout=300)
        try:
            yield node.url
        finally:
            node.stop()


# ---- chat ---------------------------------------------------------------------------------


@dataclass
class ChatRun:
    concurrency: int
    seconds: float = 0.0
    completion_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    @property
    def ttft_p50_ms(self) -> float:
        return 1000 * statistics.median(self.ttfts)


async def one_chat(client: httpx.AsyncClient, prompt: str, max_tokens: int, run: ChatRun) -> None:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first: float | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if event.get("usage"):
                run.completion_tokens += event["usage"]["completion_tokens"]
    run.ttfts.append((first or time.perf_counter()) - sent)


async def chat_load(url: str, concurrency: int, per_client: int, max_tokens: int) -> ChatRun:
    run = ChatRun(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_chat(client, PROMPTS[0], 8, ChatRun(1))  # warm-up

        async def worker(index: int) -> None:
            for i in range(per_client):
                await one_chat(client, PROMPTS[(index + i * concurrency) % len(PROMPTS)], max_tokens, run)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(concurrency):
                nursery.start_soon(worker, index)
        run.seconds = time.perf_counter() - started
    return run


# ---- embeddings -----------------------------------------------------------------------------


async def embeddings_load(url: str, concurrency: int, texts_per_request: int, total_texts: int) -> float:
    """Texts embedded per second."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        (await client.post("/v1/embeddings", json={"input": SENTENCES[:4]})).raise_for_status()  # warm-up
        requests = [SENTENCES[start : start + texts_per_request] for start in range(0, total_texts, texts_per_request)]
        queue = iter(requests)

        async def worker() -> None:
            for batch in queue:  # shared iterator: each request is sent once
                body = {"input": batch if texts_per_request > 1 else batch[0]}
                response = await client.post("/v1/embeddings", json=body)
                response.raise_for_status()
                assert len(response.json()["data"]) == len(batch)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        return total_texts / (time.perf_counter() - started)


# ---- report ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=3, help="chat requests each client sends")
    parser.add_argument("--embed-texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="max_batch_size when batching is on")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.per_client, args.embed_texts = 16, 1, 64

    modes = {"batching on": (args.batch_size, 10.0), "batching off": (1, 0.0)}
    chat: dict[str, dict[int, ChatRun]] = {}
    embeddings: dict[str, float] = {}
    for mode, (batch_size, wait_ms) in modes.items():
        with running_node(batch_size, wait_ms) as url:
            print(f"[{mode}] node ready at {url}", file=sys.stderr)
            chat[mode] = {}
            for concurrency in (1, 4, 8):
                run = trio.run(chat_load, url, concurrency, args.per_client, args.max_tokens)
                chat[mode][concurrency] = run
                print(
                    f"[{mode}] chat c={concurrency}: {run.tokens_per_s:.1f} tok/s, TTFT p50 {run.ttft_p50_ms:.0f} ms",
                    file=sys.stderr,
                )
            if mode == "batching off":
                embeddings["one at a time (1 text/request, 1 client)"] = trio.run(
                    embeddings_load, url, 1, 1, args.embed_texts
                )
            else:
                embeddings["micro-batched (1 text/request, 16 clients)"] = trio.run(
                    embeddings_load, url, 16, 1, args.embed_texts
                )
                embeddings["batched in the request (32 texts/request)"] = trio.run(
                    embeddings_load, url, 1, 32, args.embed_texts
                )
            print(f"[{mode}] embeddings done", file=sys.stderr)

    on, off = chat["batching on"], chat["batching off"]
    print(f"\n### Chat: SmolLM2-135M-Instruct, {args.max_tokens} max tokens, greedy, streaming\n")
    print("| concurrency | batching off tok/s | batching on tok/s | speed-up | TTFT p50 off (ms) | TTFT p50 on (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c in (1, 4, 8):
        print(
            f"| {c} | {off[c].tokens_per_s:.1f} | {on[c].tokens_per_s:.1f} | "
            f"{on[c].tokens_per_s / off[c].tokens_per_s:.2f}x | {off[c].ttft_p50_ms:.0f} | {on[c].ttft_p50_ms:.0f} |"
        )
    baseline_name = "one at a time (1 text/request, 1 client)"
    baseline = embeddings[baseline_name]
    print(f"\n### Embeddings: all-MiniLM-L6-v2, {args.embed_texts} texts\n")
    print("| mode | texts/s | vs one at a time |")
    print("|---|---:|---:|")
    for name, rate in embeddings.items():
        print(f"| {name} | {rate:.1f} | {rate / baseline:.2f}x |")


if __name__ == "__main__":
    main()
