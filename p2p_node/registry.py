"""Seed 004's model registry: task names with versions, each mapped onto a model this node serves.

A registered model (`summarizer`, `sentiment`, `generator`...) keeps several versions under
one name; a request names the model and optionally a version, and gets the default version
otherwise (the one configured, else the latest). Each version says what *kind* of work it
does and which concrete model does it: `model = None` means the node's default model for
the kind's task, so the built-in entries follow whatever chat model the node runs.

The seed ran a dedicated model per task (BART for summaries, a RoBERTa classifier for
sentiment, GPT-2 for generation); here summaries and sentiment are done by prompting the
chat model, which is what this node really serves.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backends.errors import InvalidRequestError, ModelNotFoundError
from backends.types import Task


class Kind(enum.StrEnum):
    GENERATE = "generate"  # continue the text (completion)
    SUMMARIZE = "summarize"  # the chat model, asked for a summary
    SENTIMENT = "sentiment"  # the model, shown labelled examples, labels the text
    CHAT = "chat"  # the text is a user message; the result is the reply

    @property
    def task(self) -> Task:
        return Task.CHAT if self in (Kind.SUMMARIZE, Kind.CHAT) else Task.COMPLETION


# ---- parameters -----------------------------------------------------------------------------

MAX_TOKENS_LIMIT = 1_000_000  # the model's context window is the real bound, checked by the backend
MAX_STOP_SEQUENCES = 4
MAX_RETURN_SEQUENCES = 8
MAX_VOTES = 9

_TOKEN_BUDGETS = ("max_new_tokens", "max_tokens", "max_length")

# What each kind accepts in `parameters`. Names follow the Hugging Face pipelines the seed
# used (max_length, min_length, num_return_sequences, do_sample, return_full_text) plus the
# OpenAI ones this node speaks elsewhere (max_tokens, temperature, top_p, seed, stop).
KIND_PARAMETERS: dict[Kind, frozenset[str]] = {
    Kind.GENERATE: frozenset(
        {
            *_TOKEN_BUDGETS,
            "temperature",
            "top_p",
            "seed",
            "stop",
            "num_return_sequences",
            "return_full_text",
            "do_sample",
        }
    ),
    Kind.SUMMARIZE: frozenset({*_TOKEN_BUDGETS, "min_length", "temperature", "seed"}),
    Kind.SENTIMENT: frozenset({"votes"}),
    Kind.CHAT: frozenset({*_TOKEN_BUDGETS, "temperature", "top_p", "seed", "stop", "system"}),
}


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"parameter '{name}' must be an integer, got {value!r}", param=f"parameters.{name}")
    if not low <= value <= high:
        raise InvalidRequestError(
            f"parameter '{name}' must be between {low} and {high}, got {value}", param=f"parameters.{name}"
        )
    return value


def _float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"parameter '{name}' must be a number, got {value!r}", param=f"parameters.{name}")
    if not (low < value if low_open else low <= value) or value > high:
        bound = f"above {low} and at most {high}" if low_open else f"between {low} and {high}"
        raise InvalidRequestError(f"parameter '{name}' must be {bound}, got {value}", param=f"parameters.{name}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(
            f"parameter '{name}' must be true or false, got {value!r}", param=f"parameters.{name}"
        )
    return value


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("parameter 'stop' must be a string or a list of strings", param="parameters.stop")
    if len(stops) > MAX_STOP_SEQUENCES or any(not s or len(s) > 256 for s in stops):
        raise InvalidRequestError(
            f"parameter 'stop' takes at most {MAX_STOP_SEQUENCES} sequences of 1 to 256 characters",
            param="parameters.stop",
        )
    return tuple(stops)


def check_parameters(kind: Kind, parameters: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Parameters for `kind`, checked and normalised; anything the kind cannot honour is refused
    by name rather than ignored. `what` names the model in messages."""
    unknown = sorted(set(parameters) - KIND_PARAMETERS[kind])
    if unknown:
        raise InvalidRequestError(
            f"{what} ({kind.value}) does not support parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; supported: {', '.join(sorted(KIND_PARAMETERS[kind]))}",
            param=f"parameters.{unknown[0]}",
        )
    checked: dict[str, Any] = {}
    for name, value in parameters.items():
        if name in _TOKEN_BUDGETS:
            checked[name] = _int(name, value, 1, MAX_TOKENS_LIMIT)
        elif name == "min_length":
            checked[name] = _int(name, value, 0, MAX_TOKENS_LIMIT)
        elif name == "num_return_sequences":
            checked[name] = _int(name, value, 1, MAX_RETURN_SEQUENCES)
        elif name == "votes":
            checked[name] = _int(name, value, 1, MAX_VOTES)
        elif name == "seed":
            checked[name] = _int(name, value, 0, 2**63 - 1)
        elif name == "temperature":
            checked[name] = _float(name, value, 0.0, 2.0)
        elif name == "top_p":
            checked[name] = _float(name, value, 0.0, 1.0, low_open=True)
        elif name in ("return_full_text", "do_sample"):
            checked[name] = _bool(name, value)
        elif name == "stop":
            checked[name] = list(_stop(value))
        elif name == "system":
            if not isinstance(value, str):
                raise InvalidRequestError("parameter 'system' must be a string", param="parameters.system")
            checked[name] = value
    return checked


# ---- the registry ---------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]*")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    kind: Kind
    model: str | None = None  # None: the node's default model for the kind's task
    parameters: Mapping[str, Any] = field(default_factory=dict)  # defaults under the request's
    description: str = ""

    @property
    def tag(self) -> str:
        """Seed 004's `model_used`: `name:version`."""
        return f"{self.name}:{self.version}"


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order, so v10 comes after v9."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", version))


BUILTIN: tuple[ModelVersion, ...] = (
    ModelVersion("generator", "v1", Kind.GENERATE, description="continues the text with the default chat model"),
    ModelVersion("summarizer", "v1", Kind.SUMMARIZE, description="the default chat model, asked for a summary"),
    ModelVersion(
        "sentiment",
        "v1",
        Kind.SENTIMENT,
        description="the default chat model labels the text positive, negative or neutral from examples",
    ),
)


class ModelRegistry:
    def __init__(self, default_model: str = "summarizer", max_batch_requests: int = 64) -> None:
        self.default_model = default_model
        self.max_batch_requests = max_batch_requests
        self._versions: dict[str, dict[str, ModelVersion]] = {}
        self._defaults: dict[str, str] = {}

    @classmethod
    def builtin(cls) -> ModelRegistry:
        registry = cls()
        for entry in BUILTIN:
            registry.register(entry)
        return registry

    @classmethod
    def from_config(cls, config: RegistryConfig) -> ModelRegistry:
        """The built-in entries, with the configured versions added (or replacing those with
        the same name and version)."""
        registry = cls(config.default_model, config.max_batch_requests)
        for entry in BUILTIN:
            registry.register(entry)
        for name, model in config.models.items():
            for version, spec in model.versions.items():
                registry.register(
                    ModelVersion(name, version, spec.kind, spec.model, dict(spec.parameters), spec.description)
                )
            if model.default_version is not None:
                registry.set_default(name, model.default_version)
        if config.default_model not in registry._versions:
            raise ValueError(f"registry.default_model {config.default_model!r} is not a registered model")
        return registry

    def register(self, entry: ModelVersion, *, default: bool = False) -> None:
        for label, value in (("model name", entry.name), ("version", entry.version)):
            if not _NAME.fullmatch(value):
                raise ValueError(f"{label} {value!r} must be letters, digits, '.', '_', '-' or '/' (no ':')")
        entry = dataclasses.replace(entry, parameters=check_parameters(entry.kind, entry.parameters, entry.tag))
        self._versions.setdefault(entry.name, {})[entry.version] = entry
        if default:
            self._defaults[entry.name] = entry.version

    def set_default(self, name: str, version: str) -> None:
        if version not in self._versions.get(name, {}):
            raise ValueError(f"{name} has no version {version!r} to make its default")
        self._defaults[name] = version

    def names(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, name: str) -> list[ModelVersion]:
        return sorted(self._versions.get(name, {}).values(), key=lambda v: _version_key(v.version))

    def default_version(self, name: str) -> str:
        """The configured default, else the latest version."""
        return self._defaults.get(name) or self.versions(name)[-1].version

    def resolve(self, model: str | None, version: str | None = None) -> ModelVersion:
        """The version a request means. `model` may carry the version itself (`summarizer:v2`)."""
        name = (model or "").strip() or self.default_model
        if version is None and ":" in name:
            name, version = name.split(":", 1)
        versions = self._versions.get(name)
        if not versions:
            raise ModelNotFoundError(
                f"model {name!r} is not in the registry; available: {', '.join(self.names()) or 'none'}",
                param="model",
            )
        chosen = version or self.default_version(name)
        if chosen not in versions:
            known = ", ".join(v.version for v in self.versions(name))
            raise ModelNotFoundError(f"model {name!r} has no version {chosen!r}; versions: {known}", param="version")
        return versions[chosen]


# ---- configuration: the [registry] section ---------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegistryVersionConfig(_Section):
    kind: Kind
    model: str | None = None  # a model id or alias this node serves; empty: the default for the kind
    parameters: dict[str, Any] = Field(default_factory=dict)
    description: str = ""

    @field_validator("model")
    @classmethod
    def _blank_is_default(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class RegistryModelConfig(_Section):
    default_version: str | None = None
    versions: dict[str, RegistryVersionConfig] = Field(default_factory=dict)


class RegistryConfig(_Section):
    """`[registry]`: which model `/infer` uses when a request names none, how many requests one
    `/infer/batch` may carry, and versions added to the built-in generator, summarizer and
    sentiment (or new names), e.g.

        [registry.models.summarizer]
        default_version = "v2"
        versions.v2 = { kind = "summarize", model = "SmolLM2-135M-Instruct", parameters = { max_length = 40 } }
    """

    default_model: str = "summarizer"
    max_batch_requests: int = Field(default=64, ge=1, le=1024)
    models: dict[str, RegistryModelConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> RegistryConfig:
        try:
            ModelRegistry.from_config(self)
        except (ValueError, InvalidRequestError) as exc:
            raise ValueError(getattr(exc, "message", None) or str(exc)) from None
        return self
