"""The small vocabulary every other module builds on.

Requests and results here are protocol-neutral: the HTTP layer, the WebSocket
layer, the MCP tools and (later) the libp2p wire format all translate into and
out of these types, and every backend consumes them. Nothing in this module
knows about a transport or an engine.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal


class Task(enum.StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    RERANK = "rerank"

    @classmethod
    def parse(cls, name: str) -> Task:
        """Accept our names and the task names older systems used (seed 001 and HF pipelines)."""
        key = name.strip().lower().replace("_", "-")
        try:
            return _TASK_ALIASES[key]
        except KeyError:
            raise ValueError(f"unknown task {name!r}; expected one of {sorted(_TASK_ALIASES)}") from None


_TASK_ALIASES: dict[str, Task] = {
    "chat": Task.CHAT,
    "chat-completion": Task.CHAT,
    "completion": Task.COMPLETION,
    "text-generation": Task.COMPLETION,
    "generate": Task.COMPLETION,
    "embedding": Task.EMBEDDING,
    "embeddings": Task.EMBEDDING,
    "text-embedding": Task.EMBEDDING,
    "feature-extraction": Task.EMBEDDING,
    "rerank": Task.RERANK,
    "reranking": Task.RERANK,
    "text-ranking": Task.RERANK,
}


class BackendType(enum.StrEnum):
    LOCAL = "local"  # in-process torch/transformers on the detected device
    GPU = "gpu"  # a supervised GPU engine (vLLM) on this machine
    API = "api"
    CLI = "cli"
    P2P = "p2p"
    WEBSOCKET = "websocket"
    MCP = "mcp"
    HYBRID = "hybrid"


class BackendStatus(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    OFFLINE = "offline"
    INITIALIZING = "initializing"
    UNKNOWN = "unknown"

    @property
    def routable(self) -> bool:
        """Whether the manager may send new requests to a backend in this state.

        INITIALIZING and UNKNOWN are routable on purpose: a lazy backend starts on its
        first request, and a backend that was never checked should be tried, not starved.
        """
        return self in (
            BackendStatus.HEALTHY,
            BackendStatus.DEGRADED,
            BackendStatus.INITIALIZING,
            BackendStatus.UNKNOWN,
        )


@dataclass(frozen=True)
class ModelCard:
    """One model a backend can serve."""

    id: str
    task: Task
    context_window: int | None = None
    loaded: bool = False
    owned_by: str = "p2p-node"
    dimensions: int | None = None  # embedding models


@dataclass(frozen=True)
class Capabilities:
    tasks: frozenset[Task]
    models: tuple[ModelCard, ...] = ()
    streaming: bool = True
    batching: bool = False
    hardware: frozenset[str] = frozenset()
    protocols: frozenset[str] = frozenset()
    context_window: int | None = None
    # Can take over an answer another backend began (a Continuation): failover target.
    continuation: bool = False

    def serves(self, task: Task, model: str) -> bool:
        return any(card.id == model and card.task == task for card in self.models)

    def card(self, task: Task, model: str) -> ModelCard | None:
        for card in self.models:
            if card.id == model and card.task == task:
                return card
        return None


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant", "tool"]
    content: str


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Continuation:
    """An answer already begun elsewhere (failover): generation continues after it.

    `token_ids` are the tokens behind `text` when the first backend reported them; a
    backend serving the same model appends them to the prompt as they are, so greedy
    decoding continues exactly where the other one stopped. Without them, `text` is
    appended and re-tokenized.
    """

    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    model: str
    params: GenerationParams
    task: Literal[Task.CHAT] = Task.CHAT
    continuation: Continuation | None = None


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    model: str
    params: GenerationParams
    task: Literal[Task.COMPLETION] = Task.COMPLETION
    continuation: Continuation | None = None


GenerationRequest = ChatRequest | CompletionRequest


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: tuple[str, ...]
    model: str
    task: Literal[Task.EMBEDDING] = Task.EMBEDDING


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: tuple[str, ...]
    model: str
    top_n: int | None = None
    task: Literal[Task.RERANK] = Task.RERANK


InferenceRequest = ChatRequest | CompletionRequest | EmbeddingRequest | RerankRequest


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of streamed output. The last chunk of a stream carries finish_reason and usage."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    token_ids: tuple[int, ...] = ()  # the tokens behind `text`, where the backend knows them


def token_ids_from(value: object) -> tuple[int, ...]:
    """Token ids as a remote sent them (a JSON or msgpack list); anything else means none."""
    return tuple(int(i) for i in value) if isinstance(value, list) else ()


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    usage: Usage
    model: str
    backend_id: str


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: tuple[tuple[float, ...], ...]
    usage: Usage
    model: str = ""
    backend_id: str = ""


@dataclass(frozen=True)
class RerankHit:
    index: int
    relevance_score: float


@dataclass(frozen=True)
class RerankResult:
    hits: tuple[RerankHit, ...]  # sorted by relevance_score, best first, cut to top_n
    usage: Usage
    model: str = ""
    backend_id: str = ""


@dataclass
class RequestContext:
    """What travels with a request through every layer and, later, across peers.

    `deadline` is an absolute `trio.current_time()` value or None; `hops` lists the node
    ids a request has already passed through so the mesh can refuse to forward in a loop.
    """

    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    deadline: float | None = None
    hops: tuple[str, ...] = ()
    served_by: str | None = None  # set by the manager to the backend that took the request


# Hops over HTTP (and in WebSocket messages): the node ids a request passed through, so that
# a node reached by a peer over HTTP serves it here and never forwards it again.
HOPS_HEADER = "x-p2p-node-hops"
MAX_HOPS = 16


def parse_hops(value: str | Sequence[object] | None) -> tuple[str, ...]:
    """Hops as a header (comma-separated) or a list; bounded, blanks dropped."""
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(h.strip()[:128] for h in items if h.strip())[:MAX_HOPS]
