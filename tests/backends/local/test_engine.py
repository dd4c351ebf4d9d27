"""The continuous-batching engine, on the tiny random Llama (real tokenizer, fp32).

Outputs of a random model are gibberish, but deterministic: that is what these tests use.
That the real model answers correctly is shown in tests/p2p_node/api/test_inference_real_models.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backends.local._engine import Finished, GenerationEngine, GenerationEvent, SamplingParams, TokenDelta
from backends.local._models import build_tiny_llama

PROMPTS = ["Hello there, how are you?", "The capital of France", "1 2 3 4 5 6 7", "Write me a poem about the sea"]
WAIT_S = 60.0


@pytest.fixture(scope="module")
def tiny(smollm2_dir: Path) -> tuple[Any, Any]:
    return build_tiny_llama(smollm2_dir)


@pytest.fixture
def make_engine(tiny: tuple[Any, Any]) -> Iterator[Any]:
    engines: list[GenerationEngine] = []

    def make(**kwargs: Any) -> GenerationEngine:
        model, tokenizer = tiny
        engine = GenerationEngine(model, tokenizer, **kwargs)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@dataclass
class Collector:
    """Gathers one request's events from the worker thread."""

    deltas: list[str] = field(default_factory=list)
    finished: Finished | None = None
    done: threading.Event = field(default_factory=threading.Event)
    first_token: threading.Event = field(default_factory=threading.Event)

    def __call__(self, event: GenerationEvent) -> None:
        if isinstance(event, TokenDelta):
            self.deltas.append(event.text)
            self.first_token.set()
        else:
            assert self.finished is None, "a request must finish exactly once"
            self.finished = event
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    def wait(self) -> Finished:
        assert self.done.wait(WAIT_S), "generation did not finish"
        assert self.finished is not None
        return self.finished


def encode(tiny: tuple[Any, Any], prompt: str) -> list[int]:
    return list(tiny[1].encode(prompt))


def run_all(
    engine: GenerationEngine, tiny: tuple[Any, Any], prompts: list[str], params: SamplingParams
) -> list[Collector]:
    collectors = [Collector() for _ in prompts]
    for prompt, collector in zip(prompts, collectors, strict=True):
        engine.submit(encode(tiny, prompt), params, collector)
    for collector in collectors:
        collector.wait()
    return collectors


def test_batched_greedy_output_equals_each_request_run_alone(make_engine: Any, tiny: Any) -> None:
    params = SamplingParams(max_tokens=24, temperature=0)
    alone_engine = make_engine(max_batch_size=1)
    alone = [run_all(alone_engine, tiny, [prompt], params)[0].text for prompt in PROMPTS]
    batched_engine = make_engine(max_batch_size=8, batch_wait_s=0.2)
    together = [c.text for c in run_all(batched_engine, tiny, PROMPTS, params)]
    assert together == alone
    assert batched_engine.stats.max_batch_seen > 1
    assert alone_engine.stats.max_batch_seen == 1


def test_same_seed_same_text_other_seed_other_text(make_engine: Any, tiny: Any) -> None:
    engine = make_engine()
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234)
    first = run_all(engine, tiny, [PROMPTS[0]], seeded)[0].text
    again = run_all(engine, tiny, [PROMPTS[0]], seeded)[0].text
    other = run_all(engine, tiny, [PROMPTS[0]], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=99))[0]
    assert again == first
    assert other.text != first


@pytest.mark.slow
def test_seeded_sampling_is_the_same_whoever_shares_the_batch(smollm2_dir: Path) -> None:
    # The random model's distribution is nearly flat, so float noise from a different batch
    # shape moves inverse-CDF samples; the real model's peaked one (in fp32) shows the property.
    import torch

    from backends.local._models import load_causal_lm

    model, tokenizer = load_causal_lm(smollm2_dir, "cpu", torch.float32)
    engine = GenerationEngine(model, tokenizer, max_batch_size=8, batch_wait_s=0.2)
    engine.start()
    try:
        seeded = SamplingParams(max_tokens=24, temperature=0.8, seed=1234)

        def chat(text: str) -> list[int]:
            messages = [{"role": "user", "content": text}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(tokenizer.encode(text))

        prompt = chat("Tell me a fun fact about octopuses.")
        alone = Collector()
        engine.submit(prompt, seeded, alone)
        alone.wait()
        for other in PROMPTS[1:]:
            engine.submit(chat(other), SamplingParams(max_tokens=30, temperature=1.0), Collector())
        target = Collector()
        engine.submit(prompt, seeded, target)
        finished = target.wait()
        assert finished.finish_reason == "length", finished
        assert engine.stats.max_batch_seen > 1
        assert target.text == alone.text
    finally:
        engine.stop()


def test_requests_beyond_the_batch_size_queue_and_all_finish(make_engine: Any, tiny: Any) -> None:
    engine = make_engine(max_batch_size=2, batch_wait_s=0.05)
    collectors = run_all(engine, tiny, PROMPTS + PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0))
    assert [c.finished.finish_reason for c in collectors if c.finished] == ["length"] * 5
    stats = engine.stats
    assert stats.max_batch_seen == 2
    assert stats.queued == 0 and stats.active == 0


def test_max_tokens_ends_with_length_and_real_token_counts(make_engine: Any, tiny: Any) -> None:
    engine = make_engine()
    prompt_ids = encode(tiny, PROMPTS[1])
    collector = Collector()
    engine.submit(prompt_ids, SamplingParams(max_tokens=5, temperature=0), collector)
    finished = collector.wait()
    assert finished.finish_reason == "length"
    assert finished.completion_tokens == 5
    assert finished.prompt_tokens == len(prompt_ids)


def test_stop_string_cuts_the_output_before_it(make_engine: Any, tiny: Any) -> None:
    engine = make_engine()
    params = SamplingParams(max_tokens=30, temperature=0)
    full = run_all(engine, tiny, [PROMPTS[3]], params)[0].text
    words = full.split()
    assert len(words) > 3, full
    stop = words[2]
    cut = run_all(engine, tiny, [PROMPTS[3]], SamplingParams(max_tokens=30, temperature=0, stop=(stop,)))[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finished is not None and cut.finished.finish_reason == "stop"


def test_cancel_frees_the_slot_for_the_next_request(make_engine: Any, tiny: Any) -> None:
    engine = make_engine(max_batch_size=1)
    long_running = Collector()
    handle = engine.submit(encode(tiny, PROMPTS[0]), SamplingParams(max_tokens=1500, temperature=0), long_running)
    assert long_running.first_token.wait(WAIT_S)
    waiting = Collector()
    engine.submit(encode(tiny, PROMPTS[1]), SamplingParams(max_tokens=4, temperature=0), waiting)
    assert not waiting.done.wait(0.3), "the single slot is taken; the second request must wait"
    handle.cancel()
    handle.cancel()  # idempotent
    assert long_running.wait().finish_reason == "cancelled"
    assert waiting.wait().finish_reason == "length"


def test_cancelling_a_queued_request_finishes_it_without_running_it(make_engine: Any, tiny: Any) -> None:
    engine = make_engine(max_batch_size=1)
    blocker = Collector()
    blocker_handle = engine.submit(encode(tiny, PROMPTS[0]), SamplingParams(max_tokens=1500, temperature=0), blocker)
    assert blocker.first_token.wait(WAIT_S)
    queued = Collector()
    engine.submit(encode(tiny, PROMPTS[1]), SamplingParams(max_tokens=4, temperature=0), queued).cancel()
    finished = queued.wait()
    assert finished.finish_reason == "cancelled" and finished.completion_tokens == 0
    blocker_handle.cancel()
    blocker.wait()


def test_a_failing_emit_callback_does_not_kill_the_engine(make_engine: Any, tiny: Any) -> None:
    engine = make_engine()

    def explode(event: GenerationEvent) -> None:
        raise RuntimeError("client went away badly")

    engine.submit(encode(tiny, PROMPTS[0]), SamplingParams(max_tokens=4, temperature=0), explode)
    healthy = run_all(engine, tiny, [PROMPTS[1]], SamplingParams(max_tokens=4, temperature=0))[0]
    assert healthy.finished is not None and healthy.finished.finish_reason == "length"


def test_empty_and_oversized_prompts_fail_with_a_reason(make_engine: Any, tiny: Any) -> None:
    engine = make_engine(max_context=32)
    empty, huge = Collector(), Collector()
    engine.submit([], SamplingParams(max_tokens=4), empty)
    engine.submit(encode(tiny, "word " * 100), SamplingParams(max_tokens=4), huge)
    assert empty.wait().finish_reason == "error" and "empty" in (empty.finished.error or "")
    assert huge.wait().finish_reason == "error" and "context window" in (huge.finished.error or "")


def test_completion_is_capped_by_the_context_window(make_engine: Any, tiny: Any) -> None:
    engine = make_engine(max_context=20)
    prompt_ids = encode(tiny, PROMPTS[0])
    collector = Collector()
    engine.submit(prompt_ids, SamplingParams(max_tokens=100, temperature=0), collector)
    finished = collector.wait()
    assert finished.finish_reason == "length"
    assert finished.prompt_tokens + finished.completion_tokens == 20


def test_stop_finishes_live_and_queued_requests_as_cancelled(tiny: Any) -> None:
    model, tokenizer = tiny
    engine = GenerationEngine(model, tokenizer, max_batch_size=1)
    engine.start()
    running, queued = Collector(), Collector()
    engine.submit(encode(tiny, PROMPTS[0]), SamplingParams(max_tokens=1500, temperature=0), running)
    engine.submit(encode(tiny, PROMPTS[1]), SamplingParams(max_tokens=1500, temperature=0), queued)
    assert running.first_token.wait(WAIT_S)
    engine.stop()
    assert running.wait().finish_reason == "cancelled"
    assert queued.wait().finish_reason == "cancelled"
    late = Collector()
    engine.submit(encode(tiny, PROMPTS[2]), SamplingParams(max_tokens=4), late)
    assert late.wait().finish_reason == "cancelled"
