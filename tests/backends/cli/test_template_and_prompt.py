"""Command templates and prompt rendering: the pure parts of the CLI backend."""

from __future__ import annotations

import pytest

from backends.cli import CliBackendSettings, CommandTemplate, estimate_tokens, render_request
from backends.errors import InvalidRequestError
from backends.types import ChatRequest, CompletionRequest, GenerationParams, Message

PARAMS = GenerationParams(max_tokens=16)


def test_placeholders_are_substituted_after_splitting_so_values_stay_one_argument() -> None:
    template = CommandTemplate.parse("llm -m {model} '--system={system}' {prompt} {{literal}}")
    argv = template.render({"model": "gpt 4", "system": "be terse", "prompt": "a 'b'; rm -rf / && $(id)"})
    assert argv == ["llm", "-m", "gpt 4", "--system=be terse", "a 'b'; rm -rf / && $(id)", "{literal}"]
    assert template.executable == "llm"
    assert template.placeholders == {"model", "system", "prompt"}


@pytest.mark.parametrize(
    ("command", "complaint"),
    [
        ("", "the command is empty"),
        ("   ", "the command is empty"),
        ("llm {prompt", "malformed braces"),
        ("llm prompt}", "malformed braces"),
        ("llm {promt}", "unknown placeholder {promt}"),
        ("llm {}", "unknown placeholder {}"),
        ("llm {prompt.upper}", "unknown placeholder {prompt.upper}"),
        ("llm {max_tokens:d}", "takes no format spec or conversion"),
        ("llm {prompt!r}", "takes no format spec or conversion"),
        ("llm 'unclosed {prompt}", "no closing quotation"),
        ("{model} {prompt}", "the executable (the first word) must be fixed text"),
    ],
)
def test_a_bad_template_is_a_one_line_error_naming_it(command: str, complaint: str) -> None:
    with pytest.raises(ValueError) as raised:
        CommandTemplate.parse(command)
    message = str(raised.value)
    assert complaint in message
    assert repr(command) in message
    assert "\n" not in message


def test_settings_reject_a_bad_template_naming_the_backend() -> None:
    with pytest.raises(ValueError, match=r"^CLI backend 'claude': invalid command template 'claude -p \{pompt\}'"):
        CliBackendSettings("claude", "claude -p {pompt}", models=["claude"])


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"models": []}, "at least one"),
        ({"models": "claude"}, "must be a list"),
        ({"models": ["a", "a"]}, "twice"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"kill_grace_s": -1}, "kill_grace_s"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_settings_reject_unusable_values(overrides: dict[str, object], complaint: str) -> None:
    values: dict[str, object] = {"backend_id": "b", "command": "tool {prompt}", "models": ["m"], **overrides}
    with pytest.raises(ValueError, match=complaint):
        CliBackendSettings(**values)  # type: ignore[arg-type]


def test_a_single_user_message_is_sent_verbatim() -> None:
    request = ChatRequest((Message("user", "What is 2+2?"),), "m", PARAMS)
    assert render_request(request, system_placeholder=False) == ("What is 2+2?", "")


def test_system_messages_go_to_the_system_placeholder_when_the_template_has_one() -> None:
    request = ChatRequest((Message("system", "Be terse."), Message("user", "Hi")), "m", PARAMS)
    assert render_request(request, system_placeholder=True) == ("Hi", "Be terse.")
    assert render_request(request, system_placeholder=False) == ("Be terse.\n\nHi", "")


def test_a_conversation_is_rendered_as_a_plain_transcript() -> None:
    request = ChatRequest(
        (
            Message("system", "Be terse."),
            Message("user", "What is 2+2?"),
            Message("assistant", "4."),
            Message("user", "And times 3?"),
        ),
        "m",
        PARAMS,
    )
    prompt, system = render_request(request, system_placeholder=False)
    assert prompt == "Be terse.\n\nUser: What is 2+2?\n\nAssistant: 4.\n\nUser: And times 3?"
    assert system == ""


def test_a_chat_without_user_turns_is_rejected() -> None:
    request = ChatRequest((Message("system", "Be terse."),), "m", PARAMS)
    with pytest.raises(InvalidRequestError, match="no user message"):
        render_request(request, system_placeholder=True)


def test_a_completion_prompt_is_sent_as_is() -> None:
    assert render_request(CompletionRequest("Once upon", "m", PARAMS), system_placeholder=True) == ("Once upon", "")


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("abc", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)])
def test_token_estimate_is_a_quarter_of_the_characters_rounded_up(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens
