"""Builds backend adapters from their configuration (used by the composition root only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backends.base import Backend
from backends.cli import CliBackend, CliBackendSettings
from backends.discovery import DiscoveredServer
from backends.gpu import VllmBackend, VllmSettings
from backends.hybrid import HybridBackend
from backends.lifecycle import LazyBackend
from backends.remote.mcp_tool import OUR_TOOL, McpBackend, McpBackendSettings
from backends.remote.ollama import OllamaBackend, OllamaSettings
from backends.remote.openai_compat import OpenAIBackendSettings, OpenAICompatibleBackend
from backends.remote.tei import TEIBackend, TEISettings
from backends.remote.websocket import WebSocketBackend, WebSocketBackendSettings
from backends.types import ModelCard, Task
from p2p_node.config import ConfigError
from p2p_node.config_backends import OPENAI_COMPATIBLE, BackendConfig

_COMMON_OPTIONS = {"connect_timeout", "headers"}


def build_backend(config: BackendConfig) -> Backend:
    backend: Backend
    if config.type in OPENAI_COMPATIBLE:
        _check_options(config, {"http_client"})
        backend = _openai_compatible(config)
    elif config.type == "ollama":
        _check_options(config, {"keep_alive", "raw_completions"})
        if config.rerank_models:
            raise ConfigError(f"backend {config.id!r}: Ollama has no rerank endpoint; remove rerank_models")
        backend = OllamaBackend(
            OllamaSettings(
                **_common(config),
                models=tuple(config.models) if (config.models or not config.discover_models) else None,
                embedding_models=tuple(config.embedding_models),
                keep_alive=config.options.get("keep_alive"),
                raw_completions=bool(config.options.get("raw_completions", False)),
            )
        )
    elif config.type == "tei":
        _check_options(config, {"normalize", "truncate", "max_parallel_batches"})
        names = [*config.models, *config.embedding_models, *config.rerank_models]
        backend = TEIBackend(
            TEISettings(
                **_common(config),
                model_name=names[0] if len(names) == 1 else None,
                normalize=bool(config.options.get("normalize", True)),
                truncate=bool(config.options.get("truncate", True)),
                max_parallel_batches=int(config.options.get("max_parallel_batches", 4)),
            )
        )
    elif config.type == "vllm":
        _check_options(config, {*_VLLM_OPTIONS, "extra_args", "executable", "env"})
        backend = _vllm(config)
    elif config.type == "websocket":
        _check_options(config, {"ping_interval"})
        assert config.url is not None
        backend = WebSocketBackend(
            WebSocketBackendSettings(
                backend_id=config.id,
                url=config.url,
                api_key=config.api_key,
                timeout_s=config.timeout,
                connect_timeout_s=float(config.options.get("connect_timeout", 5.0)),
                ping_interval_s=float(config.options.get("ping_interval", 5.0)),
                name=f"{config.id} (websocket)",
            )
        )
    elif config.type == "mcp":
        _check_options(config, {"command", "env", "tool", "arguments", "text_field"})
        options = config.options
        command = options.get("command") or []
        backend = McpBackend(
            McpBackendSettings(
                backend_id=config.id,
                url=config.url,
                command=tuple(str(a) for a in (command if isinstance(command, list) else str(command).split())),
                env={str(k): str(v) for k, v in dict(options.get("env", {})).items()},
                api_key=config.api_key,
                tool=str(options.get("tool", OUR_TOOL)),
                arguments={str(k): str(v) for k, v in dict(options.get("arguments", {})).items()},
                text_field=str(options.get("text_field", "text")),
                models=tuple(config.models),
                discover_models=config.discover_models,
                timeout_s=config.timeout,
                name=f"{config.id} (mcp)",
            )
        )
    elif config.type == "hybrid":
        _check_options(config, {"http", "websocket", "mcp"})
        backend = HybridBackend(config.id, _hybrid_children(config), name=f"{config.id} (hybrid)")
    elif config.type == "cli":
        _check_options(config, {"command", "env", "cwd", "max_concurrency", "kill_grace_s"})
        backend = _cli(config)
    else:
        raise ConfigError(f"backend {config.id!r}: type {config.type!r} is not available in this build")
    backend.priority = config.priority
    if config.lazy:
        return LazyBackend(backend, idle_timeout_s=config.idle_timeout, start_timeout_s=config.start_timeout)
    return backend


def config_for_discovered(server: DiscoveredServer) -> BackendConfig:
    known = ("ollama", "tei", "tgi", "vllm-server", "llamacpp", "p2p-node")
    kind = server.kind if server.kind in known else "openai"
    # A discovered OpenAI-compatible server on this machine needs no key: "openai" here
    # only names the protocol.
    return BackendConfig(id=f"{kind}-{server.port}", type=kind, url=server.url)  # type: ignore[arg-type]


_VLLM_OPTIONS = {
    "model": str,
    "host": str,
    "port": int,
    "tensor_parallel_size": int,
    "gpu_memory_utilization": float,
    "max_model_len": int,
    "max_num_seqs": int,
    "dtype": str,
    "quantization": str,
    "num_attention_heads": int,
    "log_path": Path,
}


def _vllm(config: BackendConfig) -> VllmBackend:
    options = config.options
    try:
        typed = {k: _VLLM_OPTIONS[k](v) for k, v in options.items() if k in _VLLM_OPTIONS}
        executable = options.get("executable", "vllm")
        settings = VllmSettings(
            **typed,
            backend_id=config.id,
            served_model_name=config.models[0] if config.models else None,
            extra_args=tuple(str(a) for a in options.get("extra_args", ())),
            executable=tuple(str(a) for a in executable) if isinstance(executable, list) else str(executable),
            env={str(k): str(v) for k, v in dict(options.get("env", {})).items()},
            api_key=config.api_key,
            request_timeout_s=config.timeout,
            startup_timeout_s=config.start_timeout,
            # Lazy: the first request waits for the server; otherwise the node serves while it loads.
            started_when_ready=config.lazy,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"backend {config.id!r}: invalid vllm options: {exc}") from None
    return VllmBackend(settings)


def _cli(config: BackendConfig) -> CliBackend:
    options = config.options
    try:
        settings = CliBackendSettings(
            backend_id=config.id,
            command=str(options["command"]),
            models=tuple(config.models),
            timeout_s=config.timeout,
            env={str(k): str(v) for k, v in dict(options.get("env", {})).items()},
            cwd=options.get("cwd"),
            max_concurrency=int(options.get("max_concurrency", 4)),
            kill_grace_s=float(options.get("kill_grace_s", 2.0)),
            name=f"{config.id} (cli)",
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    return CliBackend(settings)


def _hybrid_children(config: BackendConfig) -> list[Backend]:
    """One child per protocol of the same remote node, ids `<id>/http`, `<id>/ws`, `<id>/mcp`."""
    kinds = {"http": ("http", "p2p-node"), "websocket": ("ws", "websocket"), "mcp": ("mcp", "mcp")}
    children = []
    for option, (suffix, kind) in kinds.items():
        if option in config.options:
            child = BackendConfig.model_validate(
                {
                    "id": f"{config.id}/{suffix}",
                    "type": kind,
                    "url": str(config.options[option]),
                    "api_key": config.api_key,
                    "timeout": config.timeout,
                }
            )
            children.append(build_backend(child))
    return children


def _check_options(config: BackendConfig, allowed: set[str]) -> None:
    unknown = set(config.options) - allowed - _COMMON_OPTIONS
    if unknown:
        raise ConfigError(f"backend {config.id!r}: unknown options {sorted(unknown)} for type {config.type}")


def _common(config: BackendConfig) -> dict[str, Any]:
    assert config.url is not None  # BackendConfig fills in the default
    return {
        "backend_id": config.id,
        "base_url": config.url,
        "api_key": config.api_key,
        "timeout_s": config.timeout,
        "connect_timeout_s": float(config.options.get("connect_timeout", 5.0)),
        "headers": {str(k): str(v) for k, v in dict(config.options.get("headers", {})).items()},
        "name": f"{config.id} ({config.type})",
    }


def _openai_compatible(config: BackendConfig) -> OpenAICompatibleBackend:
    tasks = (Task.CHAT, Task.COMPLETION)
    cards = tuple(ModelCard(name, task, owned_by=config.id) for name in config.models for task in tasks)
    http_client = str(config.options.get("http_client", "auto"))
    if http_client not in ("auto", "httpx"):
        raise ConfigError(f'backend {config.id!r}: http_client must be "auto" or "httpx", not {http_client!r}')
    return OpenAICompatibleBackend(
        OpenAIBackendSettings(
            **_common(config),
            http_client=http_client,
            models=cards,
            embedding_models=tuple(config.embedding_models),
            rerank_models=tuple(config.rerank_models),
            discover_models=config.discover_models,
        )
    )
