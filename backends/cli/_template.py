"""Command templates: the user's `claude -p {prompt}` turned into an argv per request.

The template is split into words with POSIX shell rules (`shlex`) once, when the backend
is built; placeholders are substituted into each word afterwards. A prompt full of
spaces, quotes or `;` therefore lands in exactly one argv element and no shell ever sees
it. Placeholder syntax is `str.format`'s, restricted to plain names: `{prompt}`,
`{model}`, `{system}`, `{max_tokens}`, `{temperature}`; write `{{` and `}}` for literal
braces.
"""

from __future__ import annotations

import shlex
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass

PLACEHOLDERS: frozenset[str] = frozenset({"prompt", "model", "system", "max_tokens", "temperature"})

_KNOWN = ", ".join("{" + name + "}" for name in sorted(PLACEHOLDERS))


@dataclass(frozen=True)
class _Piece:
    literal: str
    placeholder: str | None  # substituted after `literal`, None for a trailing literal


@dataclass(frozen=True)
class CommandTemplate:
    """A validated command template. Build it with `CommandTemplate.parse`."""

    source: str
    words: tuple[tuple[_Piece, ...], ...]

    @classmethod
    def parse(cls, template: str) -> CommandTemplate:
        """Split and validate; raise a one-line `ValueError` naming the template if it is unusable."""

        def invalid(why: str) -> ValueError:
            return ValueError(f"invalid command template {template!r}: {why}")

        try:
            raw_words = shlex.split(template)
        except ValueError as exc:  # "No closing quotation", "No escaped character"
            raise invalid(f"{str(exc).lower()} (quote it as a POSIX shell would)") from None
        if not raw_words:
            raise invalid("the command is empty")
        words = tuple(_parse_word(word, invalid) for word in raw_words)
        if any(piece.placeholder for piece in words[0]):
            raise invalid("the executable (the first word) must be fixed text, not a placeholder")
        return cls(template, words)

    @property
    def executable(self) -> str:
        return "".join(piece.literal for piece in self.words[0])

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(piece.placeholder for word in self.words for piece in word if piece.placeholder)

    def uses(self, placeholder: str) -> bool:
        return placeholder in self.placeholders

    def render(self, values: Mapping[str, str]) -> list[str]:
        """The argv for one request: every placeholder in every word replaced by its value."""
        return [
            "".join(piece.literal + (values[piece.placeholder] if piece.placeholder else "") for piece in word)
            for word in self.words
        ]


def _parse_word(word: str, invalid: Callable[[str], ValueError]) -> tuple[_Piece, ...]:
    try:
        parsed = list(string.Formatter().parse(word))
    except ValueError as exc:  # "Single '}' encountered", "expected '}' before end of string"...
        raise invalid(f"malformed braces in {word!r} ({exc}); double a brace to write it literally") from None
    pieces: list[_Piece] = []
    for literal, name, spec, conversion in parsed:
        if name is None:
            pieces.append(_Piece(literal, None))
            continue
        if name not in PLACEHOLDERS:
            shown = "{" + name + "}" if name else "{}"
            raise invalid(f"unknown placeholder {shown}; known placeholders are {_KNOWN}")
        if spec or conversion:
            raise invalid(f"placeholder {{{name}}} takes no format spec or conversion")
        pieces.append(_Piece(literal, name))
    return tuple(pieces)
