"""Configuration of backends beyond the embedded local one, and of fallback chains.

Two ways in, which end up as the same list of `BackendConfig` entries:

* TOML `[[backends]]` tables, one per backend (any number, any type);
* the seed systems' provider settings (`INFERENCE_PROVIDER`, `ENABLE_FALLBACK`,
  `FALLBACK_CHAIN`, `OPENAI_API_KEY`, `OPENAI_API_BASE`, `LOCAL_INFERENCE_URL`,
  `LOCAL_MODEL_NAME`), as environment variables or in the TOML `[inference]` table. The
  primary provider gets priority 0 and each fallback in the chain the next tier, so the
  manager only reaches a fallback when every backend of the tiers before it has failed.

`local` names the embedded backend in a fallback chain.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Every server that speaks the OpenAI API is reached by the same adapter; the type names
# a user knows are kept for the status report and the default URLs.
OPENAI_COMPATIBLE = ("openai", "vllm-server", "llamacpp", "tgi", "textgen", "localai", "p2p-node")
BackendKind = Literal[
    "openai",
    "vllm-server",
    "llamacpp",
    "tgi",
    "textgen",
    "localai",
    "p2p-node",
    "ollama",
    "tei",
    "cli",
    "vllm",
    "websocket",
    "mcp",
    "hybrid",
]

# Seed 002's provider names → our backend kinds.
PROVIDER_KINDS: dict[str, BackendKind] = {
    "openai": "openai",
    "ollama": "ollama",
    "vllm": "vllm-server",
    "llamacpp": "llamacpp",
    "textgen": "textgen",
    "tgi": "tgi",
    "localai": "localai",
    "tei": "tei",
}
LOCAL_PROVIDER = "local"

DEFAULT_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "ollama": "http://127.0.0.1:11434",
    "vllm-server": "http://127.0.0.1:8000/v1",
    "llamacpp": "http://127.0.0.1:8080/v1",
    "textgen": "http://127.0.0.1:5000/v1",
    "tgi": "http://127.0.0.1:8080/v1",
    "localai": "http://127.0.0.1:8080/v1",
    "tei": "http://127.0.0.1:8080",
}


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.:/-]+$")
    type: BackendKind
    url: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None  # read the key from this variable at start
    models: list[str] = Field(default_factory=list)  # chat/completion models; empty: discover
    embedding_models: list[str] = Field(default_factory=list)
    rerank_models: list[str] = Field(default_factory=list)
    discover_models: bool = True
    timeout: float = Field(default=300.0, gt=0)
    priority: int = Field(default=0, ge=0)  # fallback tier: 0 first
    # Started by the first request instead of at node start; stopped after idle_timeout.
    lazy: bool = False
    idle_timeout: float = Field(default=300.0, gt=0)
    start_timeout: float = Field(default=600.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)  # type-specific settings

    @model_validator(mode="after")
    def _url_given_or_defaulted(self) -> BackendConfig:
        if self.type == "vllm":  # a vLLM server this node supervises: it has no URL until started
            if "model" not in self.options:
                raise ValueError(f"backend {self.id!r} of type vllm needs options.model (a model id or directory)")
            return self
        if self.type == "hybrid":
            protocols = {"http", "websocket", "mcp"} & set(self.options)
            if not protocols:
                raise ValueError(
                    f"backend {self.id!r} of type hybrid needs at least one of options.http, options.websocket, "
                    "options.mcp (the remote node's URL for that protocol)"
                )
            return self
        if self.type == "mcp":
            command = self.options.get("command")
            if bool(self.url) == bool(command):
                raise ValueError(
                    f"backend {self.id!r} of type mcp needs a url (streamable HTTP) or options.command (stdio)"
                )
            if self.url and not self.url.startswith(("http://", "https://")):
                raise ValueError(f"backend {self.id!r}: an MCP url starts with http:// or https://, got {self.url!r}")
            return self
        if self.type == "cli":
            if "command" not in self.options:
                raise ValueError(f"backend {self.id!r} of type cli needs options.command (e.g. 'llm -m {{model}}')")
            if not self.models:
                raise ValueError(f"backend {self.id!r} of type cli needs models (the names it serves)")
            return self
        if self.url is None:
            default = DEFAULT_URLS.get(self.type)
            if default is None:
                raise ValueError(f"backend {self.id!r} of type {self.type} needs a url")
            self.url = default
        if self.type == "websocket":
            if not self.url.startswith(("ws://", "wss://")):
                raise ValueError(f"backend {self.id!r}: a websocket url starts with ws:// or wss://, got {self.url!r}")
            return self
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"backend {self.id!r}: url {self.url!r} must start with http:// or https://")
        return self


class InferenceConfig(BaseModel):
    """Seed 002's provider settings, under the names its users know."""

    model_config = ConfigDict(extra="forbid")

    provider: str | None = None  # INFERENCE_PROVIDER
    enable_fallback: bool = False  # ENABLE_FALLBACK
    fallback_chain: list[str] = Field(default_factory=list)  # FALLBACK_CHAIN
    openai_api_key: str | None = None  # OPENAI_API_KEY
    openai_api_base: str | None = None  # OPENAI_API_BASE
    local_inference_url: str | None = None  # LOCAL_INFERENCE_URL
    local_model_name: str | None = None  # LOCAL_MODEL_NAME
    timeout: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _known_providers(self) -> InferenceConfig:
        known = sorted([*PROVIDER_KINDS, LOCAL_PROVIDER])
        for name in [self.provider, *self.fallback_chain]:
            if name is not None and name.lower() not in known:
                raise ValueError(f"unknown inference provider {name!r}; expected one of {', '.join(known)}")
        return self

    def chain(self) -> list[str]:
        """Providers in the order they are tried: the primary, then (if enabled) the fallbacks."""
        order = [self.provider.lower()] if self.provider else []
        if self.enable_fallback:
            order += [p.lower() for p in self.fallback_chain if p.lower() not in order]
        return order


def provider_backends(inference: InferenceConfig, configured: list[BackendConfig]) -> tuple[list[BackendConfig], int]:
    """Backends the provider settings add, and the local backend's tier in the chain.

    A provider whose id already has a `[[backends]]` entry keeps that entry, moved to its
    tier in the chain.
    """
    by_id = {b.id: b for b in configured}
    added: list[BackendConfig] = []
    local_priority = 0
    for tier, provider in enumerate(inference.chain()):
        if provider == LOCAL_PROVIDER:
            local_priority = tier
            continue
        if provider in by_id:
            by_id[provider].priority = tier
            continue
        added.append(_provider_backend(provider, tier, inference))
    if inference.provider and inference.provider.lower() != LOCAL_PROVIDER and LOCAL_PROVIDER not in inference.chain():
        # The embedded backend still serves its own models; it's just never a fallback.
        local_priority = len(inference.chain())
    return added, local_priority


def _provider_backend(provider: str, tier: int, inference: InferenceConfig) -> BackendConfig:
    kind = PROVIDER_KINDS[provider]
    if kind == "openai":
        return BackendConfig(
            id=provider,
            type=kind,
            url=inference.openai_api_base or DEFAULT_URLS["openai"],
            api_key=inference.openai_api_key,
            api_key_env=None if inference.openai_api_key else "OPENAI_API_KEY",
            priority=tier,
            timeout=inference.timeout,
        )
    url = inference.local_inference_url or DEFAULT_URLS.get(kind)
    if kind != "ollama" and kind != "tei" and url and not url.rstrip("/").endswith("/v1"):
        url = url.rstrip("/") + "/v1"  # seed 002 gives vLLM's URL without the API prefix
    models = [inference.local_model_name] if inference.local_model_name else []
    return BackendConfig(id=provider, type=kind, url=url, models=models, priority=tier, timeout=inference.timeout)
