"""Stand-in Ollama and text-embeddings-inference servers for the remote backend tests.

Neither server can run here, so these speak their wire formats (Ollama's native `/api/*`
NDJSON API, TEI's `/info`, `/embed`, `/rerank` and its error bodies and `x-compute-tokens`
header) over real HTTP on a loopback port, served by hypercorn's trio worker.

Their "models" are deterministic functions of the input so tests can assert exact output:
generation echoes the last user message (or the prompt) word by word, embeddings are
`standin_vector(text)`, and a rerank score is the share of query words found in a text.

Test hooks: `fail(path, status, body)` queues an error reply, `delay_for` makes chosen
requests slow, `line_delay_s` paces streamed lines, `die_after_lines` drops the connection
mid-stream, `error_after_lines` sends Ollama's in-stream `{"error": ...}` line. Every
request is recorded in `requests`; streams the client abandoned are counted in
`disconnects` (and set `disconnected`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

Handler = Callable[[Request, "Received"], Any]


def standin_vector(text: str) -> list[float]:
    """The stand-ins' embedding "model": three features anyone can recompute."""
    return [float(len(text)), float(len(text.split())), float(sum(map(ord, text)) % 97)]


def normalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


def echo_tokens(text: str) -> list[str]:
    """The generation "model": the words of `text`, each but the first with its leading space."""
    return [word if i == 0 else " " + word for i, word in enumerate(text.split())]


def overlap_score(query: str, text: str) -> float:
    """The rerank "model": the share of the query's words that occur in the text."""
    wanted = set(query.lower().split())
    return len(wanted & set(text.lower().split())) / len(wanted) if wanted else 0.0


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class _Failure:
    status: int
    body: dict[str, Any] | str
    headers: dict[str, str]
    times: int


@dataclass
class StandIn:
    """What both stand-ins share: serving, recording, and the failure hooks."""

    requests: list[Received] = field(default_factory=list)
    line_delay_s: float = 0.0
    die_after_lines: int | None = None
    error_after_lines: int | None = None
    delay_for: Callable[[Received], float] | None = None
    disconnects: int = 0
    completed_streams: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""
    disconnected: trio.Event = field(default_factory=trio.Event)
    _failures: dict[str, list[_Failure]] = field(default_factory=dict)

    def fail(
        self,
        path: str,
        status: int,
        body: dict[str, Any] | str,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next `times` requests to `path` get this reply instead of an answer."""
        self._failures.setdefault(path, []).append(_Failure(status, body, headers or {}, times))

    def received(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def route(self, path: str, handler: Handler, methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            received = Received(request.method, request.url.path, dict(request.headers), body)
            self.requests.append(received)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.delay_for is not None:
                    await trio.sleep(self.delay_for(received))
                failure = self._take_failure(path)
                if failure is not None:
                    if isinstance(failure.body, str):
                        return PlainTextResponse(failure.body, failure.status, headers=failure.headers)
                    return JSONResponse(failure.body, failure.status, headers=failure.headers)
                response: Response = await handler(request, received)
                return response
            finally:
                self.in_flight -= 1

        return Route(path, endpoint, methods=methods)

    def _take_failure(self, path: str) -> _Failure | None:
        queue = self._failures.get(path)
        if not queue:
            return None
        failure = queue[0]
        failure.times -= 1
        if failure.times <= 0:
            queue.pop(0)
        return failure

    def stream(self, lines: list[dict[str, Any]], error_line: dict[str, Any] | None = None) -> Response:
        return _NDJSONStream(self, lines, error_line)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.graceful_timeout = 0.5
        app = Starlette(routes=self.routes())
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, app, config)  # type: ignore[arg-type]
            self.url = binds[0]
            task_status.started(self.url)


class _NDJSONStream(Response):
    """A chunked `application/x-ndjson` reply that honours the stand-in's stream hooks and
    notices when the client hangs up before the end."""

    def __init__(self, standin: StandIn, lines: list[dict[str, Any]], error_line: dict[str, Any] | None) -> None:
        # No Response.__init__: it would declare a Content-Length, and this body is chunked.
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"application/x-ndjson")]
        self.standin = standin
        self.lines = lines
        self.error_line = error_line

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        standin = self.standin
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def watch_for_hangup(cancel_scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            standin.disconnects += 1
            standin.disconnected.set()
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_for_hangup, nursery.cancel_scope)
            for i, line in enumerate(self.lines):
                if standin.die_after_lines is not None and i == standin.die_after_lines:
                    # Returning without the closing chunk makes hypercorn drop the connection.
                    nursery.cancel_scope.cancel()
                    return
                if standin.error_after_lines is not None and i == standin.error_after_lines:
                    error = self.error_line or {"error": "an error was encountered while running the model"}
                    await send({"type": "http.response.body", "body": _ndjson(error), "more_body": True})
                    break
                await trio.sleep(standin.line_delay_s)
                await send({"type": "http.response.body", "body": _ndjson(line), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            standin.completed_streams += 1
            nursery.cancel_scope.cancel()


def _ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"  # Go's encoding/json is compact


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


# ---- Ollama ---------------------------------------------------------------------------


@dataclass
class OllamaModel:
    name: str  # as /api/tags lists it, with its tag: "llama3.2:latest"
    family: str = "llama"
    embedding: bool = False
    context_length: int | None = None
    embedding_length: int | None = None


@dataclass
class OllamaStandIn(StandIn):
    models: list[OllamaModel] = field(
        default_factory=lambda: [
            OllamaModel("llama3.2:latest"),
            OllamaModel("nomic-embed-text:latest", family="nomic-bert", embedding=True),
        ]
    )
    # Newer Ollama lists capabilities in /api/tags; older ones do not.
    advertise_capabilities: bool = False
    loaded: dict[str, Any] = field(default_factory=dict)  # name -> keep_alive of the last request

    def routes(self) -> list[Route]:
        return [
            self.route("/api/tags", self._tags, ["GET"]),
            self.route("/api/ps", self._ps, ["GET"]),
            self.route("/api/version", self._version, ["GET"]),
            self.route("/api/chat", self._chat, ["POST"]),
            self.route("/api/generate", self._generate, ["POST"]),
            self.route("/api/embed", self._embed, ["POST"]),
        ]

    def _find(self, name: str) -> OllamaModel | None:
        full = name if ":" in name else f"{name}:latest"
        return next((m for m in self.models if m.name == full), None)

    def _describe(self, model: OllamaModel) -> dict[str, Any]:
        details: dict[str, Any] = {
            "parent_model": "",
            "format": "gguf",
            "family": model.family,
            "families": [model.family],
            "parameter_size": "137M" if model.embedding else "3.2B",
            "quantization_level": "F16" if model.embedding else "Q4_K_M",
        }
        if model.context_length is not None:
            details["context_length"] = model.context_length
        if model.embedding_length is not None:
            details["embedding_length"] = model.embedding_length
        entry: dict[str, Any] = {
            "name": model.name,
            "model": model.name,
            "modified_at": "2025-10-01T12:00:00.000000Z",
            "size": 274302450 if model.embedding else 2019393189,
            "digest": hashlib.sha256(model.name.encode()).hexdigest(),
            "details": details,
        }
        if self.advertise_capabilities:
            entry["capabilities"] = ["embedding"] if model.embedding else ["completion"]
        return entry

    async def _tags(self, request: Request, received: Received) -> Response:
        return JSONResponse({"models": [self._describe(m) for m in self.models]})

    async def _ps(self, request: Request, received: Received) -> Response:
        running = []
        for model in self.models:
            if model.name in self.loaded:
                entry = self._describe(model)
                entry.update(
                    expires_at="2099-01-01T00:00:00Z",
                    size_vram=entry["size"],
                    context_length=model.context_length or 4096,
                )
                running.append(entry)
        return JSONResponse({"models": running})

    async def _version(self, request: Request, received: Received) -> Response:
        return JSONResponse({"version": "0.12.6"})

    def _not_found(self, name: str) -> Response:
        return JSONResponse({"error": f"model '{name}' not found"}, 404)

    def _generation(self, received: Received, text: str, prompt_tokens: int, key: str) -> Response:
        body = received.body
        options = body.get("options") or {}
        tokens = echo_tokens(text)
        reason = "stop"
        stops = set(options.get("stop") or [])
        for i, token in enumerate(tokens):
            if token.strip() in stops:
                tokens = tokens[:i]
                break
        limit = options.get("num_predict")
        if isinstance(limit, int) and 0 <= limit < len(tokens):
            tokens, reason = tokens[:limit], "length"

        def piece(content: str) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": content}} if key == "message" else {"response": content}

        lines = [{"model": body["model"], "created_at": _now(), **piece(t), "done": False} for t in tokens]
        final = {
            "model": body["model"],
            "created_at": _now(),
            **piece(""),
            "done": True,
            "done_reason": reason,
            "total_duration": 5_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 1_000_000,
            "eval_count": len(tokens),
            "eval_duration": 3_000_000,
        }
        if key == "response":
            final["context"] = list(range(prompt_tokens + len(tokens)))
        return self.stream([*lines, final])

    async def _chat(self, request: Request, received: Received) -> Response:
        body = received.body
        model = self._find(body["model"])
        if model is None:
            return self._not_found(body["model"])
        if model.embedding:
            return JSONResponse({"error": f'"{body["model"]}" does not support chat'}, 400)
        self.loaded[model.name] = body.get("keep_alive")
        messages = body["messages"]
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return self._generation(received, last_user, prompt_tokens, "message")

    async def _generate(self, request: Request, received: Received) -> Response:
        body = received.body
        model = self._find(body["model"])
        if model is None:
            return self._not_found(body["model"])
        keep_alive = body.get("keep_alive")
        if not body.get("prompt"):
            # Ollama's load/unload: an empty prompt answers with one JSON object, not a stream.
            unload = keep_alive in (0, "0", "0s", "0m")
            if unload:
                self.loaded.pop(model.name, None)
            else:
                self.loaded[model.name] = keep_alive
            reply = {
                "model": body["model"],
                "created_at": _now(),
                "response": "",
                "done": True,
                "done_reason": "unload" if unload else "load",
            }
            return JSONResponse(reply)
        self.loaded[model.name] = keep_alive
        return self._generation(received, body["prompt"], len(body["prompt"].split()), "response")

    async def _embed(self, request: Request, received: Received) -> Response:
        body = received.body
        model = self._find(body["model"])
        if model is None:
            return self._not_found(body["model"])
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.loaded[model.name] = body.get("keep_alive")
        return JSONResponse(
            {
                "model": body["model"],
                "embeddings": [normalized(standin_vector(text)) for text in inputs],
                "total_duration": 14_143_917,
                "load_duration": 1_019_500,
                "prompt_eval_count": sum(len(text.split()) for text in inputs),
            }
        )


# ---- text-embeddings-inference ------------------------------------------------------


@dataclass
class TEIStandIn(StandIn):
    model_id: str = "BAAI/bge-small-en-v1.5"
    kind: str = "embedding"  # "embedding", "reranker" or "classifier", as /info's model_type key
    max_client_batch_size: int = 32
    max_input_length: int = 512
    payload_limit: int = 2_000_000
    token_headers: bool = True  # real TEI always sends them; off to test the fallback
    api_key: str | None = None
    healthy: bool = True

    def routes(self) -> list[Route]:
        return [
            self.route("/info", self._info, ["GET"]),
            self.route("/health", self._health, ["GET"]),
            self.route("/embed", self._embed, ["POST"]),
            self.route("/rerank", self._rerank, ["POST"]),
        ]

    def _refused(self, received: Received) -> Response | None:
        if self.api_key is not None and received.headers.get("authorization") != f"Bearer {self.api_key}":
            return Response(status_code=401)
        return None

    @staticmethod
    def _error(status: int, message: str, error_type: str) -> Response:
        # TEI serializes its ErrorType variants by name: "Validation", "Overloaded", "Backend"...
        return JSONResponse({"error": message, "error_type": error_type}, status)

    def _headers(self, tokens: int, chars: int) -> dict[str, str]:
        if not self.token_headers:
            return {}
        return {
            "x-compute-type": "cpu",
            "x-compute-time": "3",
            "x-compute-characters": str(chars),
            "x-compute-tokens": str(tokens),
            "x-total-time": "3",
            "x-tokenization-time": "0",
            "x-queue-time": "0",
            "x-inference-time": "2",
        }

    def _too_large(self, request: Request, received: Received) -> Response | None:
        if int(request.headers.get("content-length", "0")) > self.payload_limit:
            # axum's body limit rejection: plain text, not TEI's JSON error shape.
            return PlainTextResponse("Failed to buffer the request body: length limit exceeded", 413)
        return None

    async def _info(self, request: Request, received: Received) -> Response:
        if self.kind == "embedding":
            model_type: dict[str, Any] = {"embedding": {"pooling": "cls"}}
        else:
            model_type = {self.kind: {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
        return JSONResponse(
            {
                "model_id": self.model_id,
                "model_sha": "5c38ec7c405ec4b44b94cc5a9bb96e735b38267a",
                "model_dtype": "float32",
                "served_model_name": self.model_id,
                "model_type": model_type,
                "max_concurrent_requests": 512,
                "max_input_length": self.max_input_length,
                "max_batch_tokens": 16384,
                "max_batch_requests": None,
                "max_client_batch_size": self.max_client_batch_size,
                "auto_truncate": False,
                "tokenization_workers": 2,
                "version": "1.8.2",
                "sha": None,
                "docker_label": None,
            }
        )

    async def _health(self, request: Request, received: Received) -> Response:
        if not self.healthy:
            return self._error(503, "unhealthy", "Unhealthy")
        return Response(status_code=200)

    def _batch_problem(self, items: list[Any], name: str) -> Response | None:
        if not items:
            return self._error(400, f"`{name}` cannot be empty", "Empty")
        if len(items) > self.max_client_batch_size:
            message = f"batch size {len(items)} > maximum allowed batch size {self.max_client_batch_size}"
            return self._error(422, message, "Validation")
        return None

    async def _embed(self, request: Request, received: Received) -> Response:
        refused = self._refused(received) or self._too_large(request, received)
        if refused is not None:
            return refused
        inputs = received.body["inputs"]
        inputs = inputs if isinstance(inputs, list) else [inputs]
        problem = self._batch_problem(inputs, "inputs")
        if problem is not None:
            return problem
        if self.kind != "embedding":
            return self._error(424, "model is not an embedding model", "Backend")
        vectors = [standin_vector(text) for text in inputs]
        if received.body.get("normalize", True):
            vectors = [normalized(v) for v in vectors]
        tokens = sum(len(text.split()) for text in inputs)
        return JSONResponse(vectors, headers=self._headers(tokens, sum(map(len, inputs))))

    async def _rerank(self, request: Request, received: Received) -> Response:
        refused = self._refused(received) or self._too_large(request, received)
        if refused is not None:
            return refused
        query, texts = received.body["query"], received.body["texts"]
        problem = self._batch_problem(texts, "texts")
        if problem is not None:
            return problem
        if self.kind != "reranker":
            return self._error(424, "model is not a re-ranker model", "Backend")
        ranks = [{"index": i, "score": overlap_score(query, text)} for i, text in enumerate(texts)]
        # TEI sorts ascending then reverses: ties come out in reverse index order.
        ranks.sort(key=lambda r: r["score"])
        ranks.reverse()
        if received.body.get("return_text"):
            for rank in ranks:
                rank["text"] = texts[rank["index"]]
        tokens = sum(len(query.split()) + len(text.split()) for text in texts)
        return JSONResponse(ranks, headers=self._headers(tokens, sum(map(len, texts)) + len(query) * len(texts)))
