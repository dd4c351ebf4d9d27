"""Node configuration: defaults < TOML file < environment variables < command-line flags.

Environment variable names include those the seed systems used (MAX_BATCH_SIZE,
BATCH_TIMEOUT_MS, LOAD_BALANCING_STRATEGY, HEALTH_CHECK_INTERVAL...), so a deployment
moving over keeps its settings. Every problem is reported as one `ConfigError` whose
message names the offending key, never as a traceback.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backends.strategies import Strategy
from p2p_node.config_backends import BackendConfig, InferenceConfig, provider_backends
from p2p_node.registry import RegistryConfig

DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class ConfigError(Exception):
    """A configuration problem, worded for the person starting the node."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # Clients must present one of these (Authorization: Bearer / X-API-Key) when any is set.
    api_keys: list[str] = Field(default_factory=list)


class ModelsConfig(_Section):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    cache_dir: Path = Path("~/.cache/p2p-node/models")
    device: str = "auto"
    default_chat: str = DEFAULT_CHAT_MODEL
    default_embedding: str = DEFAULT_EMBEDDING_MODEL
    default_rerank: str = DEFAULT_EMBEDDING_MODEL
    # The seed systems' model names reach the models this node really ships.
    aliases: dict[str, str] = Field(
        default_factory=lambda: {
            "qwen-coder-1.5b": DEFAULT_CHAT_MODEL,
            "bge-base-en": DEFAULT_EMBEDDING_MODEL,
            "bge-reranker": DEFAULT_EMBEDDING_MODEL,
        }
    )
    chat: dict[str, str] = Field(default_factory=lambda: {DEFAULT_CHAT_MODEL: "builtin:smollm2"})
    embedding: dict[str, str] = Field(default_factory=lambda: {DEFAULT_EMBEDDING_MODEL: "builtin:minilm"})
    rerank: dict[str, str] = Field(
        default_factory=lambda: {DEFAULT_EMBEDDING_MODEL: f"embedding:{DEFAULT_EMBEDDING_MODEL}"}
    )
    # A trained cross-encoder directory; when set it becomes the default rerank model.
    cross_encoder_path: Path | None = None
    preload: list[str] = Field(default_factory=lambda: [DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL])
    max_loaded: int = Field(default=3, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    # Models loaded on demand (not in preload) are unloaded after this many idle seconds; 0: never.
    idle_unload: float = Field(default=300.0, ge=0)

    @field_validator("cache_dir", "cross_encoder_path")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class BatchingConfig(_Section):
    max_batch_size: int = Field(default=8, ge=1, le=256)
    batch_timeout_ms: float = Field(default=10.0, ge=0, le=10_000)


class RoutingConfig(_Section):
    strategy: Strategy = Strategy.LEAST_LOADED
    max_pending_requests: int = Field(default=256, ge=1)
    health_check_interval: float = Field(default=30.0, gt=0)
    health_check_timeout: float = Field(default=5.0, gt=0)
    request_timeout: float = Field(default=300.0, gt=0)
    local_priority: int = Field(default=0, ge=0)  # the embedded backend's fallback tier
    max_attempts: int = Field(default=3, ge=1, le=10)  # backends tried per request before giving up
    failure_threshold: int = Field(default=3, ge=1)  # consecutive failures that eject a backend
    cooldown: float = Field(default=5.0, gt=0)  # first ejection; doubles on each repeated trip
    max_cooldown: float = Field(default=300.0, gt=0)
    # best_performance only: a stream with no first token after hedge_after x the best
    # expected TTFT is also sent to the next-best backend, the faster answer kept; hedges
    # stay under hedge_ratio of requests. hedge_ratio = 0 turns hedging off.
    hedge_after: float = Field(default=2.0, ge=1.0)
    hedge_ratio: float = Field(default=0.1, ge=0.0, le=1.0)

    @field_validator("strategy", mode="before")
    @classmethod
    def _parse_strategy(cls, value: Any) -> Any:
        return Strategy.parse(value) if isinstance(value, str) else value


class DiscoveryConfig(_Section):
    """Probe this machine for inference servers at start (Ollama, vLLM, llama.cpp, TGI, TEI...)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    ports: list[int] = Field(default_factory=lambda: [11434, 8000, 8001, 8080, 5000, 3000])
    timeout: float = Field(default=1.0, gt=0)


PeerProtocol = Literal["http", "websocket"]
_PEER_PROTOCOLS: tuple[PeerProtocol, ...] = ("http", "websocket")


class MeshConfig(_Section):
    """Joining the mesh of nodes over libp2p."""

    enabled: bool = True
    listen: list[str] = Field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    bootstrap: list[str] = Field(default_factory=list)  # /ip4/…/tcp/…/p2p/<peer id> multiaddrs
    mdns: bool = True
    mdns_interfaces: list[str] = Field(default_factory=list)  # empty: every interface
    identity_key: Path = Path("~/.config/p2p-node/identity.key")
    secret: str | None = None  # a private mesh: nodes without it can't connect
    allow_peers: list[str] = Field(default_factory=list)  # empty: any peer (with the secret, if set)
    # Peers are always reached over libp2p; these too, when a peer advertises a reachable HTTP
    # API (bound beyond loopback, or on this machine, and without API keys). Per request the
    # fastest working one is used, and another takes over when one fails.
    peer_protocols: list[PeerProtocol] = Field(default_factory=lambda: list(_PEER_PROTOCOLS))
    # The URL peers should use for this node's HTTP API (behind a proxy or NAT); by default
    # they use the address they reach the node's mesh host at, with the API's port.
    public_url: str | None = None

    @field_validator("identity_key")
    @classmethod
    def _expand_key(cls, value: Path) -> Path:
        return value.expanduser()


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value


class McpConfig(_Section):
    """MCP for agents: at /mcp over HTTP (this section) and on stdio (`p2p-node mcp`)."""

    enabled: bool = True  # serve MCP at /mcp in the node's HTTP app
    # DNS-rebinding protection: Host and Origin headers /mcp accepts besides loopback and
    # server.host ("name", "name:port", "name:*"; "https://name" for origins). "*" in
    # allowed_hosts turns both checks off, for a node behind a proxy that checks them.
    allowed_hosts: list[str] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)


class NodeConfig(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    mcp: McpConfig = Field(default_factory=McpConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)  # seed 004's /infer models
    backends: list[BackendConfig] = Field(default_factory=list)

    def effective(self) -> dict[str, Any]:
        """What the node logs at start: every setting, as it will be used, secrets masked."""
        dumped = self.model_dump(mode="json")
        dumped["server"]["api_keys"] = ["***"] * len(dumped["server"]["api_keys"])
        if dumped["mesh"]["secret"]:
            dumped["mesh"]["secret"] = "***"
        for backend in dumped["backends"]:
            if backend.get("api_key"):
                backend["api_key"] = "***"
        if dumped["inference"].get("openai_api_key"):
            dumped["inference"]["openai_api_key"] = "***"
        return dumped


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _pairs(value: str) -> dict[str, str]:
    """`a=b,c=d` → {"a": "b", "c": "d"}."""
    pairs: dict[str, str] = {}
    for item in _csv(value):
        key, sep, target = item.partition("=")
        if not sep or not key.strip() or not target.strip():
            raise ConfigError(f"expected NAME=MODEL pairs separated by commas, got {item!r}")
        pairs[key.strip()] = target.strip()
    return pairs


# (environment variable, section, key, converter). Several names may set one key: the
# first listed that is present wins.
_ENV: list[tuple[str, str, str, Any]] = [
    ("P2P_NODE_HOST", "server", "host", str),
    ("HF_SERVER_HOST", "server", "host", str),
    ("P2P_NODE_PORT", "server", "port", int),
    ("HF_SERVER_PORT", "server", "port", int),
    ("PORT", "server", "port", int),
    ("P2P_NODE_MAX_BODY_BYTES", "server", "max_body_bytes", int),
    ("P2P_NODE_SHUTDOWN_GRACE", "server", "shutdown_grace_s", float),
    ("P2P_NODE_API_KEYS", "server", "api_keys", _csv),
    ("P2P_NODE_MODEL_CACHE", "models", "cache_dir", str),
    ("P2P_NODE_DEVICE", "models", "device", str),
    ("DEFAULT_CHAT_MODEL", "models", "default_chat", str),
    ("DEFAULT_EMBEDDING_MODEL", "models", "default_embedding", str),
    ("DEFAULT_RERANK_MODEL", "models", "default_rerank", str),
    ("P2P_NODE_MODEL_ALIASES", "models", "aliases", _pairs),
    ("P2P_NODE_CROSS_ENCODER_PATH", "models", "cross_encoder_path", str),
    ("P2P_NODE_PRELOAD", "models", "preload", _csv),
    ("P2P_NODE_MAX_LOADED_MODELS", "models", "max_loaded", int),
    ("P2P_NODE_DEFAULT_MAX_TOKENS", "models", "default_max_tokens", int),
    ("P2P_NODE_IDLE_UNLOAD", "models", "idle_unload", float),
    ("MAX_BATCH_SIZE", "batching", "max_batch_size", int),
    ("BATCH_TIMEOUT_MS", "batching", "batch_timeout_ms", float),
    ("LOAD_BALANCING_STRATEGY", "routing", "strategy", str),
    ("P2P_NODE_MAX_PENDING_REQUESTS", "routing", "max_pending_requests", int),
    ("HEALTH_CHECK_INTERVAL", "routing", "health_check_interval", float),
    ("BACKEND_HEALTH_CHECK_INTERVAL", "routing", "health_check_interval", float),
    ("HEALTH_CHECK_TIMEOUT", "routing", "health_check_timeout", float),
    ("P2P_NODE_REQUEST_TIMEOUT", "routing", "request_timeout", float),
    ("P2P_NODE_DISCOVERY", "discovery", "enabled", _bool),
    ("P2P_NODE_MESH", "mesh", "enabled", _bool),
    ("P2P_NODE_MESH_LISTEN", "mesh", "listen", _csv),
    ("LIBP2P_BOOTSTRAP_PEERS", "mesh", "bootstrap", _csv),
    ("LIBP2P_ENABLE_MDNS", "mesh", "mdns", _bool),
    ("P2P_NODE_MDNS_INTERFACES", "mesh", "mdns_interfaces", _csv),
    ("P2P_NODE_IDENTITY_KEY", "mesh", "identity_key", str),
    ("P2P_NODE_MESH_SECRET", "mesh", "secret", str),
    ("P2P_NODE_ALLOW_PEERS", "mesh", "allow_peers", _csv),
    ("P2P_NODE_PEER_PROTOCOLS", "mesh", "peer_protocols", _csv),
    ("P2P_NODE_PUBLIC_URL", "mesh", "public_url", str),
    ("P2P_NODE_MCP_ENABLED", "mcp", "enabled", _bool),
    ("P2P_NODE_MCP_ALLOWED_HOSTS", "mcp", "allowed_hosts", _csv),
    ("P2P_NODE_MCP_ALLOWED_ORIGINS", "mcp", "allowed_origins", _csv),
    ("P2P_NODE_MAX_ATTEMPTS", "routing", "max_attempts", int),
    ("P2P_NODE_FAILURE_THRESHOLD", "routing", "failure_threshold", int),
    ("P2P_NODE_EJECTION_COOLDOWN", "routing", "cooldown", float),
    ("P2P_NODE_HEDGE_AFTER", "routing", "hedge_after", float),
    ("P2P_NODE_HEDGE_RATIO", "routing", "hedge_ratio", float),
    ("P2P_NODE_LOG_LEVEL", "logging", "level", str.upper),
    ("LOG_LEVEL", "logging", "level", str.upper),
    ("P2P_NODE_LOG_FORMAT", "logging", "format", str.lower),
    # Seed 002's provider settings.
    ("INFERENCE_PROVIDER", "inference", "provider", str.lower),
    ("ENABLE_FALLBACK", "inference", "enable_fallback", _bool),
    ("FALLBACK_CHAIN", "inference", "fallback_chain", _csv),
    ("OPENAI_API_KEY", "inference", "openai_api_key", str),
    ("OPENAI_API_BASE", "inference", "openai_api_base", str),
    ("LOCAL_INFERENCE_URL", "inference", "local_inference_url", str),
    ("LOCAL_MODEL_NAME", "inference", "local_model_name", str),
    ("LOCAL_INFERENCE_TIMEOUT", "inference", "timeout", float),
    # Seed 004's /infer: the registered model a request without `model` gets.
    ("DEFAULT_MODEL", "registry", "default_model", str),
    ("P2P_NODE_MAX_BATCH_REQUESTS", "registry", "max_batch_requests", int),
]

ENV_VARIABLES = sorted({name for name, *_ in _ENV} | {"P2P_NODE_CONFIG"})


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> NodeConfig:
    env = os.environ if env is None else env
    if path is None and env.get("P2P_NODE_CONFIG"):
        path = Path(env["P2P_NODE_CONFIG"])
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(path)
    applied: set[tuple[str, str]] = set()
    for name, section, key, convert in _ENV:
        raw = env.get(name)
        if raw is None or (raw == "" and convert is not _csv) or (section, key) in applied:
            continue
        try:
            value = convert(raw)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"environment variable {name}={raw!r} is invalid: {exc}") from None
        data.setdefault(section, {})[key] = value
        applied.add((section, key))
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                data.setdefault(section, {})[key] = value
    try:
        config = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    return _apply_backends(_apply_cross_encoder(config), env)


def _apply_backends(config: NodeConfig, env: Mapping[str, str]) -> NodeConfig:
    added, local_priority = provider_backends(config.inference, config.backends)
    config.backends = [*config.backends, *added]
    if config.inference.provider:
        config.routing.local_priority = local_priority
    seen = {"local"}
    for backend in config.backends:
        if backend.id in seen:
            raise ConfigError(f"backend id {backend.id!r} is used twice (and 'local' is the embedded backend)")
        seen.add(backend.id)
        if backend.api_key is None and backend.api_key_env:
            backend.api_key = env.get(backend.api_key_env) or None
        if backend.type == "openai" and not backend.api_key and "api.openai.com" in (backend.url or ""):
            raise ConfigError(
                f"backend {backend.id!r} talks to api.openai.com and needs an API key: "
                f"set OPENAI_API_KEY, or api_key / api_key_env in its [[backends]] entry"
            )
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.expanduser().open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        problems.append(f"{key}: {error['msg']}")
    return f"invalid configuration{where}: " + "; ".join(problems)


def _apply_cross_encoder(config: NodeConfig) -> NodeConfig:
    models = config.models
    if models.cross_encoder_path is None:
        return config
    if not models.cross_encoder_path.is_dir():
        raise ConfigError(f"models.cross_encoder_path {models.cross_encoder_path} is not a directory")
    models.rerank = {**models.rerank, "cross-encoder": str(models.cross_encoder_path)}
    models.default_rerank = "cross-encoder"
    # The seed's reranker name should reach the real reranker, not the cosine stand-in.
    if models.aliases.get("bge-reranker") == DEFAULT_EMBEDDING_MODEL:
        models.aliases = {**models.aliases, "bge-reranker": "cross-encoder"}
    return config
