"""Builds backend adapters from their configuration (used by the composition root only)."""

from __future__ import annotations

from backends.base import Backend
from backends.remote.openai_compat import OpenAIBackendSettings, OpenAICompatibleBackend
from backends.types import ModelCard, Task
from p2p_node.config import ConfigError
from p2p_node.config_backends import OPENAI_COMPATIBLE, BackendConfig


def build_backend(config: BackendConfig) -> Backend:
    if config.type in OPENAI_COMPATIBLE:
        backend: Backend = _openai_compatible(config)
    else:
        raise ConfigError(f"backend {config.id!r}: type {config.type!r} is not available in this build")
    backend.priority = config.priority
    return backend


def _openai_compatible(config: BackendConfig) -> OpenAICompatibleBackend:
    unknown = set(config.options) - {"connect_timeout", "headers"}
    if unknown:
        raise ConfigError(f"backend {config.id!r}: unknown options {sorted(unknown)} for type {config.type}")
    cards = tuple(
        ModelCard(name, task, owned_by=config.id) for name in config.models for task in (Task.CHAT, Task.COMPLETION)
    )
    assert config.url is not None  # BackendConfig fills in the default
    return OpenAICompatibleBackend(
        OpenAIBackendSettings(
            backend_id=config.id,
            base_url=config.url,
            api_key=config.api_key,
            models=cards,
            embedding_models=tuple(config.embedding_models),
            rerank_models=tuple(config.rerank_models),
            discover_models=config.discover_models,
            timeout_s=config.timeout,
            connect_timeout_s=float(config.options.get("connect_timeout", 5.0)),
            headers={str(k): str(v) for k, v in dict(config.options.get("headers", {})).items()},
            name=f"{config.id} ({config.type})",
        )
    )
