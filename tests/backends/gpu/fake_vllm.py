"""A stand-in for `vllm serve`, for tests on machines without vLLM or a GPU.

Stdlib only, so it starts in a fraction of a second. It takes the `serve` flags the
backend emits (an unknown flag is an argparse error with exit code 2, like vLLM), and
serves vLLM's HTTP surface in its wire format: `/health`, `/v1/models`, `/metrics`
(Prometheus text with vLLM's gauges, reflecting live requests), `/v1/chat/completions`
and `/v1/completions` (plain and SSE). Answers are deterministic: the last user message
(or the prompt) echoed word by word, one word per token.

Launch: `python fake_vllm.py serve MODEL [flags]`, i.e. the backend's `executable` is the
argv prefix `(sys.executable, "/path/to/fake_vllm.py")`.

Knobs that are not vLLM flags come from the environment:
  FAKE_VLLM_STARTUP_DELAY_S   seconds before the port is bound (model loading)
  FAKE_VLLM_MODELS_DELAY_S    seconds after binding during which /health is 200 but
                              /v1/models lists nothing
  FAKE_VLLM_TOKEN_DELAY_S     pause before each streamed token
  FAKE_VLLM_SPAWN_ENGINE=1    start an "engine core" child process in the same group,
                              which outlives this one if it dies (like vLLM's workers)
  FAKE_VLLM_IGNORE_SIGTERM=1  ignore SIGTERM (this process and its engine child)
and from fault endpoints: `POST /_fault/exit?code=N` (exit at once with N, leaving the
engine child behind), `POST /_fault/health?status=503` (make /health answer that).
`GET /_fake/info` tells the pids and the parsed flags.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm")
    commands = parser.add_subparsers(dest="subcommand", required=True)
    serve = commands.add_parser("serve", prog="vllm serve")
    serve.add_argument("model_tag")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None)
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--max-num-seqs", type=int, default=None)
    serve.add_argument("--dtype", default="auto", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    serve.add_argument("--quantization", "-q", default=None)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--seed", type=int, default=None)
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    return parser


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.served = (args.served_model_name or [args.model_tag])[0]
        self.max_model_len = args.max_model_len or 2048
        self.max_num_seqs = args.max_num_seqs or 256
        self.slots = threading.Semaphore(self.max_num_seqs)
        self.lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.health_status = 200
        self.models_at = float("inf")  # set once the port is bound
        self.token_delay = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY_S", "0"))
        self.engine: subprocess.Popen[bytes] | None = None


def api_error(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"
    state: State  # set on the class before serving

    def log_message(self, format: str, *args: Any) -> None:  # probes every 50 ms would drown the log
        pass

    # ---- plumbing ---------------------------------------------------------------------

    def send_json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def send_text(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def read_json(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw or b"null")

    def authorized(self) -> bool:
        key = self.state.args.api_key
        if key is None or self.headers.get("authorization") == f"Bearer {key}":
            return True
        self.send_json(401, {"error": "Unauthorized"})  # vLLM's exact reply
        return False

    # ---- routes -----------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/health":
            self.send_text(self.state.health_status, "")
        elif url.path == "/metrics":
            self.send_text(200, self.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        elif url.path == "/v1/models":
            if self.authorized():
                self.send_json(200, self.models())
        elif url.path == "/_fake/info":
            engine = self.state.engine
            self.send_json(200, {"pid": os.getpid(), "engine_pid": engine.pid if engine else None, "argv": sys.argv})
        else:
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path == "/_fault/exit":
            code = int(query.get("code", ["1"])[0])
            self.send_json(200, {"exiting": code})
            print(f"ERROR fault injected: engine core died, exiting with {code}", flush=True)
            os._exit(code)
        if url.path == "/_fault/health":
            self.state.health_status = int(query.get("status", ["503"])[0])
            self.send_json(200, {"health_status": self.state.health_status})
            return
        if url.path not in ("/v1/chat/completions", "/v1/completions"):
            self.send_json(404, {"detail": "Not Found"})
            return
        if not self.authorized():
            return
        try:
            body = self.read_json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as exc:
            self.send_json(400, api_error(400, f"invalid JSON body: {exc}", "BadRequestError"))
            return
        self.generate(body, chat=url.path == "/v1/chat/completions")

    # ---- answers ----------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        if time.monotonic() < self.state.models_at:
            return {"object": "list", "data": []}
        now = int(time.time())
        card = {
            "id": self.state.served,
            "object": "model",
            "created": now,
            "owned_by": "vllm",
            "root": self.state.args.model_tag,
            "parent": None,
            "max_model_len": self.state.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{uuid.uuid4().hex}",
                    "object": "model_permission",
                    "created": now,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        return {"object": "list", "data": [card]}

    def metrics(self) -> str:
        s = self.state
        labels = f'{{engine="0",model_name="{s.served}"}}'
        with s.lock:
            running, waiting = s.running, s.waiting
            prompt, generated = s.prompt_tokens, s.generation_tokens
        gauges = [
            ("vllm:num_requests_running", "Number of requests in model execution batches.", running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", running / s.max_num_seqs),
        ]
        lines: list[str] = []
        for name, help_text, value in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{labels} {float(value)}"]
        for name, help_text, value in [
            ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", prompt),
            ("vllm:generation_tokens_total", "Number of generation tokens processed.", generated),
        ]:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name}{labels} {float(value)}"]
        return "\n".join(lines) + "\n"

    def generate(self, body: dict[str, Any], *, chat: bool) -> None:
        s = self.state
        model = body.get("model")
        if model != s.served:
            self.send_json(404, api_error(404, f"The model `{model}` does not exist.", "NotFoundError", "model"))
            return
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                self.send_json(400, api_error(400, "messages must be a non-empty list", "BadRequestError"))
                return
            source = last_user_text(messages)
            # Every message costs its words plus a few template tokens, as a chat template would.
            prompt_tokens = sum(len(content_text(m.get("content")).split()) + 4 for m in messages)
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            prompt = body.get("prompt")
            first = prompt[0] if isinstance(prompt, list) and prompt else prompt
            if not isinstance(first, str):
                self.send_json(400, api_error(400, "prompt must be a string", "BadRequestError"))
                return
            source = first
            prompt_tokens = len(source.split())
            limit = body.get("max_tokens", 16)  # the completions API's default
        words = source.split()
        if limit is not None and prompt_tokens + int(limit) > s.max_model_len:
            message = (
                f"This model's maximum context length is {s.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + int(limit)} tokens ({prompt_tokens} in the messages, {limit} in the completion). "
                "Please reduce the length of the messages or completion."
            )
            self.send_json(400, api_error(400, message, "BadRequestError"))
            return
        pieces = [word if i == 0 else " " + word for i, word in enumerate(words)]
        finish = "stop"
        if limit is not None and len(pieces) > int(limit):
            pieces, finish = pieces[: int(limit)], "length"
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + len(pieces),
            "completion_tokens": len(pieces),
        }
        with s.lock:
            s.waiting += 1
        s.slots.acquire()
        with s.lock:
            s.waiting -= 1
            s.running += 1
            s.prompt_tokens += prompt_tokens
        try:
            ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self.stream(ident, pieces, finish, usage if include_usage else None, chat=chat)
            else:
                time.sleep(s.token_delay * len(pieces))
                self.send_json(200, self.whole(ident, "".join(pieces), finish, usage, chat=chat))
                with s.lock:
                    s.generation_tokens += len(pieces)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: vLLM aborts the request
        finally:
            with s.lock:
                s.running -= 1
            s.slots.release()

    def whole(self, ident: str, text: str, finish: str, usage: dict[str, int], *, chat: bool) -> dict[str, Any]:
        head = {"id": ident, "created": int(time.time()), "model": self.state.served}
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "tool_calls": []}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish, "stop_reason": None}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        return {**head, "object": "text_completion", "choices": [choice], "usage": usage}

    def stream(self, ident: str, pieces: list[str], finish: str, usage: dict[str, int] | None, *, chat: bool) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        head = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.state.served,
        }

        def choice(text: str, reason: str | None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None}

        if chat:
            self.event({**head, "choices": [choice("", None, first=True)]})
        for i, piece in enumerate(pieces):
            time.sleep(self.state.token_delay)
            last = i == len(pieces) - 1
            self.event({**head, "choices": [choice(piece, finish if last else None)]})
            with self.state.lock:
                self.state.generation_tokens += 1
        if not pieces:
            self.event({**head, "choices": [choice("", finish)]})
        if usage is not None:
            self.event({**head, "choices": [], "usage": usage})
        self.chunk(b"data: [DONE]\n\n")
        self.chunk(b"")

    def event(self, payload: dict[str, Any]) -> None:
        self.chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def spawn_engine() -> subprocess.Popen[bytes]:
    # Same process group, same stdout: exactly what a forgotten vLLM worker holds on to.
    code = "import os, signal, time\n"
    if os.environ.get("FAKE_VLLM_IGNORE_SIGTERM") == "1":
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('EngineCore pid', os.getpid(), flush=True)\nwhile True: time.sleep(60)\n"
    return subprocess.Popen([sys.executable, "-c", code])


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.gpu_memory_utilization <= 1:
        print(f"ValueError: gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}", flush=True)
        return 1
    if os.environ.get("FAKE_VLLM_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"INFO vLLM API server version 0.0.0-fake, args: {vars(args)}", flush=True)
    state = State(args)
    if os.environ.get("FAKE_VLLM_SPAWN_ENGINE") == "1":
        state.engine = spawn_engine()
    time.sleep(float(os.environ.get("FAKE_VLLM_STARTUP_DELAY_S", "0")))
    Handler.state = state
    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as exc:
        where = f"{args.host}:{args.port}"
        print(f"ERROR [Errno {exc.errno}] error while attempting to bind on address {where}", flush=True)
        return 1
    server.daemon_threads = True
    state.models_at = time.monotonic() + float(os.environ.get("FAKE_VLLM_MODELS_DELAY_S", "0"))
    print(f"INFO Starting vLLM API server on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
