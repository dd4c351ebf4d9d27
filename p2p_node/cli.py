"""`p2p-node`: start a node, and talk to one (chat, embed, models, status)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2p-node",
        description="A peer-to-peer inference node with an OpenAI-compatible API.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    start = sub.add_parser("start", help="start a node", description="Start a node and serve until SIGTERM/SIGINT.")
    join = sub.add_parser(
        "join",
        help="start a node that joins a mesh through a known peer",
        description="Start a node, as `start` does, bootstrapping into the mesh through PEER.",
    )
    join.add_argument("peer", help="a peer's multiaddr, e.g. /ip4/10.0.0.5/tcp/4001/p2p/12D3KooW...")
    for command in (start, join):
        command.add_argument("--config", type=Path, help="TOML config file (default: $P2P_NODE_CONFIG)")
        command.add_argument("--host", help="address to listen on (default 127.0.0.1)")
        command.add_argument("--port", type=int, help="HTTP port (default 8000; 0 picks a free one)")
        command.add_argument("--preload", help="comma-separated models to load at start ('' for none)")
        command.add_argument(
            "--bootstrap", action="append", default=[], metavar="MULTIADDR", help="a peer to join through (repeatable)"
        )
        command.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        command.add_argument("--log-format", choices=["text", "json"])
        command.set_defaults(handler=_start)

    mcp_cmd = sub.add_parser(
        "mcp",
        help="serve MCP on stdin/stdout, for agent hosts that launch servers",
        description="Run a node in this process (no HTTP) and serve its MCP tools on stdin/stdout "
        "until stdin closes. Logs go to stderr. To use a running node, connect to its /mcp URL instead.",
    )
    mcp_cmd.add_argument("--config", type=Path, help="TOML config file (default: $P2P_NODE_CONFIG)")
    mcp_cmd.add_argument("--preload", help="comma-separated models to load at start ('' for none)")
    mcp_cmd.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    mcp_cmd.add_argument("--log-format", choices=["text", "json"])
    mcp_cmd.set_defaults(handler=_mcp)

    prepare = sub.add_parser(
        "prepare-models",
        help="convert the embedded models into the fast-loading cache",
        description="Convert SmolLM2 from its GGUF into the bf16 cache the node loads in seconds.",
    )
    prepare.add_argument("--config", type=Path)
    prepare.set_defaults(handler=_prepare)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--url", default=os.environ.get("P2P_NODE_URL", DEFAULT_URL), help="node URL")
        p.add_argument("--api-key", default=os.environ.get("P2P_NODE_API_KEY"), help="bearer token, if required")
        return p

    chat = client("chat", "chat with a node, streaming the answer to the terminal")
    chat.add_argument("prompt")
    chat.add_argument("--model", help="model (default: the node's default chat model)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    chat.set_defaults(handler=_chat)

    embed = client("embed", "embed texts and print the vectors as JSON lines")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--model")
    embed.set_defaults(handler=_embed)

    models = client("models", "list the models a node serves")
    models.set_defaults(handler=_models)

    status = client("status", "show a node's status report")
    status.set_defaults(handler=_status)

    peers = client("peers", "list the mesh peers a node knows: id, addresses, models, load, round trip")
    peers.add_argument("--json", action="store_true", help="print the raw list")
    peers.set_defaults(handler=_peers)
    return parser


# ---- server side --------------------------------------------------------------------


def _start(args: argparse.Namespace) -> int:
    import trio

    from p2p_node.config import ConfigError, load_config
    from p2p_node.logs import configure_logging

    overrides: dict[str, dict[str, Any]] = {
        "server": {"host": args.host, "port": args.port},
        "logging": {"level": args.log_level, "format": args.log_format},
    }
    if args.preload is not None:
        overrides["models"] = {"preload": [m.strip() for m in args.preload.split(",") if m.strip()]}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"p2p-node: {exc}", file=sys.stderr)
        return 2
    extra_peers = [*args.bootstrap, *([args.peer] if getattr(args, "peer", None) else [])]
    config.mesh.bootstrap = [*config.mesh.bootstrap, *extra_peers]
    configure_logging(config.logging.level, config.logging.format)
    _quiet_model_libraries()
    from p2p_node.node import Node

    log = logging.getLogger("p2p_node")
    log.info("effective configuration: %s", json.dumps(config.effective(), sort_keys=True))
    try:
        node = Node(config)  # builds the backends: their settings are checked here
    except ConfigError as exc:
        print(f"p2p-node: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(lambda: node.run(handle_signals=True))
    except OSError as exc:
        return _cannot_serve(config.server.host, config.server.port, exc)
    except BaseExceptionGroup as group:
        # The bind fails inside the node's nursery, so it arrives wrapped.
        match, rest = group.split(OSError)
        if match is None or rest is not None:
            raise
        return _cannot_serve(config.server.host, config.server.port, _first_leaf(match))
    return 0


def _mcp(args: argparse.Namespace) -> int:
    import trio

    from p2p_node.config import ConfigError, load_config
    from p2p_node.logs import configure_logging
    from p2p_node.mcp_server.stdio import StdioWire, serve_stdio

    # stdin and stdout carry the protocol: from here on nothing else reads or writes them.
    wire = StdioWire.claim()
    overrides: dict[str, dict[str, Any]] = {"logging": {"level": args.log_level, "format": args.log_format}}
    if args.preload is not None:
        overrides["models"] = {"preload": [m.strip() for m in args.preload.split(",") if m.strip()]}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"p2p-node: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, config.logging.format)
    _quiet_model_libraries()
    config.mcp.enabled = False  # that is MCP over HTTP, which this process does not serve
    from p2p_node.node import Node

    log = logging.getLogger("p2p_node")
    log.info("effective configuration: %s", json.dumps(config.effective(), sort_keys=True))
    try:
        node = Node(config)
    except ConfigError as exc:
        print(f"p2p-node: {exc}", file=sys.stderr)
        return 2
    trio.run(serve_stdio, node, wire)
    return 0


def _cannot_serve(host: str, port: int, exc: BaseException) -> int:
    print(f"p2p-node: cannot serve on {host}:{port}: {exc}", file=sys.stderr)
    return 1


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _prepare(args: argparse.Namespace) -> int:
    from p2p_node.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"p2p-node: {exc}", file=sys.stderr)
        return 2
    _quiet_model_libraries()
    from backends.local._models import prepare_smollm2

    path = prepare_smollm2(config.models.cache_dir)
    print(f"SmolLM2 cache ready at {path}")
    return 0


def _quiet_model_libraries() -> None:
    # Model hubs are unreachable by design: never let a library try them.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- client side --------------------------------------------------------------------


def _request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import httpx

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        response = httpx.request(method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=300)
    except httpx.HTTPError as exc:
        raise SystemExit(f"p2p-node: cannot reach {args.url}: {exc}") from None
    if response.status_code >= 400:
        raise SystemExit(f"p2p-node: {response.status_code}: {_error_message(response.text)}")
    return response.json()


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text


def _chat(args: argparse.Namespace) -> int:
    import httpx

    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": not args.no_stream,
    }
    if args.model:
        body["model"] = args.model
    if args.no_stream:
        answer = _request(args, "POST", "/v1/chat/completions", body)
        print(answer["choices"][0]["message"]["content"])
        return 0
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/") + "/v1/chat/completions"
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=300) as response:
            if response.status_code >= 400:
                response.read()
                raise SystemExit(f"p2p-node: {response.status_code}: {_error_message(response.text)}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    print(file=sys.stdout)
                    raise SystemExit(f"p2p-node: {event['error']['message']}")
                for choice in event.get("choices", []):
                    sys.stdout.write(choice.get("delta", {}).get("content") or "")
                    sys.stdout.flush()
    except httpx.HTTPError as exc:
        raise SystemExit(f"p2p-node: cannot reach {args.url}: {exc}") from None
    sys.stdout.write("\n")
    return 0


def _embed(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"input": args.texts}
    if args.model:
        body["model"] = args.model
    answer = _request(args, "POST", "/v1/embeddings", body)
    for text, item in zip(args.texts, answer["data"], strict=True):
        print(json.dumps({"text": text, "embedding": item["embedding"]}))
    return 0


def _models(args: argparse.Namespace) -> int:
    answer = _request(args, "GET", "/v1/models")
    for model in answer["data"]:
        tasks = ",".join(model.get("tasks", []))
        state = "loaded" if model.get("loaded") else "available"
        alias = f" -> {model['alias_of']}" if model.get("alias_of") else ""
        print(f"{model['id']:<28} {tasks:<22} {state}{alias}")
    return 0


def _peers(args: argparse.Namespace) -> int:
    mesh = _request(args, "GET", "/status").get("mesh", {})
    peers = mesh.get("peers", [])
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    print(f"this node: {mesh.get('peer_id', '(mesh off)')}")
    if not peers:
        print("no peers")
    for peer in peers:
        load = peer.get("load", {})
        rtt = f"{peer['rtt_ms']:.1f} ms" if peer.get("rtt_ms") is not None else "-"
        state = "connected" if peer.get("connected") else "reconnecting"
        busy = f"in flight {load.get('in_flight', 0)}  queued {load.get('queued', 0)}"
        print(f"{peer['peer_id']}  {state}  rtt {rtt}  {busy}")
        print(f"    models: {', '.join(peer.get('models', [])) or '-'}")
        for addr in peer.get("addrs", [])[:3]:
            print(f"    {addr}")
    return 0


def _status(args: argparse.Namespace) -> int:
    print(json.dumps(_request(args, "GET", "/status"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
