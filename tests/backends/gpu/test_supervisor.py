"""The process supervisor against real subprocesses and real process groups.

The supervised program is a small Python child driven through files in a work
directory: it marks itself ready (`ready-<pid>`) after a delay, exits with the code
written to `exit-<pid>`, can start a grandchild in its group and can ignore SIGTERM.
The probes read those files, so every verdict comes from the real process.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from pathlib import Path

import pytest
import trio

from backends.gpu.supervisor import (
    ProcessFailedError,
    ProcessState,
    ProcessSupervisor,
    SupervisorSettings,
    backoff_delay,
)
from tests.conftest import wait_until

CHILD = """
import os, pathlib, signal, subprocess, sys, time
work, delay = pathlib.Path(sys.argv[1]), float(sys.argv[2])
opts = dict(arg.split("=", 1) for arg in sys.argv[3:])
pid = os.getpid()
ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if opts.get("ignore_term") == "1" else ""
exec(ignore)
if "grandchild" in opts:
    grandchild = subprocess.Popen([sys.executable, "-c", ignore + "import time\\ntime.sleep(3600)"])
    (work / f"grandchild-{pid}").write_text(str(grandchild.pid))
for i in range(int(opts.get("lines", "0"))):
    print(f"line {i}", flush=True)
if "fail" in opts:
    print("boom: " + opts["fail"], file=sys.stderr, flush=True)
    sys.exit(int(opts.get("code", "3")))
time.sleep(delay)
if "never_ready" not in opts:
    (work / f"ready-{pid}").touch()
while True:
    exit_file = work / f"exit-{pid}"
    if exit_file.exists():
        sys.exit(int(exit_file.read_text()))
    time.sleep(0.02)
"""

FAST = SupervisorSettings(
    startup_timeout_s=10.0,
    readiness_interval_s=0.02,
    liveness_interval_s=0.05,
    liveness_failures=3,
    probe_timeout_s=1.0,
    stop_grace_s=2.0,
    backoff_initial_s=0.05,
    backoff_max_s=0.2,
    max_start_failures=3,
)


def gone(pid: int) -> bool:
    """Dead: reaped, or a zombie nobody reaps (PID 1 here does not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def real_path(path: Path) -> Path:
    return path.resolve()


class Child:
    """A supervisor over the scripted child, with file-based probes."""

    def __init__(self, work: Path, *, delay: float = 0.0, settings: SupervisorSettings = FAST, **opts: str) -> None:
        self.work = work
        argv = [sys.executable, "-c", CHILD, str(work), str(delay), *(f"{k}={v}" for k, v in opts.items())]
        self.sick: set[int] = set()
        self.probes = 0
        self.supervisor = ProcessSupervisor(
            argv, readiness=self.ready, liveness=self.alive, settings=settings, name="child"
        )

    async def ready(self) -> bool:
        self.probes += 1
        pid = self.supervisor.pid
        return pid is not None and (self.work / f"ready-{pid}").exists()

    async def alive(self) -> bool:
        return self.supervisor.pid not in self.sick

    @property
    def pid(self) -> int:
        assert self.supervisor.pid is not None
        return self.supervisor.pid

    def exit_with(self, code: int) -> None:
        (self.work / f"exit-{self.pid}").write_text(str(code))

    def grandchild(self, pid: int) -> int:
        return int((self.work / f"grandchild-{pid}").read_text())


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0)],
)
def test_backoff_doubles_from_the_initial_delay_up_to_the_cap(failures: int, expected: float) -> None:
    assert backoff_delay(failures, 1.0, 2.0, 60.0) == expected


def test_backoff_survives_a_multiplier_that_would_overflow() -> None:
    assert backoff_delay(10, 1.0, 1e300, 60.0) == 60.0


async def test_started_is_reported_only_once_the_readiness_probe_passes(tmp_path: Path) -> None:
    child = Child(tmp_path, delay=0.4)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            started_at = trio.current_time()
            await nursery.start(child.supervisor.run)
        assert trio.current_time() - started_at >= 0.4
        assert child.probes > 1  # it was polled while the child was still loading
        assert child.supervisor.state is ProcessState.READY
        assert (tmp_path / f"ready-{child.pid}").exists()
        assert child.supervisor.restart_count == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("code", [0, 1])
async def test_any_exit_of_a_ready_process_even_zero_restarts_it(tmp_path: Path, code: int) -> None:
    child = Child(tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(child.supervisor.run)
            first = child.pid
            child.exit_with(code)
            await child.supervisor.wait_for(ProcessState.RESTARTING)
            assert child.supervisor.restart_count == 1
            assert child.supervisor.last_exit_code == code
            assert child.supervisor.last_failure == f"exited with code {code}"
            await child.supervisor.wait_for(ProcessState.READY)
        assert child.pid != first
        assert gone(first)
        nursery.cancel_scope.cancel()


async def test_failing_liveness_probes_kill_the_process_and_restart_it(tmp_path: Path) -> None:
    child = Child(tmp_path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(child.supervisor.run)
            first = child.pid
            child.sick.add(first)
            await child.supervisor.wait_for(ProcessState.RESTARTING)
            assert child.supervisor.last_failure == "failed 3 liveness probes in a row"
            assert child.supervisor.last_exit_code == -signal.SIGTERM
            await child.supervisor.wait_for(ProcessState.READY)
        assert gone(first)
        assert child.supervisor.restart_count == 1
        nursery.cancel_scope.cancel()


async def test_a_process_that_keeps_failing_to_start_fails_with_its_last_output(tmp_path: Path) -> None:
    child = Child(tmp_path, settings=dataclasses.replace(FAST, max_start_failures=2), fail="no weights in /models")
    with trio.fail_after(10), pytest.raises(ProcessFailedError) as failure:
        await child.supervisor.run()
    message = str(failure.value)
    assert "exited with code 3 before it was ready" in message
    assert "gave up after 2 failed start(s)" in message
    assert "boom: no weights in /models" in message
    assert child.supervisor.state is ProcessState.FAILED
    assert child.supervisor.restart_count == 1


async def test_a_fatal_exit_code_fails_without_retrying(tmp_path: Path) -> None:
    settings = dataclasses.replace(FAST, fatal_exit_codes=frozenset({2}))
    child = Child(tmp_path, settings=settings, fail="usage: bad flag", code="2")
    with trio.fail_after(10), pytest.raises(ProcessFailedError, match="exited with code 2"):
        await child.supervisor.run()
    assert child.supervisor.restart_count == 0
    assert child.supervisor.log_tail() == ["boom: usage: bad flag"]


async def test_a_missing_executable_fails_at_once(tmp_path: Path) -> None:
    supervisor = ProcessSupervisor([str(tmp_path / "no-such-server")], readiness=_never, settings=FAST)
    with trio.fail_after(5), pytest.raises(ProcessFailedError, match="cannot execute"):
        await supervisor.run()
    assert supervisor.state is ProcessState.FAILED


async def _never() -> bool:
    return False


async def test_a_process_not_ready_in_time_is_killed_and_counts_as_a_failed_start(tmp_path: Path) -> None:
    settings = dataclasses.replace(FAST, startup_timeout_s=0.5, max_start_failures=1)
    child = Child(tmp_path, settings=settings, never_ready="1", grandchild="1")
    pids: list[int] = []

    async def remember_pid() -> bool:
        if child.supervisor.pid is not None and child.supervisor.pid not in pids:
            pids.append(child.supervisor.pid)
        return False

    child.supervisor._readiness = remember_pid
    with trio.fail_after(10), pytest.raises(ProcessFailedError, match=r"not ready after 0.5s"):
        await child.supervisor.run()
    assert len(pids) == 1
    assert gone(pids[0])
    assert gone(child.grandchild(pids[0]))


@pytest.mark.parametrize("ignore_term", [False, True])
async def test_cancelling_run_kills_the_whole_group_and_reaps_it(tmp_path: Path, ignore_term: bool) -> None:
    settings = dataclasses.replace(FAST, stop_grace_s=0.5)
    child = Child(tmp_path, settings=settings, grandchild="1", ignore_term="1" if ignore_term else "0")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(child.supervisor.run)
        leader = child.pid
        grandchild = child.grandchild(leader)
        assert not gone(grandchild)
        cancelled_at = trio.current_time()
        nursery.cancel_scope.cancel()
    stop_took = trio.current_time() - cancelled_at
    assert gone(leader)
    assert gone(grandchild)
    assert child.supervisor.state is ProcessState.STOPPED
    assert child.supervisor.pid is None
    if ignore_term:
        assert 0.5 <= stop_took < 5  # SIGTERM ignored: SIGKILL after the grace period
    else:
        assert stop_took < 0.5


async def test_a_leader_that_exits_leaves_no_stragglers_in_its_group(tmp_path: Path) -> None:
    child = Child(tmp_path, grandchild="1")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(child.supervisor.run)
            first = child.pid
            straggler = child.grandchild(first)
            child.exit_with(0)
            await child.supervisor.wait_for(ProcessState.RESTARTING)
            await child.supervisor.wait_for(ProcessState.READY)
        assert gone(straggler)
        assert not gone(child.grandchild(child.pid))
        nursery.cancel_scope.cancel()


async def test_output_is_kept_in_a_bounded_buffer_and_appended_to_the_log_file(tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    settings = dataclasses.replace(FAST, log_lines=3, log_path=log_path)
    child = Child(tmp_path, settings=settings, lines="5")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(child.supervisor.run)
            # Ready is seen by polling a file: the output may still be in the pipe.
            await wait_until(lambda: child.supervisor.log_tail(1) == ["line 4"])
            nursery.cancel_scope.cancel()
    assert child.supervisor.log_tail() == ["line 2", "line 3", "line 4"]
    assert child.supervisor.log_tail(1) == ["line 4"]
    assert log_path.read_text().splitlines() == [f"line {i}" for i in range(5)]


async def test_environment_and_working_directory_reach_the_process(tmp_path: Path) -> None:
    script = "import os; print(os.environ['SUPERVISED_FLAVOUR'], os.getcwd(), flush=True); import time; time.sleep(60)"
    settings = dataclasses.replace(FAST, env={"SUPERVISED_FLAVOUR": "mint"}, cwd=tmp_path)
    supervisor: ProcessSupervisor

    async def printed() -> bool:
        return bool(supervisor.log_tail())  # complete lines only

    supervisor = ProcessSupervisor([sys.executable, "-c", script], readiness=printed, settings=settings)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(supervisor.run)
        nursery.cancel_scope.cancel()
    assert supervisor.log_tail() == [f"mint {real_path(tmp_path)}"]


async def test_progress_bar_redraws_are_kept_as_what_a_terminal_would_show(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "sys.stdout.write('Loading weights 10%\\rLoading weights 100%\\r\\n'); sys.stdout.flush()\n"
        "sys.stdout.write('partial'); sys.stdout.flush(); time.sleep(0.3)\n"
        "sys.stdout.write(' line\\nno newline at exit'); sys.stdout.flush()\n"
    )
    supervisor = ProcessSupervisor(
        [sys.executable, "-c", script], readiness=_never, settings=dataclasses.replace(FAST, max_start_failures=1)
    )
    with trio.fail_after(10), pytest.raises(ProcessFailedError, match="exited with code 0 before it was ready"):
        await supervisor.run()
    assert supervisor.log_tail() == ["Loading weights 100%", "partial line", "no newline at exit"]


async def test_secrets_are_masked_in_the_kept_output_and_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="backends.gpu.supervisor")
    script = "import sys; print('args:', sys.argv[1:], flush=True)"
    supervisor = ProcessSupervisor(
        [sys.executable, "-c", script, "--api-key", "sk-hush"],
        readiness=_never,
        settings=dataclasses.replace(FAST, max_start_failures=1),
        secrets=["sk-hush"],
    )
    with trio.fail_after(10), pytest.raises(ProcessFailedError) as failure:
        await supervisor.run()
    assert supervisor.log_tail() == ["args: ['--api-key', 'REDACTED']"]
    assert "sk-hush" not in str(failure.value)
    assert "REDACTED" in caplog.text
    assert "sk-hush" not in caplog.text


async def _crash_and_time_the_restart(child: Child) -> float:
    child.exit_with(0)
    await child.supervisor.wait_for(ProcessState.RESTARTING)
    crashed_at = trio.current_time()
    await child.supervisor.wait_for(ProcessState.READY)
    return trio.current_time() - crashed_at


async def test_restarts_back_off_exponentially_up_to_the_cap_while_it_keeps_crashing(tmp_path: Path) -> None:
    settings = dataclasses.replace(FAST, backoff_initial_s=0.1, backoff_multiplier=2.0, backoff_max_s=0.4)
    child = Child(tmp_path, settings=settings)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(15):
            await nursery.start(child.supervisor.run)
            gaps = [await _crash_and_time_the_restart(child) for _ in range(4)]
        for gap, backoff in zip(gaps, [0.1, 0.2, 0.4, 0.4], strict=True):
            assert backoff <= gap < backoff + 2.0
        assert child.supervisor.restart_count == 4
        nursery.cancel_scope.cancel()


async def test_a_long_stable_run_makes_the_next_crash_count_as_the_first(tmp_path: Path) -> None:
    settings = dataclasses.replace(
        FAST, backoff_initial_s=0.05, backoff_multiplier=100.0, backoff_max_s=10.0, stable_after_s=0.3
    )
    child = Child(tmp_path, settings=settings)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(15):
            await nursery.start(child.supervisor.run)
            assert await _crash_and_time_the_restart(child) < 2.0  # first crash: 0.05 s
            await trio.sleep(0.4)  # stable now: without the reset the next delay would be 5 s
            assert await _crash_and_time_the_restart(child) < 2.0
        nursery.cancel_scope.cancel()
