"""Routing quality: our balancing strategies against LiteLLM's Router, on one simulated pool.

    .venv/bin/python benchmarks/routing.py            # 60 s per strategy, ~7 minutes
    .venv/bin/python benchmarks/routing.py --quick    # 10 s per strategy, under 2 minutes

The pool (simulated OpenAI-compatible upstreams, `benchmarks/_sim_upstreams.py`): one fast
upstream, one 2x slower, one 4x slower, one as fast as the fast one that turns 5x slower a
third of the way into each run, and one as fast as the fast one that answers 10% of its
requests with a 500. Each serves 4 requests at full speed and time-shares beyond that.

The load: Poisson arrivals (seeded, so every router sees the very same schedule) of
streamed chat requests with a fixed `max_tokens`; every answer is exactly that long.

Ours: a `BackendManager` in this process, under trio, with one `OpenAICompatibleBackend`
per upstream and its default settings (3 attempts per request, breaker after 3
consecutive failures, 5 s cooldown), driving `manager.stream(...)` once per strategy.
LiteLLM: `litellm.Router` with "simple-shuffle", "least-busy" and "latency-based-routing"
on the same pool, replaying the same arrivals in its own virtual environment
(`_litellm_side.py`; retries configured there to match ours).

TTFT is request start -> first content token; TPOT is the mean gap between a request's
later tokens; end-to-end is start -> last chunk. A client request fails if it raised, ended
short of `max_tokens`, or took longer than the client's patience (30 s). Throughput is
completion tokens of successful requests per second of run.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _litellm_side
from _sim_upstreams import MODEL, Profile, free_ports, running_upstreams

from backends.manager import BackendManager, ManagerSettings
from backends.remote.openai_compat import OpenAIBackendSettings, OpenAICompatibleBackend
from backends.strategies import Strategy
from backends.types import ChatRequest, GenerationParams, Message, RequestContext

OURS = [Strategy.ROUND_ROBIN.value, Strategy.LEAST_LOADED.value, Strategy.BEST_PERFORMANCE.value]
THEIRS = ["simple-shuffle", "least-busy", "latency-based-routing"]
TOPICS = ["rivers", "bread", "engines", "music", "planets", "forests", "markets", "birds", "tides", "glass"]


def pool(duration_s: float, seed: int) -> list[Profile]:
    ports = free_ports(5)
    return [
        Profile("fast", ports[0], ttft_s=0.05, tpot_s=0.010),
        Profile("slow-2x", ports[1], ttft_s=0.10, tpot_s=0.020),
        Profile("slow-4x", ports[2], ttft_s=0.20, tpot_s=0.040),
        Profile("degrades-5x", ports[3], ttft_s=0.05, tpot_s=0.010, degrade_after_s=duration_s / 3, degrade_factor=5),
        Profile("fails-10%", ports[4], ttft_s=0.05, tpot_s=0.010, failure_rate=0.10, seed=seed),
    ]


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration_s:
        arrivals.append(t)
        t += rng.expovariate(rate)
    return arrivals


# ---- results ------------------------------------------------------------------------------


@dataclass
class Record:
    index: int
    ttft: float | None
    e2e: float
    tokens: int
    error: str | None
    finished: float  # seconds after the run started
    served_by: str = ""  # ours only: the backend that gave the answer

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Record:
        return cls(raw["index"], raw["ttft"], raw["e2e"], raw["tokens"], raw["error"], raw["finished"])


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Summary:
    router: str
    strategy: str
    records: list[Record]
    max_tokens: int
    shares: dict[str, int] = field(default_factory=dict)
    hedges: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> list[Record]:
        return [r for r in self.records if r.error is None and r.tokens >= self.max_tokens]

    @property
    def failed(self) -> int:
        return len(self.records) - len(self.ok)

    def ttft(self, q: float) -> float:
        return percentile([r.ttft for r in self.ok if r.ttft is not None], q)

    def tpot(self, q: float) -> float:
        return percentile([(r.e2e - (r.ttft or 0.0)) / (r.tokens - 1) for r in self.ok if r.tokens > 1], q)

    def e2e(self, q: float) -> float:
        return percentile([r.e2e for r in self.ok], q)

    @property
    def tokens_per_s(self) -> float:
        span = max((r.finished for r in self.records), default=0.0)
        return sum(r.tokens for r in self.ok) / span if span else 0.0


# ---- ours ---------------------------------------------------------------------------------


async def reset_upstreams(urls: list[str]) -> None:
    async with httpx.AsyncClient() as client:
        for url in urls:
            (await client.post(url.removesuffix("/v1") + "/_sim/reset")).raise_for_status()


async def upstream_shares(urls: list[str], names: list[str]) -> dict[str, int]:
    shares = {}
    async with httpx.AsyncClient() as client:
        for name, url in zip(names, urls, strict=True):
            shares[name] = (await client.get(url.removesuffix("/v1") + "/_sim/stats")).json()["requests"]
    return shares


async def run_ours(
    strategy: str, urls: list[str], names: list[str], job: dict[str, Any], hedges: dict[str, int]
) -> list[Record]:
    manager = BackendManager(
        ManagerSettings(strategy=Strategy.parse(strategy), max_pending_requests=100_000), rng=random.Random(job["seed"])
    )
    for name, url in zip(names, urls, strict=True):
        manager.register(OpenAICompatibleBackend(OpenAIBackendSettings(backend_id=name, base_url=url, api_key="x")))
    records: list[Record] = []

    async def one(index: int, offset: float, start: float, start_perf: float) -> None:
        await trio.sleep_until(start + offset)
        request = ChatRequest(
            messages=(Message("user", job["prompts"][index]),),
            model=MODEL,
            params=GenerationParams(max_tokens=job["max_tokens"]),
        )
        sent = time.perf_counter()
        ttft: float | None = None
        tokens = 0
        error: str | None = None
        ctx = RequestContext()
        with trio.move_on_after(job["client_timeout_s"]) as scope:
            try:
                async with aclosing(manager.stream(request, ctx)) as chunks:
                    async for chunk in chunks:
                        if chunk.text:
                            if ttft is None:
                                ttft = time.perf_counter() - sent
                            tokens += 1
            except Exception as exc:  # a failed client request is a result here, not a crash
                error = f"{type(exc).__name__}: {exc}"
        if scope.cancelled_caught:
            error = f"client gave up after {job['client_timeout_s']} s"
        now = time.perf_counter()
        records.append(Record(index, ttft, now - sent, tokens, error, now - start_perf, ctx.served_by or ""))

    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await reset_upstreams(urls)
        start, start_perf = trio.current_time(), time.perf_counter()
        async with trio.open_nursery() as requests:
            for index, offset in enumerate(job["arrivals"]):
                requests.start_soon(one, index, offset, start, start_perf)
        nursery.cancel_scope.cancel()
    hedges.update(started=manager.hedges_started, won=manager.hedges_won)
    return sorted(records, key=lambda r: r.index)


# ---- report -------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}"


def print_report(summaries: list[Summary], names: list[str], args: argparse.Namespace, note: str) -> None:
    baseline = next((s for s in summaries if s.strategy == Strategy.ROUND_ROBIN.value), None)
    print(
        f"\n### Routing: {len(summaries[0].records)} streamed requests, Poisson {args.rate:g}/s for "
        f"{args.duration:g} s, max_tokens {args.max_tokens}, seed {args.seed}\n"
    )
    print(
        "| router | strategy | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | e2e p50 (ms) "
        "| e2e p99 (ms) | e2e p99 vs round_robin | tokens/s | failed requests |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summaries:
        ratio = f"{s.e2e(0.99) / baseline.e2e(0.99):.2f}x" if baseline else "-"
        print(
            f"| {s.router} | {s.strategy} | {ms(s.ttft(0.5))} | {ms(s.ttft(0.99))} | {s.tpot(0.5) * 1000:.1f} | "
            f"{s.tpot(0.99) * 1000:.1f} | {ms(s.e2e(0.5))} | {ms(s.e2e(0.99))} | {ratio} | "
            f"{s.tokens_per_s:.0f} | {s.failed} |"
        )
    print("\nAttempts each upstream received (a retried request counts once per upstream tried):\n")
    print("| router | strategy | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for s in summaries:
        print(f"| {s.router} | {s.strategy} | " + " | ".join(str(s.shares.get(n, 0)) for n in names) + " |")
    print("\nThe slowest 1% of each of our runs (e2e ms, the upstream that answered), and hedges:\n")
    for s in summaries:
        if s.router != "p2p-node":
            continue
        slowest = sorted(s.ok, key=lambda r: r.e2e, reverse=True)[: max(1, len(s.ok) // 100)]
        tail = ", ".join(f"{ms(r.e2e)} {r.served_by}" for r in slowest)
        print(f"- {s.strategy}: {tail}; hedges started {s.hedges.get('started', 0)}, won {s.hedges.get('won', 0)}")
    if note:
        print(f"\n{note}")
    for s in summaries:
        errors = sorted({r.error for r in s.records if r.error})
        if errors:
            print(f"\n{s.router} {s.strategy} errors: " + "; ".join(e[:160] for e in errors[:3]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per strategy")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--client-timeout", type=float, default=30.0, help="a client gives up after this long")
    parser.add_argument("--quick", action="store_true", help="10 s per strategy")
    parser.add_argument("--strategies", nargs="*", default=OURS + THEIRS)
    parser.add_argument("--litellm-python", help="an interpreter that has litellm (default: benchmarks/.venv-litellm)")
    parser.add_argument("--no-litellm", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.duration = 10.0
    logging.basicConfig(level=logging.ERROR)  # retries are part of the result, not news

    arrivals = poisson_arrivals(args.rate, args.duration, args.seed)
    prompts = [f"Request {i}: tell me something about {TOPICS[i % len(TOPICS)]}." for i in range(len(arrivals))]
    job = {"arrivals": arrivals, "prompts": prompts, "max_tokens": args.max_tokens, "seed": args.seed}
    job.update(model=MODEL, duration_s=args.duration, client_timeout_s=args.client_timeout)

    python, why_not = (None, "skipped (--no-litellm)") if args.no_litellm else (None, "")
    theirs = [s for s in args.strategies if s in THEIRS]
    if theirs and not args.no_litellm:
        python, why_not = _litellm_side.litellm_python(args.litellm_python)
    note = ""
    if theirs and python is None:
        note = f"LiteLLM rows skipped: {why_not}."
    elif theirs and python:
        note = (
            f"LiteLLM {_litellm_side.litellm_version(python)} Router settings: "
            f"{json.dumps(_litellm_side.ROUTER_SETTINGS)}, OpenAI SDK max_retries=0 per deployment."
        )

    profiles = pool(args.duration, args.seed)
    names = [p.name for p in profiles]
    summaries: list[Summary] = []
    with running_upstreams(profiles) as urls:
        for strategy in args.strategies:
            started = time.monotonic()
            hedges: dict[str, int] = {}
            if strategy in OURS:
                records = trio.run(run_ours, strategy, urls, names, job, hedges)
                router = "p2p-node"
            elif python is not None:
                job.update(strategy=strategy, urls=urls, names=names)
                records = [Record.of(raw) for raw in _litellm_side.run_router(python, job)]
                router = "LiteLLM"
            else:
                continue
            summary = Summary(
                router, strategy, records, args.max_tokens, trio.run(upstream_shares, urls, names), hedges
            )
            summaries.append(summary)
            print(
                f"[{router} {strategy}] {time.monotonic() - started:.0f} s: e2e p50 {ms(summary.e2e(0.5))} ms, "
                f"p99 {ms(summary.e2e(0.99))} ms, failed {summary.failed}, attempts {summary.shares}",
                file=sys.stderr,
            )
    print_report(summaries, names, args, note)


if __name__ == "__main__":
    main()
