"""IncrementalDetokenizer and StopMatcher, with the real SmolLM2 tokenizer where it matters."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.local._text import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def stream(tokenizer: Any, text: str, context: Sequence[int] = ()) -> list[str]:
    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))

    detok = IncrementalDetokenizer(decode, context)
    pieces = [detok.push(token) for token in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "Emoji split across tokens: 🦙🚀 and accents: café, naïve, Ærø.",
        "日本語のテキストも正しく復元されます。",
        "  leading spaces,\n\nnewlines\tand tabs  ",
    ],
)
def test_streamed_pieces_concatenate_to_the_decoded_text(tokenizer: Any, text: str) -> None:
    pieces = stream(tokenizer, text)
    assert "".join(pieces) == tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))


def test_no_piece_ever_contains_half_a_character(tokenizer: Any) -> None:
    pieces = stream(tokenizer, "🦙🦙🦙 日本語 🚀")
    assert all("\ufffd" not in piece for piece in pieces)
    # Multi-byte characters span several tokens, so some pushes must have returned nothing.
    assert "" in pieces


def test_prompt_context_is_never_emitted(tokenizer: Any) -> None:
    context = tokenizer.encode("Question: say hi.", add_special_tokens=False)
    pieces = stream(tokenizer, " hi there", context)
    assert "".join(pieces) == " hi there"


def test_generation_cut_mid_character_drops_the_fragment(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 🦙", add_special_tokens=False)
    detok = IncrementalDetokenizer(lambda i: str(tokenizer.decode(list(i))))
    text = "".join(detok.push(token) for token in ids[:-1]) + detok.flush()
    assert text == "ok "


def test_stop_string_split_across_deltas_is_cut_and_never_shown() -> None:
    matcher = StopMatcher(["</answer>"])
    out = []
    for delta in ["The answer", " is 4</", "ans", "wer> and more"]:
        text, stopped = matcher.push(delta)
        out.append(text)
    assert "".join(out) == "The answer is 4"
    assert stopped and matcher.stopped
    assert matcher.push("anything") == ("", True)


def test_text_that_only_looks_like_a_stop_prefix_is_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("ST") == ("", False)
    assert matcher.held == "ST"
    assert matcher.push("ART") == ("START", False)
    assert matcher.push("S") == ("", False)
    assert matcher.flush() == "S"


def test_earliest_stop_wins_among_several() -> None:
    matcher = StopMatcher(["world", "lo"])
    assert matcher.push("hello world") == ("hel", True)


@given(text=st.text(max_size=40), cuts=st.lists(st.integers(0, 40), max_size=6), stop=st.text(min_size=1, max_size=4))
def test_streaming_matches_cutting_the_whole_text(text: str, cuts: list[int], stop: str) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    matcher = StopMatcher([stop])
    out = ""
    stopped = False
    for start, end in itertools.pairwise(bounds):
        piece, stopped = matcher.push(text[start:end])
        out += piece
        if stopped:
            break
    if not stopped:
        out += matcher.flush()
    index = text.find(stop)
    assert out == (text[:index] if index >= 0 else text)
