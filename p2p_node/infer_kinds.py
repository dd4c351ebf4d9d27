"""How each registry kind turns `/infer`'s text and parameters into manager calls.

Summaries and chat replies are one chat request; generation is one completion per returned
sequence. Sentiment shows the model labelled examples and reads the label it writes next;
a chat model gives no probabilities, so the confidence `score` is the share of `votes`
prompt variants (the same examples in rotated orders, decoded greedily) that agree with the
chosen label. That is deterministic for a given text and says how stable the answer is.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from backends.errors import BackendFailedError, InferenceError, InvalidRequestError
from backends.manager import BackendManager
from backends.types import (
    ChatRequest,
    CompletionRequest,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    Message,
    RequestContext,
    Usage,
)
from p2p_node.registry import Kind, ModelVersion, check_parameters

SUMMARY_TOKENS = 96
SENTIMENT_LABELS = ("positive", "negative", "neutral")
DEFAULT_VOTES = 3

SUMMARY_SYSTEM = "You write short, faithful summaries. Reply with the summary only."

# Two examples per label; each vote rotates their order.
_SENTIMENT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("What a wonderful day, everything went great.", "positive"),
    ("I hate waiting, this is awful.", "negative"),
    ("The package contains two cables.", "neutral"),
    ("Absolutely brilliant, I am thrilled with it.", "positive"),
    ("The update broke everything and support never answered.", "negative"),
    ("The train leaves at nine in the morning.", "neutral"),
)


@dataclass
class InferOutcome:
    result: Any
    model_id: str
    backend_id: str
    usage: Usage
    finish_reason: str | None
    parameters: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)  # kind-specific, for the envelope's metadata


async def run_version(
    manager: BackendManager,
    version: ModelVersion,
    text: str,
    parameters: Mapping[str, Any],
    ctx: RequestContext,
    default_max_tokens: int,
) -> InferOutcome:
    """Runs one `/infer` request on `version`; errors are `backends.errors` exceptions."""
    params = {**version.parameters, **check_parameters(version.kind, parameters, version.tag)}
    model_id = manager.resolve_model(version.kind.task, version.model)
    if version.kind is Kind.SENTIMENT:
        return await _sentiment(manager, model_id, text, params, ctx)
    if version.kind is Kind.GENERATE:
        return await _generate(manager, model_id, text, params, ctx, default_max_tokens)
    messages: tuple[Message, ...]
    if version.kind is Kind.SUMMARIZE:
        messages = (Message("system", SUMMARY_SYSTEM), Message("user", _summary_prompt(text, params)))
        sampling = _sampling(params, min(SUMMARY_TOKENS, default_max_tokens), temperature=0.0)
    else:
        system = params.get("system")
        messages = ((Message("system", system),) if system else ()) + (Message("user", text),)
        sampling = _sampling(params, default_max_tokens, temperature=0.7)
    result = await manager.generate(ChatRequest(messages, model_id, sampling), ctx)
    return _outcome(result.text.strip(), [result], params)


def _sampling(params: Mapping[str, Any], max_tokens: int, *, temperature: float) -> GenerationParams:
    budget = next((params[name] for name in ("max_new_tokens", "max_tokens", "max_length") if name in params), None)
    if params.get("do_sample") is False:
        temperature = 0.0
    elif "temperature" in params:
        temperature = params["temperature"]
    return GenerationParams(
        max_tokens=budget or max_tokens,
        temperature=temperature,
        top_p=params.get("top_p", 1.0),
        seed=params.get("seed"),
        stop=tuple(params.get("stop", ())),
    )


def _summary_prompt(text: str, params: Mapping[str, Any]) -> str:
    # The chat model cannot be held to a minimum length; it is asked for one.
    length = f"in at least {params['min_length']} words" if params.get("min_length") else "in one or two sentences"
    return f"Summarize the following text {length}.\n\n{text}"


def _outcome(result: Any, parts: list[GenerationResult], params: dict[str, Any], **details: Any) -> InferOutcome:
    usage = Usage(sum(p.usage.prompt_tokens for p in parts), sum(p.usage.completion_tokens for p in parts))
    reasons = {p.finish_reason for p in parts}
    return InferOutcome(
        result=result,
        model_id=parts[0].model,
        backend_id=parts[0].backend_id,
        usage=usage,
        finish_reason="length" if "length" in reasons else "stop",
        parameters=params,
        details=details,
    )


async def _generate_all(
    manager: BackendManager, requests: list[GenerationRequest], ctx: RequestContext
) -> list[GenerationResult]:
    """Runs the requests concurrently (the engine batches them); the first failure cancels the rest."""
    results: list[GenerationResult | None] = [None] * len(requests)

    async def one(index: int, request: GenerationRequest) -> None:
        child = RequestContext(request_id=f"{ctx.request_id}.{index}", deadline=ctx.deadline, hops=ctx.hops)
        results[index] = await manager.generate(request, child)

    if len(requests) == 1:
        results[0] = await manager.generate(requests[0], ctx)
    else:
        try:
            async with trio.open_nursery() as nursery:
                for index, request in enumerate(requests):
                    nursery.start_soon(one, index, request)
        except BaseExceptionGroup as group:
            # Our errors reach the caller as they are (the first, when several failed), not in a group.
            leaves = _leaves(group)
            if all(isinstance(e, InferenceError) for e in leaves):
                raise leaves[0] from None
            raise
    return [r for r in results if r is not None]


async def _generate(
    manager: BackendManager,
    model_id: str,
    text: str,
    params: dict[str, Any],
    ctx: RequestContext,
    default_max_tokens: int,
) -> InferOutcome:
    sampling = _sampling(params, default_max_tokens, temperature=1.0)
    count = params.get("num_return_sequences", 1)
    if count > 1 and sampling.temperature == 0:
        # As the Hugging Face pipeline does: greedy decoding would return the same text n times.
        raise InvalidRequestError(
            "num_return_sequences > 1 needs sampling: set temperature above 0 (and do_sample not false)",
            param="parameters.num_return_sequences",
        )
    requests: list[GenerationRequest] = []
    for index in range(count):
        seed = None if sampling.seed is None else sampling.seed + index
        params_i = GenerationParams(sampling.max_tokens, sampling.temperature, sampling.top_p, seed, sampling.stop)
        requests.append(CompletionRequest(text, model_id, params_i))
    results = await _generate_all(manager, requests, ctx)
    # The Hugging Face text-generation pipeline returns the prompt with its continuation.
    prefix = text if params.get("return_full_text", True) else ""
    texts = [prefix + r.text for r in results]
    return _outcome(texts[0] if count == 1 else texts, results, params)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def sentiment_prompt(text: str, variant: int) -> str:
    shift = (2 * variant) % len(_SENTIMENT_EXAMPLES)
    examples = _SENTIMENT_EXAMPLES[shift:] + _SENTIMENT_EXAMPLES[:shift]
    shots = "".join(f"Text: {example}\nSentiment: {label}\n\n" for example, label in examples)
    return f"{shots}Text: {' '.join(text.split())}\nSentiment:"


def parse_label(answer: str) -> str | None:
    match = re.match(r"\s*([A-Za-z]+)", answer)
    word = match.group(1).lower() if match else ""
    return word if word in SENTIMENT_LABELS else None


async def _sentiment(
    manager: BackendManager, model_id: str, text: str, params: dict[str, Any], ctx: RequestContext
) -> InferOutcome:
    votes = params.get("votes", DEFAULT_VOTES)
    greedy = GenerationParams(max_tokens=3, temperature=0.0, stop=("\n",))
    requests: list[GenerationRequest] = [
        CompletionRequest(sentiment_prompt(text, variant), model_id, greedy) for variant in range(votes)
    ]
    results = await _generate_all(manager, requests, ctx)
    labels = [parse_label(r.text) for r in results]
    counts = Counter(label for label in labels if label is not None)
    if not counts:
        raise BackendFailedError(
            f"model {model_id} did not answer with a sentiment label ({', '.join(SENTIMENT_LABELS)}); "
            f"it wrote {results[0].text.strip()!r}"
        )
    best = max(counts.values())
    # Ties go to the label the earliest variant chose.
    label = next(lab for lab in labels if lab is not None and counts[lab] == best)
    score = round(counts[label] / votes, 4)
    return _outcome(
        {"label": label, "score": score},
        results,
        params,
        votes={lab: counts.get(lab, 0) for lab in SENTIMENT_LABELS} | {"unreadable": labels.count(None)},
    )
