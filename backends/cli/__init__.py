"""Command-line tools (`claude -p`, `ollama run`, `llm`...) as inference backends."""

from backends.cli._prompt import estimate_tokens, render_request
from backends.cli._template import PLACEHOLDERS, CommandTemplate
from backends.cli.backend import CliBackend, CliBackendSettings

__all__ = [
    "PLACEHOLDERS",
    "CliBackend",
    "CliBackendSettings",
    "CommandTemplate",
    "estimate_tokens",
    "render_request",
]
