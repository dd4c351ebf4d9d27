"""Turning a stream of generated token ids into a stream of safe text.

Two independent, pure pieces (no torch), both fed once per generated token:

* `IncrementalDetokenizer` yields the text each new token completes. Byte-level BPE
  tokenizers split multi-byte characters across tokens, and SentencePiece ones render a
  token differently depending on its left neighbour, so decoding tokens one by one is
  wrong. Like vLLM and TGI, we decode a short window ending at the new token and compare it
  with the same window without it; text is released only once it no longer ends in an
  incomplete character (U+FFFD).
* `StopMatcher` cuts the text at the first stop string, holding back any tail that could
  still turn out to be the start of one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text they newly complete.

    `decode` turns a list of ids into text (e.g. `lambda ids: tok.decode(ids,
    skip_special_tokens=True)`). `context` are ids that precede the generated ones (the end
    of the prompt); they give the first generated tokens the left neighbours they need to
    render correctly but are never emitted.
    """

    # How many ids of the prompt to keep as context: enough for any tokenizer's merge rules
    # to see a word boundary, small enough to keep each decode call cheap.
    CONTEXT_TOKENS = 5

    def __init__(self, decode: Decode, context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context[-self.CONTEXT_TOKENS :]) if context else []
        # The window [prefix_offset, read_offset) has been emitted already and is decoded
        # again only as left context; ids from read_offset on are not yet emitted.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # Context that doesn't decode cleanly (it ends mid-character) would corrupt the
        # comparison below, so drop it rather than emit half a character later.
        if self._ids and self._decode(self._ids).endswith(REPLACEMENT_CHAR):
            self._ids = []
            self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text (often "", never half a char)."""
        self._ids.append(token_id)
        prefix_text = (
            self._decode(self._ids[self._prefix_offset : self._read_offset])
            if self._read_offset > self._prefix_offset
            else ""
        )
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            # Nothing printable yet (special token skipped) or an incomplete UTF-8 sequence:
            # wait for the next token to complete it.
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def flush(self) -> str:
        """Text still held back at the end of generation, minus any unfinished character."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = (
            self._decode(self._ids[self._prefix_offset : self._read_offset])
            if self._read_offset > self._prefix_offset
            else ""
        )
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        # A generation cut off mid-character ends with U+FFFD; that's not text the model said.
        return full_text[len(prefix_text) :].rstrip(REPLACEMENT_CHAR)


class StopMatcher:
    """Cut a stream of text deltas at the first occurrence of any stop string.

    `push(delta)` returns `(text_safe_to_emit, stopped)`. Text that could be the beginning of
    a stop string is held until it's decided; the stop string itself is never emitted. Call
    `flush()` at the end of generation (when no stop matched) to release held text.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self._stops = tuple(sorted({s for s in stops if s}, key=len))
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def held(self) -> str:
        return self._held

    def push(self, delta: str) -> tuple[str, bool]:
        if self._stopped:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        # Earliest start wins: whatever any stop string cuts off is never shown.
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self._stopped = True
            return text[:cut], True
        keep = self._partial_match_length(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best
