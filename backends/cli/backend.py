"""Command-line tools as inference backends: `claude -p {prompt}`, `ollama run {model}`,
`llm -m {model} {prompt}`...

Each request runs the configured command once, as a subprocess in its own process group
(never through a shell), and streams its stdout back as it is written. The prompt goes in
the `{prompt}` argument, or on stdin when the template has no `{prompt}`; see
`backends.cli._prompt` for how a chat becomes one prompt and `backends.cli._template` for
the template syntax.

What users see:

* Output is decoded as UTF-8 incrementally (a character split across writes arrives
  whole; invalid bytes become U+FFFD). The newlines a tool prints at the very end of its
  output, for the terminal, are dropped.
* Exit status 0 ends the answer with finish_reason "stop"; any other status is a
  `BackendFailedError` quoting the tool's last stderr lines, even if output was streamed.
* Stop strings are never shown; once one appears the tool is killed and the answer ends
  with "stop".
* Token counts are ESTIMATES (the tools don't report them): ceil(chars / 4) for the
  prompt and for the answer. `max_tokens` cuts the answer at `4 * max_tokens` characters,
  kills the tool and ends with "length".
* `timeout_s` bounds a request on this backend from its arrival (queueing included); the
  request's own deadline applies when sooner. Either ends in `DeadlineExceededError`.
* Whenever a request ends (done, failed, timed out, or the client went away), the tool's
  whole process group gets SIGTERM, then SIGKILL after `kill_grace_s`, and the tool is
  reaped.
* At most `max_concurrency` tools run at once; further requests wait in a queue
  (`queue_size`).
"""

from __future__ import annotations

import codecs
import errno
import logging
import os
import shutil
import signal
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from backends.base import Backend
from backends.cli._process import ToolProcess
from backends.cli._prompt import chars_for_tokens, estimate_tokens, render_request, tokens_for_chars
from backends.cli._template import CommandTemplate
from backends.errors import (
    BackendFailedError,
    BackendUnavailableError,
    ContextWindowExceededError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
)
from backends.local._text import StopMatcher
from backends.types import (
    BackendStatus,
    BackendType,
    Capabilities,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    RequestContext,
    Task,
    Usage,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# How many of the tool's last stderr lines an error quotes.
STDERR_LINES_QUOTED = 5


@dataclass
class CliBackendSettings:
    """One configured tool. Invalid settings raise a one-line `ValueError` on construction."""

    backend_id: str
    # e.g. "llm -m {model} {prompt}"; split like a POSIX shell would, never run by one
    command: str
    # the model names this backend serves for chat and completion, substituted as {model}
    models: Sequence[str]
    timeout_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)  # added to the node's environment
    cwd: str | Path | None = None
    max_concurrency: int = 4
    kill_grace_s: float = 2.0
    name: str | None = None

    def __post_init__(self) -> None:
        where = f"CLI backend {self.backend_id!r}"
        if not self.backend_id:
            raise ValueError("CLI backend: backend_id is empty")
        try:
            CommandTemplate.parse(self.command)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if isinstance(self.models, str):
            raise ValueError(f"{where}: models must be a list of names, not the string {self.models!r}")
        self.models = tuple(self.models)
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ValueError(f"{where}: models must list at least one non-empty model name")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"{where}: models lists a name twice: {list(self.models)}")
        if not self.timeout_s > 0:
            raise ValueError(f"{where}: timeout_s must be positive, got {self.timeout_s}")
        if not self.kill_grace_s >= 0:
            raise ValueError(f"{where}: kill_grace_s must be zero or positive, got {self.kill_grace_s}")
        if not (isinstance(self.max_concurrency, int) and self.max_concurrency >= 1):
            raise ValueError(f"{where}: max_concurrency must be an integer >= 1, got {self.max_concurrency!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise ValueError(f"{where}: env names and values must be strings")
        self.env = dict(self.env)


class CliBackend(Backend):
    """Serves chat and completion for `settings.models` by running `settings.command`."""

    backend_type = BackendType.CLI

    def __init__(self, settings: CliBackendSettings) -> None:
        super().__init__(settings.backend_id, settings.name)
        self.settings = settings
        self.template = CommandTemplate.parse(settings.command)
        # `~/bin/tool` and a `~/work` cwd work as in a shell; nothing else is expanded.
        self._executable = os.path.expanduser(self.template.executable)
        self._cwd = os.path.expanduser(os.fspath(settings.cwd)) if settings.cwd is not None else None
        self._slots = trio.Semaphore(settings.max_concurrency)
        self._running = 0
        self._queued = 0
        self._capabilities = Capabilities(
            tasks=frozenset({Task.CHAT, Task.COMPLETION}),
            models=tuple(ModelCard(model, task) for model in settings.models for task in (Task.CHAT, Task.COMPLETION)),
            streaming=True,
            protocols=frozenset({"cli"}),
        )

    # ---- what it offers --------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def queue_size(self) -> int:
        return self._queued

    def describe(self) -> dict[str, object]:
        path, problem = self._resolve_executable()
        return {
            "command": self.settings.command,  # the template: placeholders, never a prompt
            "executable": path,
            "executable_problem": problem,
            "prompt_via": "argument" if self.template.uses("prompt") else "stdin",
            "running": self._running,
            "queued": self._queued,
            "max_concurrency": self.settings.max_concurrency,
            "timeout_s": self.settings.timeout_s,
        }

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.status = await self.check_health()

    async def check_health(self) -> BackendStatus:
        """HEALTHY when the executable (and the working directory, if set) can be found."""
        _, problem = self._resolve_executable()
        self.status_detail = problem or ""
        return BackendStatus.OFFLINE if problem else BackendStatus.HEALTHY

    def _resolve_executable(self) -> tuple[str | None, str | None]:
        """`(path, None)` when the tool can be started, else `(None, why not)`."""
        cwd = self._cwd
        if cwd is not None and not os.path.isdir(cwd):
            return None, f"working directory {cwd!r} does not exist"
        exe = self._executable
        if os.path.dirname(exe):  # a path: exec resolves it against the working directory
            candidate = os.path.join(cwd or os.getcwd(), exe)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return os.path.abspath(candidate), None
            return None, f"{exe!r} is not an executable file"
        # subprocess searches the child's PATH, so an overridden PATH counts here too.
        found = shutil.which(exe, path=self._environment().get("PATH", os.defpath))
        if found is None:
            return None, f"executable {exe!r} not found on PATH"
        return found, None

    def _environment(self) -> dict[str, str]:
        return {**os.environ, **self.settings.env}

    # ---- inference ------------------------------------------------------------------

    async def stream(self, request: GenerationRequest, ctx: RequestContext) -> AsyncGenerator[GenerationChunk, None]:
        if request.model not in self.settings.models:
            raise ModelNotFoundError(
                f"CLI backend {self.id} serves {', '.join(self.settings.models)}, not {request.model!r}",
                param="model",
            )
        prompt, system = render_request(request, system_placeholder=self.template.uses("system"))
        argv = self._argv(request, prompt, system)
        stdin_data = None if self.template.uses("prompt") else prompt.encode()
        deadline, limit = self._deadline(ctx)
        await self._take_slot(deadline, limit)
        self._running += 1
        try:
            tool = await self._start_tool(argv, stdin_data)
            try:
                output = _Output(request.params.stop, chars_for_tokens(request.params.max_tokens))
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                finish: FinishReason | None = None
                while finish is None:
                    data = await self._before(deadline, limit, tool.receive_some)
                    if not data:
                        break
                    text, finish = output.push(decoder.decode(data))
                    if text:
                        yield GenerationChunk(text)
                if finish is None:
                    returncode = await self._before(deadline, limit, tool.wait)
                    if returncode != 0:
                        raise self._failure(tool, returncode)
                    text, finish = output.finish(decoder.decode(b"", final=True))
                    if text:
                        yield GenerationChunk(text)
                else:
                    # Stop string or max_tokens reached: the rest of the answer is unwanted.
                    with trio.CancelScope(shield=True):
                        await tool.terminate(self.settings.kill_grace_s)
                usage = Usage(estimate_tokens(prompt) + estimate_tokens(system), tokens_for_chars(output.emitted_chars))
                yield GenerationChunk("", finish_reason=finish, usage=usage)
            finally:
                with trio.CancelScope(shield=True):
                    await tool.terminate(self.settings.kill_grace_s)
        finally:
            self._running -= 1
            self._slots.release()

    def _argv(self, request: GenerationRequest, prompt: str, system: str) -> list[str]:
        values = {
            "prompt": prompt,
            "system": system,
            "model": request.model,
            "max_tokens": str(request.params.max_tokens),
            "temperature": str(request.params.temperature),
        }
        for name in self.template.placeholders:
            if "\0" in values[name]:
                raise InvalidRequestError(
                    f"the {name} contains a NUL character, which a command-line argument cannot carry"
                )
        argv = self.template.render(values)
        argv[0] = self._executable
        return argv

    def _deadline(self, ctx: RequestContext) -> tuple[float, str]:
        """The absolute deadline for this request and how to explain reaching it."""
        own = trio.current_time() + self.settings.timeout_s
        if ctx.deadline is not None and ctx.deadline < own:
            return ctx.deadline, f"request {ctx.request_id} reached its deadline on CLI backend {self.id}"
        return own, f"CLI backend {self.id}: {self.template.executable} ran past timeout_s={self.settings.timeout_s:g}"

    async def _take_slot(self, deadline: float, limit: str) -> None:
        self._queued += 1
        try:
            await self._before(deadline, f"{limit} (while queued)", self._slots.acquire)
        finally:
            self._queued -= 1

    @staticmethod
    async def _before(deadline: float, limit: str, step: Callable[[], Awaitable[T]]) -> T:
        # One scope per await, never around a yield: safe inside an async generator.
        with trio.move_on_at(deadline):
            return await step()
        raise DeadlineExceededError(limit)

    async def _start_tool(self, argv: list[str], stdin_data: bytes | None) -> ToolProcess:
        where = f"CLI backend {self.id}"
        exe = self.template.executable
        try:
            return await ToolProcess.start(argv, stdin_data=stdin_data, env=self._environment(), cwd=self._cwd)
        except FileNotFoundError as exc:
            if self._cwd is not None and exc.filename == self._cwd:
                problem = f"working directory {self._cwd!r} does not exist"
            else:
                problem = f"executable {exe!r} not found"
            raise self._unavailable(f"{where} cannot start its tool: {problem}", problem) from exc
        except PermissionError as exc:
            problem = f"{exe!r} cannot be executed: {exc.strerror}"
            raise self._unavailable(f"{where} cannot start its tool: {problem}", problem) from exc
        except OSError as exc:
            if exc.errno == errno.E2BIG:
                raise ContextWindowExceededError(
                    f"{where}: the prompt is too long for a command-line argument; a command template "
                    "without {prompt} sends it on stdin instead"
                ) from exc
            raise BackendUnavailableError(f"{where} cannot start {exe!r}: {exc}") from exc

    def _unavailable(self, message: str, problem: str) -> BackendUnavailableError:
        # Route around this backend until the next health check says otherwise.
        self.status = BackendStatus.OFFLINE
        self.status_detail = problem
        return BackendUnavailableError(message)

    def _failure(self, tool: ToolProcess, returncode: int) -> BackendFailedError:
        if returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        else:
            how = f"exited with code {returncode}"
        lines = [line.strip() for line in tool.stderr_tail().splitlines() if line.strip()]
        quoted = " | ".join(lines[-STDERR_LINES_QUOTED:]) or "(nothing on stderr)"
        return BackendFailedError(f"CLI backend {self.id}: {self.template.executable} {how}: {quoted}")


class _Output:
    """What of the decoded stdout the client sees: stop strings, the max_tokens budget and
    the terminal's trailing newlines applied, in that order."""

    def __init__(self, stops: Sequence[str], budget_chars: int) -> None:
        self._stops = StopMatcher(stops)
        self._budget = budget_chars
        self._newlines = ""  # trailing newlines, shown only if more output follows
        self.emitted_chars = 0

    def push(self, text: str) -> tuple[str, FinishReason | None]:
        safe, stopped = self._stops.push(text)
        if stopped:
            shown, cut = self._spend(self._newlines + safe)
            return shown, "length" if cut else "stop"
        shown, cut = self._spend(self._hold_newlines(safe))
        return shown, "length" if cut else None

    def finish(self, text: str) -> tuple[str, FinishReason]:
        """At the end of output: release held text, minus the tool's final newlines."""
        safe, stopped = self._stops.push(text)
        rest = safe if stopped else safe + self._stops.flush()
        shown, cut = self._spend((self._newlines + rest).rstrip("\r\n"))
        self._newlines = ""
        return shown, "length" if cut else "stop"

    def _hold_newlines(self, text: str) -> str:
        combined = self._newlines + text
        body = combined.rstrip("\r\n")
        self._newlines = combined[len(body) :]
        return body

    def _spend(self, text: str) -> tuple[str, bool]:
        room = self._budget - self.emitted_chars
        cut = len(text) > room
        shown = text[: max(room, 0)]
        self.emitted_chars += len(shown)
        return shown, cut
