"""A trio-native supervisor for one long-running server process.

It starts a command in its own process group, reports ready once an injected readiness
probe passes, and from then on treats any exit (even 0) or a run of failed liveness
probes as a crash: the whole group is killed (SIGTERM, then SIGKILL after a grace
period) and the command restarted after an exponential, capped backoff. Cancelling
`run` kills and reaps the group in a shielded `finally`, so no server outlives the node.

It knows nothing about what it supervises: probes and the command come from the caller.
"""

from __future__ import annotations

import enum
import logging
import os
import shlex
import signal
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import trio

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]

_MAX_LINE = 65536


class ProcessState(enum.StrEnum):
    STARTING = "starting"  # the first launch, not ready yet
    READY = "ready"
    RESTARTING = "restarting"  # crashed (or never became ready): backing off or relaunching
    FAILED = "failed"  # gave up; `run` raised ProcessFailedError
    STOPPED = "stopped"  # `run` was cancelled, the group is gone


class ProcessFailedError(Exception):
    """The supervisor gave up: the command can't be executed or keeps failing to start."""


@dataclass(frozen=True)
class SupervisorSettings:
    startup_timeout_s: float = 600.0
    readiness_interval_s: float = 0.5
    liveness_interval_s: float = 5.0
    liveness_failures: int = 3  # consecutive failed liveness probes that count as a crash
    probe_timeout_s: float = 5.0
    stop_grace_s: float = 10.0  # SIGTERM -> SIGKILL
    backoff_initial_s: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_max_s: float = 60.0
    # Running ready this long makes the next crash count as the first again (backoff reset).
    stable_after_s: float = 60.0
    # Consecutive launches that never became ready before giving up; None: never give up.
    max_start_failures: int | None = 5
    # Exit codes before readiness that no retry can fix (e.g. 2: a command-line usage error).
    fatal_exit_codes: frozenset[int] = frozenset()
    log_lines: int = 200
    log_path: Path | None = None  # output is also appended here when set
    env: Mapping[str, str] | None = None  # added to this process's environment
    cwd: Path | None = None


def backoff_delay(failures: int, initial_s: float, multiplier: float, max_s: float) -> float:
    """Delay before the relaunch that follows `failures` consecutive failures (>= 1)."""
    if failures <= 0:
        return 0.0
    try:
        return min(initial_s * multiplier ** (failures - 1), max_s)
    except OverflowError:  # a long crash loop with a large multiplier
        return max_s


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in the group. Zombies count as gone: orphans
    are reparented to PID 1, which in containers often never reaps them."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _redrawn(raw: bytes) -> bytes:
    """What a terminal would show: a carriage return redraws the line (progress bars)."""
    body = raw.rstrip(b"\r")
    return body[body.rfind(b"\r") + 1 :]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ProcessSupervisor:
    def __init__(
        self,
        command: Sequence[str],
        *,
        readiness: Probe,
        liveness: Probe | None = None,
        settings: SupervisorSettings | None = None,
        on_state_change: Callable[[ProcessState], None] | None = None,
        name: str | None = None,
        secrets: Sequence[str] = (),
    ) -> None:
        """`secrets` (API keys in the command line, say) are masked in everything this logs
        or keeps: servers like to echo their arguments."""
        if not command:
            raise ValueError("the command to supervise is empty")
        self.command = tuple(command)
        self._secrets = tuple(secret for secret in secrets if secret)
        self.name = name or Path(self.command[0]).name
        self.settings = settings or SupervisorSettings()
        self._readiness = readiness
        self._liveness = liveness or readiness
        self._on_state_change = on_state_change
        self.state = ProcessState.STARTING
        self.restart_count = 0
        self.last_exit_code: int | None = None
        self.last_failure = ""  # why the previous process stopped or was not started
        self.pid: int | None = None
        self.ready_since: float | None = None
        self._lines: deque[str] = deque(maxlen=max(1, self.settings.log_lines))
        self._partial = b""
        self._changed = trio.Event()

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "REDACTED")
        return text

    # ---- observation ---------------------------------------------------------------------

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last complete output lines of the supervised process(es)."""
        return list(self._lines)[-lines:] if lines > 0 else []

    async def wait_for(self, *states: ProcessState) -> ProcessState:
        """Returns once the state is one of `states` (immediately if it already is)."""
        while self.state not in states:
            await self._changed.wait()
        return self.state

    def _set_state(self, state: ProcessState) -> None:
        if state is self.state and state is not ProcessState.RESTARTING:
            return
        self.state = state
        self._changed.set()
        self._changed = trio.Event()
        if self._on_state_change is not None:
            self._on_state_change(state)

    # ---- the loop ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise until cancelled. Reports started once the first launch is ready;
        raises ProcessFailedError (before or after that) if it has to give up."""
        s = self.settings
        started = False
        start_failures = 0  # consecutive launches that never became ready
        crash_streak = 0  # consecutive failures of any kind, for the backoff
        try:
            while True:
                if crash_streak:
                    delay = backoff_delay(crash_streak, s.backoff_initial_s, s.backoff_multiplier, s.backoff_max_s)
                    log.info("%s: restarting in %.2fs (%s)", self.name, delay, self.last_failure)
                    await trio.sleep(delay)
                became_ready, exit_code, reason = await self._run_once(task_status if not started else None)
                started = started or became_ready
                self.last_exit_code = exit_code
                self.last_failure = reason
                if became_ready:
                    start_failures = 0
                    stable = self.ready_since is not None and time.monotonic() - self.ready_since >= s.stable_after_s
                    crash_streak = 1 if stable else crash_streak + 1
                else:
                    start_failures += 1
                    crash_streak += 1
                    fatal = exit_code is not None and exit_code in s.fatal_exit_codes
                    if fatal or (s.max_start_failures is not None and start_failures >= s.max_start_failures):
                        self._fail(f"{reason}; gave up after {start_failures} failed start(s)")
                self.ready_since = None
                self.restart_count += 1
                log.warning("%s stopped: %s", self.name, reason)
                self._set_state(ProcessState.RESTARTING)
        finally:
            if self.state is not ProcessState.FAILED:
                self._set_state(ProcessState.STOPPED)

    def _fail(self, reason: str) -> NoReturn:
        tail = "\n".join(self.log_tail(20))
        message = f"{self.name} failed: {reason}" + (f"\nlast output:\n{tail}" if tail else "")
        self.last_failure = reason
        self._set_state(ProcessState.FAILED)
        log.error("%s", message)
        raise ProcessFailedError(message)

    async def _run_once(self, task_status: trio.TaskStatus[None] | None) -> tuple[bool, int | None, str]:
        """Launch, wait for readiness, watch. Returns (became ready, exit code, why it ended)."""
        s = self.settings
        env = {**os.environ, **s.env} if s.env is not None else None
        try:
            process = await trio.lowlevel.open_process(
                list(self.command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we kill the engine's workers too
                env=env,
                cwd=s.cwd,
            )
        except OSError as exc:
            self._fail(f"cannot execute {self.command[0]!r}: {exc}")
        self.pid = process.pid
        log.info("%s started (pid %d): %s", self.name, process.pid, self._mask(shlex.join(self.command)))
        became_ready = False
        reason = ""
        try:
            async with trio.open_nursery() as output:
                assert process.stdout is not None
                output.start_soon(self._pump_output, process.stdout)
                try:
                    reason = await self._await_ready(process)
                    if not reason:
                        became_ready = True
                        self.ready_since = time.monotonic()
                        self._set_state(ProcessState.READY)
                        if task_status is not None:
                            task_status.started()
                        reason = await self._watch(process)
                finally:
                    with trio.CancelScope(shield=True):
                        await self._terminate(process)
                        # Let the pipe drain to EOF for the last lines, but never wait on a
                        # descendant that escaped the group and still holds it open.
                        with trio.move_on_after(1.0):
                            await process.wait()
                    output.cancel_scope.deadline = trio.current_time() + 1.0
        finally:
            self.pid = None
        return became_ready, process.returncode, reason

    async def _await_ready(self, process: trio.Process) -> str:
        """'' once ready; otherwise why it never became ready."""
        s = self.settings
        reason = ""
        with trio.move_on_after(s.startup_timeout_s) as timeout:
            async with trio.open_nursery() as nursery:

                async def exited() -> None:
                    nonlocal reason
                    code = await process.wait()
                    reason = f"exited with code {code} before it was ready"
                    nursery.cancel_scope.cancel()

                async def probing() -> None:
                    # Polling is the only way: the server offers no readiness notification.
                    while not await self._probe(self._readiness):  # noqa: ASYNC110
                        await trio.sleep(s.readiness_interval_s)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(exited)
                nursery.start_soon(probing)
        if timeout.cancelled_caught:
            reason = f"not ready after {s.startup_timeout_s:g}s"
        return reason

    async def _watch(self, process: trio.Process) -> str:
        """Returns why the ready process has to be replaced."""
        s = self.settings
        reason = ""
        async with trio.open_nursery() as nursery:

            async def exited() -> None:
                nonlocal reason
                code = await process.wait()
                reason = f"exited with code {code}"
                nursery.cancel_scope.cancel()

            async def liveness() -> None:
                nonlocal reason
                failures = 0
                while failures < s.liveness_failures:
                    await trio.sleep(s.liveness_interval_s)
                    failures = 0 if await self._probe(self._liveness) else failures + 1
                reason = f"failed {failures} liveness probes in a row"
                nursery.cancel_scope.cancel()

            nursery.start_soon(exited)
            nursery.start_soon(liveness)
        return reason

    async def _probe(self, probe: Probe) -> bool:
        with trio.move_on_after(self.settings.probe_timeout_s):
            try:
                return bool(await probe())
            except Exception as exc:  # a failing probe is a verdict, not a crash
                log.debug("%s: probe raised %r", self.name, exc)
        return False

    async def _pump_output(self, stream: trio.abc.ReceiveStream) -> None:
        log_file = None
        if self.settings.log_path is not None:
            log_file = await trio.open_file(self.settings.log_path, "ab")
        try:
            while chunk := await stream.receive_some(65536):
                if log_file is not None:
                    await log_file.write(chunk)
                    await log_file.flush()
                *complete, partial = (self._partial + chunk).split(b"\n")
                for raw in complete:
                    line = self._mask(_redrawn(raw).decode(errors="replace"))
                    self._lines.append(line)
                    log.debug("%s: %s", self.name, line)
                # Keep a pending "\r" (CRLF split across reads); bound a line that never ends.
                self._partial = (partial if partial.endswith(b"\r") else _redrawn(partial))[-_MAX_LINE:]
        finally:
            with trio.CancelScope(shield=True):
                if self._partial:
                    self._lines.append(self._mask(_redrawn(self._partial).decode(errors="replace")))
                    self._partial = b""
                if log_file is not None:
                    await log_file.aclose()
                await stream.aclose()

    async def _terminate(self, process: trio.Process) -> None:
        """SIGTERM the group, SIGKILL whatever is left after the grace period, reap the leader.

        The group outlives its leader: vLLM's engine and worker processes may still run
        after the API server exited, holding GPU memory, so the group is signalled even
        when the leader is already gone.
        """
        pgid = process.pid  # start_new_session: the leader's pid is the group id
        _signal_group(pgid, signal.SIGTERM)
        with trio.move_on_after(self.settings.stop_grace_s):
            await process.wait()
            # Nothing notifies us when non-child group members exit: poll.
            while await trio.to_thread.run_sync(_group_alive, pgid):  # noqa: ASYNC110
                await trio.sleep(0.05)
        if process.returncode is None or await trio.to_thread.run_sync(_group_alive, pgid):
            log.warning("%s: group %d still alive after %gs; killing it", self.name, pgid, self.settings.stop_grace_s)
            _signal_group(pgid, signal.SIGKILL)
        with trio.move_on_after(5.0):  # a process in uninterruptible sleep can outlast SIGKILL
            await process.wait()
