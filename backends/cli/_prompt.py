"""What a CLI tool is given, and how much it said: prompt rendering and token estimates.

A command-line tool takes one prompt, so a chat request is flattened:

* System messages (all of them, in order, joined by a blank line) go to `{system}` when
  the template uses that placeholder. Otherwise they lead the prompt, followed by a blank
  line.
* A conversation of one user message is that message's content, verbatim, so
  `claude -p {prompt}` sees exactly what the user typed.
* Anything longer is a plain transcript, one turn per paragraph, each labelled with its
  role, ending with the last message (no trailing "Assistant:" cue: the tools are chat
  models and answer the transcript as a request)::

      User: What is 2+2?

      Assistant: 4.

      User: And times 3?

CLI tools don't report token counts, so every count here is an estimate: one token per
four characters, rounded up (OpenAI's rule of thumb for English text). It feeds both the
usage reported to clients and the `max_tokens` cut.
"""

from __future__ import annotations

import math

from backends.errors import InvalidRequestError
from backends.types import ChatRequest, GenerationRequest

CHARS_PER_TOKEN = 4

_ROLE_LABELS = {"user": "User", "assistant": "Assistant", "tool": "Tool", "system": "System"}


def estimate_tokens(text: str) -> int:
    """Estimated token count of `text`: ceil(chars / 4)."""
    return tokens_for_chars(len(text))


def tokens_for_chars(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def chars_for_tokens(tokens: int) -> int:
    """The most characters whose estimate stays within `tokens`."""
    return max(tokens, 0) * CHARS_PER_TOKEN


def render_request(request: GenerationRequest, *, system_placeholder: bool) -> tuple[str, str]:
    """`(prompt, system)` for the tool; `system` is "" unless `system_placeholder` takes it."""
    if not isinstance(request, ChatRequest):
        return request.prompt, ""
    system = "\n\n".join(m.content for m in request.messages if m.role == "system")
    turns = [m for m in request.messages if m.role != "system"]
    if not turns:
        raise InvalidRequestError("the chat request has no user message to send to the tool", param="messages")
    if len(turns) == 1 and turns[0].role == "user":
        conversation = turns[0].content
    else:
        conversation = "\n\n".join(f"{_ROLE_LABELS[m.role]}: {m.content}" for m in turns)
    if system_placeholder or not system:
        return conversation, system
    return f"{system}\n\n{conversation}", ""
