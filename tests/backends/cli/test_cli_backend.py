"""The CLI backend against real subprocesses.

The tools are small Python scripts under `tools/` run with this interpreter: a stand-in
for the `llm` CLI that echoes its prompt word by word, one that writes UTF-8 a byte at a
time, one that fails, and one that hangs after spawning a grandchild. Process deaths are
checked on the real pids the tools report.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from backends.catalog import ModelCatalog
from backends.cli import CliBackend, CliBackendSettings
from backends.errors import (
    BackendFailedError,
    BackendUnavailableError,
    ContextWindowExceededError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
)
from backends.manager import BackendManager, ManagerSettings
from backends.types import (
    BackendStatus,
    ChatRequest,
    CompletionRequest,
    GenerationChunk,
    GenerationParams,
    GenerationRequest,
    Message,
    RequestContext,
    Task,
    Usage,
)
from tests.conftest import wait_until

TOOLS = Path(__file__).resolve().parent / "tools"


def tool(script: str, *args: str) -> str:
    """The start of a command template running one of our fake tools."""
    return shlex.join([sys.executable, str(TOOLS / script), *args])


def backend(command: str, **settings: object) -> CliBackend:
    values: dict[str, object] = {"models": ["echo"], "timeout_s": 20.0, "kill_grace_s": 1.0, **settings}
    return CliBackend(CliBackendSettings("cli", command, **values))  # type: ignore[arg-type]


def completion(prompt: str, max_tokens: int = 1000, stop: tuple[str, ...] = ()) -> CompletionRequest:
    return CompletionRequest(prompt, "echo", GenerationParams(max_tokens=max_tokens, stop=stop))


async def collect(
    cli: CliBackend, request: GenerationRequest, ctx: RequestContext | None = None
) -> list[GenerationChunk]:
    chunks = []
    async with aclosing(cli.stream(request, ctx or RequestContext())) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    return chunks


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


def alive(pid: int) -> bool:
    """Whether `pid` still runs. A zombie counts as dead: nothing here may reap orphans."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def read_pids(pid_file: Path) -> list[int]:
    return [int(p) for p in pid_file.read_text().split()]


# ---- streaming ---------------------------------------------------------------------


async def test_stdout_streams_in_order_as_the_tool_writes_it() -> None:
    cli = backend(tool("fake_llm.py", "--delay", "0.05") + " {prompt}")
    arrivals: list[tuple[float, GenerationChunk]] = []
    async with aclosing(cli.stream(completion("one two three four five"), RequestContext())) as stream:
        async for chunk in stream:
            arrivals.append((time.monotonic(), chunk))
    chunks = [c for _, c in arrivals]
    assert text_of(chunks) == "one two three four five"  # the tool's final newline is dropped
    pieces = [c.text for c in chunks if c.text]
    assert len(pieces) >= 3, pieces  # streamed, not delivered in one piece at exit
    assert arrivals[-1][0] - arrivals[0][0] >= 0.1
    final = chunks[-1]
    assert final.finish_reason == "stop"
    assert final.usage == Usage(prompt_tokens=6, completion_tokens=6)  # 23 chars each: ceil(23 / 4)
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_a_prompt_with_quotes_and_semicolons_is_one_argument_never_seen_by_a_shell(tmp_path: Path) -> None:
    argv_file = tmp_path / "argv.json"
    cli = backend(tool("fake_llm.py", "--argv-file", str(argv_file)) + " -m {model} {prompt}")
    prompt = """it's "quoted"; echo pwned && rm -rf "$HOME" `id` $(id) | cat > /tmp/x"""
    chunks = await collect(cli, completion(prompt))
    assert json.loads(argv_file.read_text())[-1] == prompt
    assert text_of(chunks) == prompt  # `$HOME` and `$(id)` came back unexpanded


async def test_every_placeholder_is_filled_per_request(tmp_path: Path) -> None:
    argv_file = tmp_path / "argv.json"
    command = tool("fake_llm.py", "--argv-file", str(argv_file))
    cli = backend(
        command + " -m {model} -s {system} --max-tokens={max_tokens} --temperature {temperature} {prompt}",
        models=["echo", "other model"],
    )
    request = ChatRequest(
        (Message("system", "Be terse."), Message("user", "Hi there")),
        "other model",
        GenerationParams(max_tokens=42, temperature=0.25),
    )
    chunks = await collect(cli, request)
    assert json.loads(argv_file.read_text())[2:] == [
        "-m",
        "other model",
        "-s",
        "Be terse.",
        "--max-tokens=42",
        "--temperature",
        "0.25",
        "Hi there",
    ]
    assert text_of(chunks) == "Hi there"


async def test_without_a_system_placeholder_the_system_message_leads_the_prompt() -> None:
    cli = backend(tool("fake_llm.py") + " {prompt}")
    request = ChatRequest(
        (Message("system", "Be terse."), Message("user", "Hi"), Message("assistant", "Hello."), Message("user", "Bye")),
        "echo",
        GenerationParams(max_tokens=100),
    )
    chunks = await collect(cli, request)
    assert text_of(chunks) == "Be terse.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye"


async def test_without_a_prompt_placeholder_the_prompt_goes_to_stdin() -> None:
    cli = backend(tool("fake_llm.py") + " -m {model}")
    assert cli.describe()["prompt_via"] == "stdin"
    chunks = await collect(cli, completion("read me from stdin; please"))
    assert text_of(chunks) == "read me from stdin; please"


async def test_a_prompt_larger_than_the_pipe_buffer_flows_through_stdin_while_output_streams() -> None:
    # `cat` writes back while it reads: stdin must be fed while stdout is drained.
    cli = backend(shlex.join([sys.executable, "-c", "import shutil, sys; shutil.copyfileobj(sys.stdin, sys.stdout)"]))
    prompt = "".join(f"line {i:06d} of a long prompt\n" for i in range(20_000)) + "end"  # ~600 KB
    chunks = await collect(cli, completion(prompt, max_tokens=len(prompt)))
    assert text_of(chunks) == prompt
    assert chunks[-1].finish_reason == "stop"


async def test_multibyte_characters_split_across_writes_arrive_whole() -> None:
    cli = backend(tool("fake_utf8.py"))
    chunks = await collect(cli, completion("ignored"))
    assert text_of(chunks) == "héllo wörld — 日本語 🙂 ok"
    assert not any("\ufffd" in c.text for c in chunks)
    assert len([c for c in chunks if c.text]) > 5  # it really was streamed in pieces


# ---- stop sequences and max_tokens ----------------------------------------------------


async def test_a_stop_sequence_is_never_shown_and_the_tool_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cli = backend(tool("fake_llm.py", "--delay", "0.02", "--pid-file", str(pid_file), "--then-hang") + " {prompt}")
    with trio.fail_after(10):  # the tool would hang for an hour if not killed
        chunks = await collect(cli, completion("alpha beta END gamma delta", stop=("END",)))
    assert text_of(chunks) == "alpha beta "
    assert chunks[-1].finish_reason == "stop"
    assert not alive(read_pids(pid_file)[0])


async def test_max_tokens_cuts_the_output_at_four_characters_a_token_and_kills_the_tool(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cli = backend(tool("fake_llm.py", "--delay", "0.02", "--pid-file", str(pid_file), "--then-hang") + " {prompt}")
    with trio.fail_after(10):
        chunks = await collect(cli, completion("abcd efgh ijkl mnop qrst", max_tokens=3))
    assert text_of(chunks) == "abcd efgh ij"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage == Usage(prompt_tokens=6, completion_tokens=3)
    assert not alive(read_pids(pid_file)[0])


# ---- failures ------------------------------------------------------------------------


async def test_a_non_zero_exit_is_a_backend_failure_quoting_stderr_and_the_code() -> None:
    cli = backend(tool("fake_fail.py", "--stdout", "partial answer", "--code", "3"))
    seen: list[str] = []
    with pytest.raises(BackendFailedError) as raised:
        async with aclosing(cli.stream(completion("x"), RequestContext())) as stream:
            async for chunk in stream:
                seen.append(chunk.text)
    assert "".join(seen) == "partial answer"  # streamed output is not held back...
    message = raised.value.message
    assert "exited with code 3" in message  # ...and the failure still surfaces
    assert message.endswith("error: quota exhausted for this account")
    assert "warning: step 7 went sideways" in message
    assert "warning: step 1 went sideways" not in message  # only the last lines are quoted


async def test_a_tool_killed_by_a_signal_says_which() -> None:
    cli = backend(tool("fake_fail.py", "--signal", "SIGSEGV"))
    with pytest.raises(BackendFailedError, match="was killed by SIGSEGV"):
        await collect(cli, completion("x"))


async def test_a_stderr_flood_neither_blocks_the_tool_nor_bloats_the_error() -> None:
    cli = backend(tool("fake_fail.py", "--flood-stderr", "2000000", "--code", "1"))
    with trio.fail_after(15), pytest.raises(BackendFailedError) as raised:
        await collect(cli, completion("x"))
    assert raised.value.message.endswith("error: quota exhausted for this account")
    assert len(raised.value.message) < 1000


async def test_a_missing_executable_is_unavailable_and_health_says_offline() -> None:
    cli = backend("no-such-tool-for-p2p-node -p {prompt}")
    assert await cli.check_health() is BackendStatus.OFFLINE
    assert cli.status_detail == "executable 'no-such-tool-for-p2p-node' not found on PATH"
    with pytest.raises(BackendUnavailableError, match="executable 'no-such-tool-for-p2p-node' not found"):
        await collect(cli, completion("x"))
    assert cli.status is BackendStatus.OFFLINE  # routed around until the next health check


async def test_a_missing_working_directory_is_unavailable(tmp_path: Path) -> None:
    cli = backend(tool("fake_llm.py") + " {prompt}", cwd=tmp_path / "gone")
    assert await cli.check_health() is BackendStatus.OFFLINE
    assert "does not exist" in cli.status_detail
    with pytest.raises(BackendUnavailableError, match=r"working directory .* does not exist"):
        await collect(cli, completion("x"))


async def test_a_prompt_too_long_for_an_argument_says_to_use_stdin() -> None:
    cli = backend(tool("fake_llm.py") + " {prompt}")
    with pytest.raises(ContextWindowExceededError, match="without \\{prompt\\} sends it on stdin"):
        await collect(cli, completion("x" * 300_000))


async def test_a_nul_character_in_an_argument_is_a_clear_invalid_request() -> None:
    cli = backend(tool("fake_llm.py") + " {prompt}")
    with pytest.raises(InvalidRequestError, match="the prompt contains a NUL character"):
        await collect(cli, completion("before\0after"))


async def test_a_model_the_backend_does_not_serve_is_not_found() -> None:
    cli = backend(tool("fake_llm.py") + " {prompt}")
    with pytest.raises(ModelNotFoundError, match="serves echo, not 'gpt-9'"):
        await collect(cli, CompletionRequest("x", "gpt-9", GenerationParams(max_tokens=5)))


# ---- timeouts and cancellation ---------------------------------------------------------


async def test_the_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    cli = backend(tool("fake_hang.py", str(pid_file)), timeout_s=1.0)
    seen: list[str] = []
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="ran past timeout_s=1"):
        async with aclosing(cli.stream(completion("x"), RequestContext())) as stream:
            async for chunk in stream:
                seen.append(chunk.text)
    assert seen == ["ready"]
    assert time.monotonic() - started < 5
    tool_pid, grandchild_pid = read_pids(pid_file)
    assert not alive(tool_pid)  # reaped before the error reached us
    await wait_until(lambda: not alive(grandchild_pid))


async def test_the_request_deadline_applies_when_sooner_than_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    cli = backend(tool("fake_hang.py", str(pid_file)), timeout_s=60.0)
    ctx = RequestContext(deadline=trio.current_time() + 1.0)
    with pytest.raises(DeadlineExceededError, match=f"request {ctx.request_id} reached its deadline"):
        await collect(cli, completion("x"), ctx)
    pids = read_pids(pid_file)
    await wait_until(lambda: not any(alive(pid) for pid in pids))


async def test_a_tool_ignoring_sigterm_is_sigkilled_after_the_grace_period(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    cli = backend(tool("fake_hang.py", str(pid_file), "--ignore-term"), timeout_s=0.5, kill_grace_s=0.5)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await collect(cli, completion("x"))
    assert 1.0 <= time.monotonic() - started < 5  # the timeout, then the whole grace period
    tool_pid, grandchild_pid = read_pids(pid_file)
    assert not alive(tool_pid)
    await wait_until(lambda: not alive(grandchild_pid))


async def test_closing_the_stream_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    cli = backend(tool("fake_hang.py", str(pid_file)))
    async with aclosing(cli.stream(completion("x"), RequestContext())) as stream:
        async for chunk in stream:
            assert chunk.text == "ready"
            break
        assert cli.describe()["running"] == 1
    tool_pid, grandchild_pid = read_pids(pid_file)
    assert not alive(tool_pid)
    await wait_until(lambda: not alive(grandchild_pid))
    assert cli.describe()["running"] == 0


async def test_a_cancelled_caller_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    cli = backend(tool("fake_hang.py", str(pid_file)))
    with trio.move_on_after(1.0) as scope:
        await collect(cli, completion("x"))
    assert scope.cancelled_caught
    tool_pid, grandchild_pid = read_pids(pid_file)
    assert not alive(tool_pid)
    await wait_until(lambda: not alive(grandchild_pid))


async def test_output_ends_when_the_tool_exits_even_if_a_grandchild_holds_stdout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    cli = backend(tool("fake_hang.py", str(pid_file), "--exit"))
    with trio.fail_after(10):
        chunks = await collect(cli, completion("x"))
    assert text_of(chunks) == "ready"
    assert chunks[-1].finish_reason == "stop"
    _, grandchild_pid = read_pids(pid_file)
    await wait_until(lambda: not alive(grandchild_pid))  # leftovers die with the request


# ---- concurrency, health, description, the manager -----------------------------------------


async def test_requests_beyond_max_concurrency_wait_in_the_queue() -> None:
    cli = backend(tool("fake_llm.py", "--delay", "0.05") + " {prompt}", max_concurrency=1)
    order: list[str] = []

    async def ask(tag: str) -> None:
        for chunk in await collect_tagged(tag):
            order.append(tag + ":" + chunk.text)

    async def collect_tagged(tag: str) -> list[GenerationChunk]:
        return [c for c in await collect(cli, completion(f"{tag}1 {tag}2 {tag}3")) if c.text]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "a")
        await wait_until(lambda: cli.describe()["running"] == 1)
        nursery.start_soon(ask, "b")
        await wait_until(lambda: cli.queue_size() == 1)
        assert cli.describe()["running"] == 1
        assert cli.describe()["queued"] == 1
    assert "".join(o.split(":", 1)[1] for o in order) == "a1 a2 a3b1 b2 b3"
    assert cli.queue_size() == 0


async def test_a_request_whose_deadline_passes_in_the_queue_is_deadline_exceeded(tmp_path: Path) -> None:
    cli = backend(tool("fake_hang.py", str(tmp_path / "pids")), max_concurrency=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, cli, completion("occupies the only slot"))
        await wait_until(lambda: cli.describe()["running"] == 1)
        ctx = RequestContext(deadline=trio.current_time() + 0.3)
        with pytest.raises(DeadlineExceededError, match="while queued"):
            await collect(cli, completion("waits"), ctx)
        assert cli.queue_size() == 0
        nursery.cancel_scope.cancel()
    assert cli.describe()["running"] == 0


async def test_health_and_description_show_the_template_and_executable_never_a_prompt() -> None:
    cli = backend(tool("fake_llm.py", "--delay", "0.05") + " -m {model} {prompt}")
    assert await cli.check_health() is BackendStatus.HEALTHY
    assert cli.status_detail == ""
    async with aclosing(cli.stream(completion("secret words here"), RequestContext())) as stream:
        await anext(stream)
        described = cli.describe()
    assert described["command"] == cli.settings.command
    assert str(described["command"]).endswith("-m {model} {prompt}")
    assert described["executable"] == sys.executable
    assert described["running"] == 1 and described["queued"] == 0
    assert "secret" not in json.dumps(described)


async def test_a_request_is_served_through_the_backend_manager() -> None:
    cli = backend(tool("fake_llm.py") + " -m {model} {prompt}")
    manager = BackendManager(ManagerSettings(), ModelCatalog(defaults={Task.CHAT: "echo"}))
    manager.register(cli)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        assert cli.status is BackendStatus.HEALTHY
        result = await manager.generate(
            ChatRequest((Message("user", "hello through the manager"),), "echo", GenerationParams(max_tokens=50)),
            RequestContext(),
        )
        nursery.cancel_scope.cancel()
    assert result.text == "hello through the manager"
    assert result.finish_reason == "stop"
    assert result.backend_id == "cli"
    assert result.usage == Usage(prompt_tokens=7, completion_tokens=7)
    assert cli.metrics.requests_ok == 1
