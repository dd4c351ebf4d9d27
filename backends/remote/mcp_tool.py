"""An inference tool on a remote MCP server, as a backend (the official `mcp` client).

By default the tool is p2p-node's own `route_inference_request`, whose arguments and
structured result we know, and whose `list_models` tool tells what the server serves.
Another server's tool works too: name it, map our argument names onto its own
(`arguments = {"prompt": "question"}`), say where its answer is (`text_field`, else the
first text content), and list the models it serves. Transports: streamable HTTP (`url`) or
a stdio subprocess (`command`). A tool error whose message starts with one of our error
codes ("model_not_found: ...") becomes that error; any other is a backend failure.

MCP tool calls answer whole, so a generation arrives as one chunk.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import trio

from backends.base import Backend
from backends.errors import KNOWN_CODES, BackendFailedError, BackendUnavailableError, InferenceError, error_from_code
from backends.types import (
    BackendStatus,
    BackendType,
    Capabilities,
    ChatRequest,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    RequestContext,
    RerankHit,
    RerankRequest,
    RerankResult,
    Task,
    Usage,
)
from mcp import Client, StdioServerParameters

log = logging.getLogger(__name__)

OUR_TOOL = "route_inference_request"


@dataclass(frozen=True)
class McpBackendSettings:
    backend_id: str
    url: str | None = None  # streamable HTTP, e.g. http://10.0.0.5:8000/mcp
    command: tuple[str, ...] = ()  # or a stdio server: argv
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    tool: str = OUR_TOOL
    arguments: dict[str, str] = field(default_factory=dict)  # our name -> the tool's
    text_field: str = "text"
    models: tuple[str, ...] = ()  # chat/completion models a foreign tool serves
    discover_models: bool = True
    timeout_s: float = 300.0
    reconnect_max_backoff_s: float = 30.0
    probe_interval_s: float = 5.0  # how often the session is checked while idle
    name: str | None = None


class McpBackend(Backend):
    backend_type = BackendType.MCP

    def __init__(self, settings: McpBackendSettings) -> None:
        if bool(settings.url) == bool(settings.command):
            raise ValueError(f"MCP backend {settings.backend_id!r} needs exactly one of url or command")
        super().__init__(settings.backend_id, settings.name)
        self.settings = settings
        self._client: Client | None = None
        self._discovered: tuple[ModelCard, ...] = ()
        self._ready = trio.Event()

    @property
    def endpoint(self) -> str | None:
        return self.settings.url or " ".join(self.settings.command)

    # ---- session -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stay_connected)
            with trio.move_on_after(10):  # don't hold the node back for a server that's down
                await self._ready.wait()
            task_status.started()

    def _target(self) -> Any:
        if self.settings.command:
            command, *args = self.settings.command
            return StdioServerParameters(command=command, args=args, env=self.settings.env or None)
        if self.settings.api_key:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            http = httpx2.AsyncClient(
                headers={"authorization": f"Bearer {self.settings.api_key}"},
                timeout=httpx2.Timeout(30, read=self.settings.timeout_s),
            )
            return streamable_http_client(str(self.settings.url), http_client=http)
        return self.settings.url

    async def _stay_connected(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with Client(self._target(), read_timeout_seconds=self.settings.timeout_s) as client:
                    tools = {tool.name for tool in (await client.list_tools()).tools}
                    if self.settings.tool not in tools:
                        raise ValueError(f"the server has no tool {self.settings.tool!r} (it has {sorted(tools)})")
                    self._client = client
                    await self._discover(client, tools)
                    self.status, self.status_detail = BackendStatus.HEALTHY, ""
                    backoff = 0.5
                    self._ready.set()
                    while True:
                        await trio.sleep(self.settings.probe_interval_s)
                        # Not `ping`: the 2026-07-28 protocol removed it, and a server speaking
                        # that version answers "method not found". Listing tools is in every version.
                        with trio.fail_after(10):
                            await client.list_tools(cache_mode="bypass")
            except Exception as exc:  # the SDK raises many kinds: all mean "not connected"
                self.status_detail = f"{self.endpoint}: {exc or type(exc).__name__}"
                log.info("MCP backend %s: %s", self.id, self.status_detail)
            finally:
                self._client = None
            self.status = BackendStatus.UNHEALTHY
            self._ready.set()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.reconnect_max_backoff_s)

    async def _discover(self, client: Client, tools: set[str]) -> None:
        if not (self.settings.discover_models and self.settings.tool == OUR_TOOL and "list_models" in tools):
            return
        result = await client.call_tool("list_models", {})
        cards = []
        for entry in (result.structured_content or {}).get("models", []):
            if entry.get("alias_of"):
                continue
            for task in entry.get("tasks", []):
                try:
                    cards.append(
                        ModelCard(str(entry["id"]), Task.parse(task), entry.get("context_window"), owned_by=self.id)
                    )
                except ValueError:
                    continue
        self._discovered = tuple(cards)

    async def check_health(self) -> BackendStatus:
        return BackendStatus.HEALTHY if self._client is not None else BackendStatus.UNHEALTHY

    # ---- what it offers ------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        cards = {(c.id, c.task): c for c in self._discovered}
        for name in self.settings.models:
            for task in (Task.CHAT, Task.COMPLETION):
                cards.setdefault((name, task), ModelCard(name, task, owned_by=self.id))
        models = tuple(cards.values())
        return Capabilities(
            tasks=frozenset(c.task for c in models), models=models, streaming=False, protocols=frozenset({"mcp"})
        )

    def describe(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "tool": self.settings.tool, "connected": self._client is not None}

    # ---- inference -----------------------------------------------------------------------

    def _arguments(self, request: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"task": request.task.value, "model": request.model}
        if isinstance(request, EmbeddingRequest):
            args["inputs"] = list(request.inputs)
        elif isinstance(request, RerankRequest):
            args.update(query=request.query, documents=list(request.documents), top_n=request.top_n)
        else:
            p = request.params
            args.update(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed)
            if p.stop:
                args["stop"] = list(p.stop)
            if isinstance(request, ChatRequest):
                args["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            else:
                args["prompt"] = request.prompt
        args = {k: v for k, v in args.items() if v is not None}
        if self.settings.tool != OUR_TOOL:
            if isinstance(request, ChatRequest) and "prompt" not in args:
                # Foreign tools take text, not our message list: one user message is its
                # content; a conversation is rendered "role: content" per line.
                messages = request.messages
                single = len(messages) == 1 and messages[0].role == "user"
                args["prompt"] = (
                    messages[0].content if single else "\n".join(f"{m.role}: {m.content}" for m in messages)
                )
            args = {self.settings.arguments[k]: v for k, v in args.items() if k in self.settings.arguments}
        return args

    async def _call(self, request: Any, ctx: RequestContext) -> tuple[dict[str, Any], str]:
        client = self._client
        if client is None:
            raise BackendUnavailableError(f"backend {self.id}: not connected to {self.endpoint}")
        timeout = self.settings.timeout_s
        if ctx.deadline is not None:
            timeout = max(0.001, min(timeout, ctx.deadline - trio.current_time() + 1.0))
        try:
            result = await client.call_tool(self.settings.tool, self._arguments(request), read_timeout_seconds=timeout)
        except InferenceError:
            raise
        except Exception as exc:
            raise BackendUnavailableError(f"backend {self.id}: the tool call failed: {exc}") from None
        text = "".join(getattr(part, "text", "") for part in result.content)
        if result.is_error:
            # Ours start "code: message"; SDKs may prefix it ("Error executing tool x: code: ...").
            parts = text.split(": ")
            for i, part in enumerate(parts[:-1]):
                if part.strip() in KNOWN_CODES:
                    raise error_from_code(part.strip(), f"backend {self.id}: {': '.join(parts[i + 1 :])}")
            raise BackendFailedError(f"backend {self.id}: {text}")
        return dict(result.structured_content or {}), text

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        data, text = await self._call(request, ctx)
        answer = data.get(self.settings.text_field, text) if data else text
        if not isinstance(answer, str):
            raise BackendFailedError(f"backend {self.id}: the tool's answer has no text")
        usage = data.get("usage") or {}
        if answer:
            yield GenerationChunk(answer)
        reason: FinishReason = "length" if data.get("finish_reason") == "length" else "stop"
        yield GenerationChunk(
            "",
            finish_reason=reason,
            usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
        )

    async def embed(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResult:
        data, _ = await self._call(request, ctx)
        try:
            vectors = tuple(tuple(float(x) for x in v) for v in data["embeddings"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendFailedError(f"backend {self.id}: malformed embeddings: {exc}") from None
        return EmbeddingResult(
            vectors, Usage(int((data.get("usage") or {}).get("prompt_tokens", 0))), request.model, self.id
        )

    async def rerank(self, request: RerankRequest, ctx: RequestContext) -> RerankResult:
        data, _ = await self._call(request, ctx)
        try:
            hits = tuple(RerankHit(int(r["index"]), float(r["relevance_score"])) for r in data["results"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendFailedError(f"backend {self.id}: malformed rerank results: {exc}") from None
        return RerankResult(hits, Usage(int((data.get("usage") or {}).get("prompt_tokens", 0))), request.model, self.id)
