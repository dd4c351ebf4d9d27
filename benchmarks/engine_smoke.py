"""Smoke benchmark of the local generation engine on the real SmolLM2-135M-Instruct.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/engine_smoke.py

Checks that greedy decoding answers a factual question, then compares throughput of N
concurrent requests with max_batch_size=N against max_batch_size=1 (medians of a few runs:
timings on small shared machines are noisy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.local._engine import Finished, GenerationEngine, GenerationEvent, SamplingParams, TokenDelta
from backends.local._models import detect_device, load_causal_lm, prepare_smollm2

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


def run_batch(engine: GenerationEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[str]]:
    """Submit all prompts at once; return (seconds until the last finished, texts)."""
    texts = [""] * len(prompts)
    pending = len(prompts)
    lock = threading.Lock()
    done = threading.Event()
    tokens = 0

    def make_emit(i: int):
        def emit(event: GenerationEvent) -> None:
            nonlocal pending, tokens
            if isinstance(event, TokenDelta):
                texts[i] += event.text
            elif isinstance(event, Finished):
                with lock:
                    tokens += event.completion_tokens
                    pending -= 1
                    if pending == 0:
                        done.set()

        return emit

    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.submit(ids, params, make_emit(i))
    done.wait()
    elapsed = time.perf_counter() - start
    return elapsed, texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", default=os.environ.get("P2P_NODE_MODEL_CACHE", "~/.cache/p2p-node/models"))
    parser.add_argument("--device", default=detect_device())
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(prepare_smollm2(Path(args.cache_dir)), args.device)
    print(f"loaded SmolLM2 on {args.device} ({model.dtype}) in {time.perf_counter() - start:.1f} s")

    def chat_ids(question: str) -> list[int]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    greedy = SamplingParams(max_tokens=32, temperature=0.0)
    engine = GenerationEngine(model, tokenizer, max_batch_size=1, name="check")
    engine.start()
    _, (answer,) = run_batch(engine, [chat_ids("What is the capital of France?")], greedy)
    engine.stop()
    print(f"capital of France -> {answer!r} ({'OK' if 'Paris' in answer else 'WRONG'})")

    prompts = [chat_ids(PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    # ignore eos so every request generates exactly max_tokens: comparable token counts
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    total = args.requests * args.max_tokens
    results: dict[int, float] = {}
    for batch_size in (args.requests, 1):
        engine = GenerationEngine(model, tokenizer, max_batch_size=batch_size, name=f"bench-{batch_size}")
        engine.eos_ids = frozenset()  # generate exactly max_tokens per request
        engine.start()
        run_batch(engine, prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
        times = [run_batch(engine, prompts, params)[0] for _ in range(args.repeats)]
        stats = engine.stats
        engine.stop()
        results[batch_size] = total / statistics.median(times)
        print(
            f"max_batch_size={batch_size}: {args.requests} requests x {args.max_tokens} tokens, "
            f"median {statistics.median(times):.2f} s -> {results[batch_size]:.1f} tok/s "
            f"(runs: {', '.join(f'{t:.2f}' for t in times)}; max batch seen {stats.max_batch_seen}, "
            f"rows/forward {stats.rows_processed / max(1, stats.forward_passes):.2f})"
        )
    print(f"speed-up: {results[args.requests] / results[1]:.2f}x")


if __name__ == "__main__":
    main()
