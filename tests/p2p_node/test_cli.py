"""The `p2p-node` command as a person uses it: real subprocesses against real nodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import NodeProcess, free_port, node_env

SUBCOMMANDS = ["start", "join", "mcp", "prepare-models", "chat", "embed", "models", "status", "peers"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2p_node", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=node_env(),
    )


def test_help_lists_every_subcommand() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name: str) -> None:
    result = cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: p2p-node {name}")


def test_installed_console_script_runs() -> None:
    script = Path(sys.executable).parent / "p2p-node"
    if not script.exists():
        pytest.skip("p2p-node is not installed in this interpreter's environment")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "chat" in result.stdout


def test_chat_streams_the_same_answer_the_api_gives(tiny_node: NodeProcess) -> None:
    prompt = "Tell me a story about a cat."
    result = cli("chat", "--url", tiny_node.url, "--max-tokens", "12", prompt)
    assert result.returncode == 0, result.stderr
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0}
    answer = httpx.post(tiny_node.url + "/v1/chat/completions", json=body, timeout=60).json()
    expected = answer["choices"][0]["message"]["content"]
    assert expected  # gibberish from the tiny model, but some
    assert result.stdout == expected + "\n"


@pytest.mark.slow
def test_chat_answers_with_the_default_model(real_node: NodeProcess) -> None:
    result = cli("chat", "--url", real_node.url, "--max-tokens", "40", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_with_an_unknown_model_fails_with_the_node_message(tiny_node: NodeProcess) -> None:
    result = cli("chat", "--url", tiny_node.url, "--model", "no-such-model", "hello")
    assert result.returncode == 1
    assert "404" in result.stderr and "no-such-model" in result.stderr
    assert "Traceback" not in result.stderr


def test_embed_prints_one_json_line_per_text(tiny_node: NodeProcess) -> None:
    result = cli("embed", "--url", tiny_node.url, "first text", "second text")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["first text", "second text"]
    assert all(len(line["embedding"]) == 384 for line in lines)


def test_models_lists_models_and_aliases(tiny_node: NodeProcess) -> None:
    result = cli("models", "--url", tiny_node.url)
    assert result.returncode == 0, result.stderr
    assert "tiny-random-llama" in result.stdout
    assert "all-MiniLM-L6-v2" in result.stdout
    assert "qwen-coder-1.5b" in result.stdout and "-> tiny-random-llama" in result.stdout


def test_status_prints_the_node_report(tiny_node: NodeProcess) -> None:
    result = cli("status", "--url", tiny_node.url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["node"]["uptime_s"] > 0
    assert any(b["id"] == "local" for b in report["manager"]["backends"])


def test_unreachable_node_is_a_one_line_error() -> None:
    result = cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.startswith("p2p-node: cannot reach")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("config", "mentions"),
    [
        ("[batching]\nmax_batch_size = 0\n", "max_batch_size"),
        ("[routing]\nstrategy = 'fastest-please'\n", "strategy"),
        ("[server\nport = 1\n", "TOML"),
        ("[serverr]\nport = 1\n", "serverr"),
    ],
)
def test_start_with_a_bad_config_exits_2_with_a_clear_message(tmp_path: Path, config: str, mentions: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config)
    result = cli("start", "--config", str(path), "--port", str(free_port()), timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("p2p-node:")
    assert mentions in result.stderr
    assert "Traceback" not in result.stderr


def test_start_on_a_taken_port_exits_1_with_a_clear_message(tiny_node: NodeProcess) -> None:
    port = tiny_node.url.rsplit(":", 1)[1]
    result = cli("start", "--port", port, "--preload", "", timeout=120)
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr
