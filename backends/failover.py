"""Failover mid-answer: what the client has already seen, and the request that lets
another backend carry on from there.

When a backend breaks after tokens reached the client, the manager asks another backend
that serves the model and can take a `Continuation` to go on after the text already sent,
with the tokens that text came from when they are known (then greedy decoding continues
exactly), and with `max_tokens` reduced by what was already generated. The client sees
one unbroken stream: nothing lost, nothing repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from backends.errors import InferenceError, ShuttingDownError
from backends.resilience import is_backend_fault
from backends.types import Continuation, GenerationChunk, GenerationRequest, Usage


@dataclass
class AnswerSoFar:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    ids_complete: bool = True  # every chunk so far carried its token ids
    chunks: int = 0
    handed_over: bool = False  # a continuation is running: usage must be merged
    # At the latest handover: tokens already generated, and how many of them the
    # continuation received as prompt ids.
    tokens_before: int = 0
    ids_before: int = 0

    def add(self, chunk: GenerationChunk) -> None:
        if not chunk.text:
            return
        self.text += chunk.text
        self.chunks += 1
        if chunk.token_ids:
            self.token_ids.extend(chunk.token_ids)
        else:
            self.ids_complete = False

    @property
    def tokens(self) -> int:
        # Without ids, one chunk per token is what streaming servers send: an estimate.
        return len(self.token_ids) if self.ids_complete else self.chunks

    def continued(self, original: GenerationRequest) -> GenerationRequest | None:
        """The request that finishes the answer elsewhere; None if nothing is left to generate."""
        remaining = original.params.max_tokens - self.tokens
        if remaining <= 0:
            return None
        self.handed_over = True
        ids = tuple(self.token_ids) if self.ids_complete else ()
        self.tokens_before, self.ids_before = self.tokens, len(ids)
        return replace(
            original,
            params=replace(original.params, max_tokens=remaining),
            continuation=Continuation(self.text, ids),
        )

    def merged(self, usage: Usage) -> Usage:
        """Usage as the client's one answer: the continuation counted the shown tokens as prompt."""
        if not self.handed_over:
            return usage
        return Usage(max(usage.prompt_tokens - self.ids_before, 0), usage.completion_tokens + self.tokens_before)

    def final_chunk(self) -> GenerationChunk:
        """When the first backend broke exactly at max_tokens: the answer is complete."""
        return GenerationChunk("", finish_reason="length", usage=Usage(0, self.tokens))


def may_fail_over(exc: BaseException, *, attempts: int, max_attempts: int) -> bool:
    """A backend broke mid-answer through no fault of the request: worth continuing elsewhere."""
    if attempts >= max_attempts or isinstance(exc, ShuttingDownError):
        return False
    return isinstance(exc, InferenceError) and is_backend_fault(exc)
