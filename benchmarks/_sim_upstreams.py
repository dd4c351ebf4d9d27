"""Simulated OpenAI-compatible upstreams for the routing and overhead benchmarks.

    python benchmarks/_sim_upstreams.py --spec '[{"name": "fast", "port": 9101, "ttft_s": 0.05, "tpot_s": 0.01}]'

One process serves every upstream of the spec, each on its own loopback port, and prints
`READY` on stdout once all listen. Sleeping is the simulated work, so the process stays
light and leaves the CPU to the routers being measured. The HTTP/1.1 server is a small
hand-written one on asyncio streams (keep-alive, Content-Length or chunked request bodies,
chunked responses) because a framework would cost more CPU per token than the routers do.

Endpoints, in OpenAI's wire format:

* `POST /v1/chat/completions`, streamed (SSE `chat.completion.chunk` events: a first
  chunk with the role, one chunk per token, a chunk with `finish_reason`, a usage chunk
  with empty `choices` when `stream_options.include_usage` is set, then `data: [DONE]`)
  or not (`chat.completion` with usage). Every answer is exactly `max_tokens` tokens long
  (`finish_reason: "length"`); the words are a deterministic function of the prompt.
* `GET /v1/models`.
* Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}`.

Benchmark controls, outside the OpenAI API: `POST /_sim/reset` restarts an upstream's
clock (for the mid-run degradation), reseeds its failure draws and zeroes its counters;
`GET /_sim/stats` returns those counters (requests, failed, completed, max_in_flight, and
connections accepted).

Profile of an upstream (JSON keys): `ttft_s` (time to first token when idle), `tpot_s`
(time per output token when idle), `capacity`, `degrade_after_s` and `degrade_factor`
(from that many seconds after start or reset, TTFT and TPOT are multiplied by the
factor), `failure_rate` (that fraction of chat requests, drawn from a seeded RNG, is
answered at once with a 500), `seed`.

Capacity model (processor sharing, like a batching server whose batch is full): an
upstream serves up to `capacity` requests at full speed; with n > capacity requests in
flight, each one's TTFT and every token's time are stretched by n / capacity, so the
upstream's total token rate saturates at capacity / tpot_s. The factor is read again
before every token, so a request slows down and speeds up as others come and go.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

MODEL = "sim-model"
WORDS = (
    "the quick brown fox jumps over a lazy dog while river stones hum quietly under "
    "morning light and distant bells ring across green hills near old stone bridges"
).split()


@dataclass
class Profile:
    name: str
    port: int
    ttft_s: float = 0.05
    tpot_s: float = 0.01
    capacity: int = 4
    degrade_after_s: float | None = None
    degrade_factor: float = 1.0
    failure_rate: float = 0.0
    seed: int = 0
    # Tokens due on a schedule (first at TTFT, then every TPOT) rather than each one a sleep
    # after the previous send: a token that leaves late because this shared machine's cores
    # were busy does not push back the ones after it, as on a real server, whose GPU keeps
    # generating while its HTTP side waits for a core.
    scheduled: bool = False


class HttpError(Exception):
    def __init__(self, status: int, message: str, error_type: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.code = status, message, error_type, code


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


class Upstream:
    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.reset()

    def reset(self) -> None:
        self.started = time.monotonic()
        self.rng = random.Random(self.profile.seed)
        self.in_flight = 0
        self.stats = {"requests": 0, "failed": 0, "completed": 0, "max_in_flight": 0, "connections": 0}

    # ---- the simulated work -------------------------------------------------------------

    def _stretch(self) -> float:
        p = self.profile
        degraded = p.degrade_after_s is not None and time.monotonic() - self.started >= p.degrade_after_s
        return (p.degrade_factor if degraded else 1.0) * max(1.0, self.in_flight / p.capacity)

    async def _first_token(self, clock: _Clock) -> None:
        await clock.wait(self.profile.ttft_s * self._stretch())

    async def _next_token(self, clock: _Clock) -> None:
        await clock.wait(self.profile.tpot_s * self._stretch())

    # ---- HTTP ---------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1  # how well clients keep connections alive
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, target, version = request_line.decode("latin-1").split()
                headers: dict[str, str] = {}
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    key, _, value = line.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = await _read_body(reader, headers)
                await self.dispatch(method, target.split("?")[0], body, writer)
                if version != "HTTP/1.1" or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    async def dispatch(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            if path in ("/v1/models", "/models") and method == "GET":
                created = int(time.time())
                models = [{"id": MODEL, "object": "model", "created": created, "owned_by": self.profile.name}]
                await _send_json(writer, 200, {"object": "list", "data": models})
            elif path in ("/v1/chat/completions", "/chat/completions") and method == "POST":
                await self.chat(body, writer)
            elif path == "/_sim/reset" and method == "POST":
                self.reset()
                await _send_json(writer, 200, {"ok": True})
            elif path == "/_sim/stats" and method == "GET":
                await _send_json(writer, 200, {"name": self.profile.name, **self.stats})
            else:
                raise HttpError(404, f"Unknown request URL: {method} {path}.", "invalid_request_error", "unknown_url")
        except HttpError as exc:
            error = {"message": exc.message, "type": exc.error_type, "param": None, "code": exc.code}
            await _send_json(writer, exc.status, {"error": error})

    async def chat(self, raw: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            body = json.loads(raw)
            messages = body["messages"]
            prompt = " ".join(str(m.get("content", "")) for m in messages)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HttpError(400, "We could not parse the JSON body of your request.", "invalid_request_error") from None
        model = body.get("model")
        if model != MODEL:
            message = f"The model `{model}` does not exist or you do not have access to it."
            raise HttpError(404, message, "invalid_request_error", "model_not_found")
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        self.stats["requests"] += 1
        if self.rng.random() < self.profile.failure_rate:
            self.stats["failed"] += 1
            raise HttpError(500, "The server had an error while processing your request.", "server_error")
        self.in_flight += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
        try:
            answer = Answer(prompt, max_tokens)
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                await self._stream(answer, include_usage, writer)
            else:
                clock = _Clock(self.profile.scheduled)
                await self._first_token(clock)
                for _ in range(max_tokens - 1):
                    await self._next_token(clock)
                await _send_json(writer, 200, answer.completion())
            self.stats["completed"] += 1
        finally:
            self.in_flight -= 1

    async def _stream(self, answer: Answer, include_usage: bool, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
        )
        usage = "null" if include_usage else None
        await _send_chunk(writer, answer.event('"role":"assistant","content":""', "null", usage))
        clock = _Clock(self.profile.scheduled)
        await self._first_token(clock)
        for index in range(answer.max_tokens):
            if index:
                await self._next_token(clock)
            await _send_chunk(writer, answer.event(f'"content":{json.dumps(answer.token(index))}', "null", usage))
        await _send_chunk(writer, answer.event("", '"length"', usage))
        if include_usage:
            await _send_chunk(writer, answer.usage_event())
        await _send_chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


class _Clock:
    """One answer's token timing: each wait a sleep from now, or (scheduled) until the
    previous token's due time plus the step."""

    def __init__(self, scheduled: bool) -> None:
        self.scheduled = scheduled
        self.due = time.monotonic()

    async def wait(self, step_s: float) -> None:
        if not self.scheduled:
            await asyncio.sleep(step_s)
            return
        self.due += step_s
        delay = self.due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class Answer:
    """The deterministic answer to one prompt, and its OpenAI encodings."""

    def __init__(self, prompt: str, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.offset = zlib.crc32(prompt.encode())
        self.prompt_tokens = max(1, len(prompt) // 4)
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self._head = (
            f'data: {{"id":"{self.id}","object":"chat.completion.chunk","created":{self.created},'
            f'"model":"{MODEL}","system_fingerprint":null,"choices":'
        )

    def token(self, index: int) -> str:
        return (" " if index else "") + WORDS[(self.offset + index) % len(WORDS)]

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.max_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.max_tokens, "total_tokens": total}

    def event(self, delta: str, finish_reason: str, usage: str | None) -> bytes:
        choice = f'[{{"index":0,"delta":{{{delta}}},"logprobs":null,"finish_reason":{finish_reason}}}]'
        tail = f',"usage":{usage}}}\n\n' if usage is not None else "}\n\n"
        return (self._head + choice + tail).encode()

    def usage_event(self) -> bytes:
        return (self._head + f'[],"usage":{json.dumps(self.usage())}}}\n\n').encode()

    def completion(self) -> dict[str, Any]:
        text = "".join(self.token(i) for i in range(self.max_tokens))
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": MODEL,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}],
            "usage": self.usage(),
            "system_fingerprint": None,
        }


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readline()
    return b""


async def _send_json(writer: asyncio.StreamWriter, status: int, body: object) -> None:
    payload = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
    writer.write(f"{head}content-length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()


async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def serve(profiles: list[Profile]) -> None:
    servers = []
    for profile in profiles:
        upstream = Upstream(profile)
        servers.append(await asyncio.start_server(upstream.handle, "127.0.0.1", profile.port, backlog=1024))
    print("READY", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


# ---- used by the benchmarks -----------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def running_upstreams(profiles: list[Profile]) -> Iterator[list[str]]:
    """Starts the simulator as a subprocess; yields each upstream's base URL (with /v1)."""
    spec = json.dumps([asdict(p) for p in profiles])
    process = subprocess.Popen([sys.executable, __file__, "--spec", spec], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "READY":  # its stderr is ours: the cause is printed above
            raise RuntimeError("the simulated upstreams failed to start")
        yield [f"http://127.0.0.1:{p.port}/v1" for p in profiles]
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON list of upstream profiles")
    args = parser.parse_args()
    profiles = [Profile(**entry) for entry in json.loads(args.spec)]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(profiles))


if __name__ == "__main__":
    main()
