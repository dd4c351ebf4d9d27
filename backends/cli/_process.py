"""One run of a command-line tool as a trio subprocess, in its own process group.

The tool is started with `start_new_session=True`, so it and everything it spawns share
one process group that `terminate` can kill as a unit. Its three pipes are serviced
together without a long-lived background task (the caller is an async generator, which
must not yield inside a nursery): each wait for stdout or for the exit runs in a short
nursery that meanwhile feeds the prompt to stdin and drains stderr. Every step is
cancel-safe, so a deadline or a client leaving between steps loses nothing and leaks
nothing:

* `receive_some` on a pipe is cancelled only before it reads;
* stdin is written in pieces of at most `PIPE_BUF` bytes, which a pipe takes whole or not
  at all, so a cancelled write never half-happens.

Only the last `STDERR_TAIL_BYTES` of stderr are kept: enough to quote the tool's error,
bounded however much it writes.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import trio
import trio.lowlevel

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_SIZE = 65536
STDERR_TAIL_BYTES = 4096
# How long to wait for the kernel to finish off a SIGKILLed process before giving up on
# reaping it; only a process stuck in uninterruptible I/O takes longer.
REAP_TIMEOUT_S = 5.0


class ToolProcess:
    """A started tool. Build with `ToolProcess.start`; always finish with `terminate`."""

    def __init__(self, process: trio.Process, stdin_data: bytes) -> None:
        self._process = process
        self._stdin_left = memoryview(stdin_data)
        self._stdin_open = process.stdin is not None
        self._stderr_open = process.stderr is not None
        self._stderr_tail = bytearray()
        self._terminated = False

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        stdin_data: bytes | None,
        env: Mapping[str, str],
        cwd: str | None,
    ) -> ToolProcess:
        """Spawn `argv` (never through a shell). Raises OSError as `subprocess` does."""
        process = await trio.lowlevel.open_process(
            list(argv),
            # A tool given its prompt as an argument gets an empty stdin, so one that also
            # reads stdin when it isn't a terminal (`claude -p`, `llm`) doesn't wait on it.
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        log.debug("started %s as pid %d", argv[0], process.pid)
        return cls(process, stdin_data or b"")

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def stderr_tail(self) -> str:
        return self._stderr_tail.decode("utf-8", errors="replace")

    # ---- I/O ------------------------------------------------------------------------

    async def receive_some(self) -> bytes:
        """The next piece of stdout; b"" once the output is over.

        The output is over at end of file, or once the tool has exited and what it left in
        the pipe is read: a grandchild that inherited stdout must not hold the answer open.
        """
        if self._process.returncode is None:
            data = await self._pumping(self._stdout_or_exit)
            if data is not None:
                return data
        return self._read_ready(self._process.stdout)

    async def wait(self) -> int:
        """Wait for the tool to exit (stdin and stderr kept flowing); its exit status."""
        if self._process.returncode is None:
            await self._pumping(self._process.wait)
        self._keep_stderr(self._read_ready(self._process.stderr, everything=True))
        returncode = self._process.returncode
        assert returncode is not None
        return returncode

    async def _stdout_or_exit(self) -> bytes | None:
        assert self._process.stdout is not None
        data: bytes | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._cancel_on_exit, nursery.cancel_scope)
            data = bytes(await self._process.stdout.receive_some(READ_SIZE))
            nursery.cancel_scope.cancel()
        return data  # None: the tool exited first

    async def _cancel_on_exit(self, scope: trio.CancelScope) -> None:
        await self._process.wait()
        scope.cancel()

    async def _pumping(self, step: Callable[[], Awaitable[T]]) -> T:
        async with trio.open_nursery() as nursery:
            if self._stdin_open:
                nursery.start_soon(self._feed_stdin)
            if self._stderr_open:
                nursery.start_soon(self._drain_stderr)
            result = await step()
            nursery.cancel_scope.cancel()
        return result

    async def _feed_stdin(self) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            while self._stdin_left:
                piece = self._stdin_left[: select.PIPE_BUF]
                await stdin.send_all(piece)
                self._stdin_left = self._stdin_left[len(piece) :]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The tool exited or closed stdin without reading it all; its exit status and
            # output say whether that was a problem.
            pass
        self._stdin_open = False
        await stdin.aclose()

    async def _drain_stderr(self) -> None:
        stderr = self._process.stderr
        assert stderr is not None
        while self._stderr_open:
            data = bytes(await stderr.receive_some(READ_SIZE))
            if not data:
                self._stderr_open = False
            self._keep_stderr(data)

    def _keep_stderr(self, data: bytes) -> None:
        self._stderr_tail += data
        del self._stderr_tail[:-STDERR_TAIL_BYTES]

    @staticmethod
    def _read_ready(stream: trio.abc.ReceiveStream | None, *, everything: bool = False) -> bytes:
        """What the pipe holds right now, without waiting (b"" at EOF or when empty)."""
        if not isinstance(stream, trio.lowlevel.FdStream):
            return b""
        chunks: list[bytes] = []
        # Bounded: a leftover grandchild writing flat out must not keep us here.
        for _ in range(64 if everything else 1):
            try:
                data = os.read(stream.fileno(), READ_SIZE)
            except OSError:  # BlockingIOError when empty, EBADF once closed
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    # ---- ending ---------------------------------------------------------------------

    async def terminate(self, grace_s: float) -> None:
        """Kill the whole process group and reap the tool. Idempotent; call it shielded.

        SIGTERM first, giving the tool `grace_s` to exit, then SIGKILL to the group in any
        case: whatever it spawned and left behind dies with it.
        """
        if self._terminated:
            return
        self._terminated = True
        if self._process.returncode is None:
            self._signal_group(signal.SIGTERM)
            with trio.move_on_after(grace_s):
                await self._process.wait()
        self._signal_group(signal.SIGKILL)
        with trio.move_on_after(REAP_TIMEOUT_S) as scope:
            await self._process.wait()
        if scope.cancelled_caught:
            log.warning("pid %d did not die %ss after SIGKILL; leaving it", self.pid, REAP_TIMEOUT_S)
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            if stream is not None:
                await stream.aclose()

    def _signal_group(self, sig: signal.Signals) -> None:
        # The group id is the tool's pid (start_new_session). The kernel keeps that id
        # reserved while any member lives, so even after the tool is reaped this reaches
        # its leftovers and not some later process that got the same pid.
        try:
            os.killpg(self._process.pid, sig)
        except ProcessLookupError:
            pass  # everyone is gone already
        except PermissionError as exc:  # macOS says this for a group of zombies
            log.debug("could not signal process group %d: %s", self._process.pid, exc)
