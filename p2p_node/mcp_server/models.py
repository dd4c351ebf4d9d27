"""Typed inputs and outputs of the node's MCP tools.

The SDK turns these into each tool's input and output JSON schemas, so an agent sees
exactly which fields it may send and what comes back (`structured_content`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class BackendSummary(BaseModel):
    id: str
    name: str
    type: str = Field(description="local, gpu, api, cli, p2p, websocket, mcp or hybrid")
    status: str = Field(description="healthy, degraded, unhealthy, offline, initializing or unknown")
    status_detail: str = ""
    routable: bool = Field(description="whether the manager sends new requests to it now")
    priority: int = Field(description="fallback tier: lower tiers are tried first")
    endpoint: str | None = None
    tasks: list[str]
    models: list[str]
    loaded_models: list[str]
    in_flight: int
    queue_size: int
    circuit_open: bool = Field(description="ejected after repeated failures, until its cooldown ends")


class BackendList(BaseModel):
    strategy: str
    accepting: bool = Field(description="false while the node shuts down")
    pending_requests: int
    backends: list[BackendSummary]


class BackendChoice(BaseModel):
    task: str
    model: str = Field(description="the concrete model id the request would use (aliases resolved)")
    backend_id: str
    backend_type: str
    status: str
    strategy: str
    candidates: list[str] = Field(description="every backend serving this task and model")
    preferred_types_matched: bool | None = Field(
        default=None, description="null without preferred_types; false when no backend of those types could serve"
    )


class TaskInfo(BaseModel):
    task: str
    default_model: str | None
    models: list[str]
    backends: list[str]


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class PeerInfo(BaseModel):
    peer_id: str
    backend_id: str | None = Field(description="the peer as a backend of this node, once it advertised models")
    connected: bool
    rtt_ms: float | None
    addrs: list[str]
    models: list[str]
    load: dict[str, object]
    version: str | None
    advert_age_s: float


class PeerList(BaseModel):
    mesh_enabled: bool
    peer_id: str | None = Field(description="this node's libp2p peer id")
    addrs: list[str] = Field(description="this node's mesh addresses, for other nodes to bootstrap from")
    peers: list[PeerInfo]


class ModelEntry(BaseModel):
    id: str
    tasks: list[str]
    loaded: bool
    backends: list[str]
    context_window: int | None = None
    dimensions: int | None = None
    alias_of: str | None = None


class ModelList(BaseModel):
    models: list[ModelEntry]
    default_models: dict[str, str]


class ModelAction(BaseModel):
    status: Literal["loaded", "unloaded"]
    model_id: str = Field(description="the concrete model id (aliases resolved)")
    backends: list[str]


class TokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RankedDocument(BaseModel):
    index: int = Field(description="position of the document in the request's documents")
    relevance_score: float
    document: str


class InferenceOutcome(BaseModel):
    task: str
    model: str
    backend_id: str = Field(description="the backend that served the request")
    request_id: str
    latency_ms: float
    usage: TokenUsage
    text: str | None = Field(default=None, description="chat and completion")
    finish_reason: Literal["stop", "length"] | None = Field(default=None, description="chat and completion")
    embeddings: list[list[float]] | None = Field(default=None, description="embedding: one vector per input")
    dimensions: int | None = Field(default=None, description="embedding")
    results: list[RankedDocument] | None = Field(default=None, description="rerank: best first")
