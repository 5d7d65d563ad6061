"""One attempt of a job of real work, in whichever worker runs it (the local engine's, a
Dask worker): a command (sh, exec) as a child process, or a call in this process.

A command runs in a session and process group of its own (posix_spawn with setsid), as a
child of the worker, its standard input /dev/null, its output in the two files it is given.
posix_spawn, not fork: the worker has a heartbeat thread, and glibc's posix_spawn runs
nothing in the child but the exec's set-up (clone(CLONE_VM|CLONE_VFORK)), so no lock of
another thread can be inherited held. The worker ignores SIGINT and SIGTERM; the child's
signals are set back to their defaults (setsigdef) and its mask emptied, so that the
command meets SIGTERM as any program expects to.

The worker waits for it blocking in the kernel: select() on a pidfd, timed only by the
job's timeout (the heartbeat thread beats meanwhile). When the command's first process
ends, what is left of its process group is killed before that process is reaped (while
it is a zombie its pid, the group's id, cannot be reused): a job's processes never outlive
it. Past its timeout the whole group gets SIGTERM, then SIGKILL TERM_GRACE seconds later.

What this cannot do alone: outlive its worker. If the worker dies mid-command, the command
is orphaned and reparented to the Dealer, a child subreaper, which kills its whole group
(local/supervisor.py: kill_orphans). A process that leaves the command's process group
(setsid, setpgid) escapes both, as it would escape a shell's job control.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

from taskpool.model.commands import CommandError, call_spec, exec_argv
from taskpool.model.jobs import JobKind
from taskpool.wire.commands import Ending

# Between SIGTERM and SIGKILL of a timed-out command's process group: long enough for a
# program to clean up on SIGTERM, well within the 2 s that nothing of a job may outlive it.
TERM_GRACE = 1.0
# A call's return value, as JSON, at most: a larger one fails the job (it travels over
# queues and pipes to main, who holds it until recorded).
RESULT_MAX = 1 << 20
# 127 and 126, as a shell says a command could not be found or run.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_RUN = 126

# A call's output is caught by pointing this process's descriptors 1 and 2 at its files:
# two calls in one process (a Dask worker of several threads) would share them, so calls
# in one process run one at a time.
_CALL_LOCK = threading.Lock()

_DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


@dataclass(frozen=True)
class Killed:
    """How a command ended that is not an Ending: killed by a signal (not ours), or past its
    timeout. The worker treats both as a crash of the attempt (core/supervision.py)."""

    signal: int = 0  # the signal that killed it; 0 if it timed out
    timed_out: bool = False


def run_attempt(kind: JobKind, text: str, timeout: float | None, paths: tuple[str, str],
                spawned: Callable[[int], None] | None = None) -> Ending | Killed:
    """One attempt of a job of real work, its output to the files at `paths` (made new:
    open_output): a call run here, or a command run to its end or its timeout."""
    out_fd, err_fd = open_output(paths[0]), open_output(paths[1])
    try:
        if kind is JobKind.FUNCTION:
            return run_call(text, out_fd, err_fd)
        return run_command(kind, text, timeout, out_fd, err_fd, spawned)
    finally:
        os.close(out_fd)
        os.close(err_fd)


def run_command(kind: JobKind, text: str, timeout: float | None, stdout_fd: int,
                stderr_fd: int, spawned: Callable[[int], None] | None = None) -> Ending | Killed:
    """Run an sh or exec job's command to its end (or its timeout). `spawned` is told the
    command's pid (its process group's id) once it runs: a Dask worker tells main, who
    kills the group if the worker dies first (dask/worker.py)."""
    started = time.monotonic()
    try:
        argv = ["/bin/sh", "-c", text] if kind is JobKind.SH else exec_argv(text)
    except CommandError as e:
        return _not_started(text, e, stderr_fd, started)
    try:
        pid = os.posix_spawnp(
            argv[0], argv, os.environ,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
                          (os.POSIX_SPAWN_DUP2, stderr_fd, 2)],
            setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=())
    except OSError as e:
        return _not_started(argv[0], e, stderr_fd, started)
    if spawned is not None:
        spawned(pid)
    status, timed_out = _wait(pid, timeout)
    duration = time.monotonic() - started
    if timed_out:
        return Killed(timed_out=True)
    if os.WIFSIGNALED(status):
        return Killed(signal=os.WTERMSIG(status))
    return Ending(duration, exit_status=os.waitstatus_to_exitcode(status))


def _not_started(program: str, error: Exception, stderr_fd: int, started: float) -> Ending:
    """A command that could not be started fails as a shell says it: 127 (not found) or
    126 (not runnable), and the reason on its standard error."""
    if isinstance(error, CommandError):
        reason, status = str(error), EXIT_CANNOT_RUN
    else:
        assert isinstance(error, OSError)
        reason = f"cannot run {program!r}: {error.strerror}"
        status = EXIT_NOT_FOUND if isinstance(error, FileNotFoundError) else EXIT_CANNOT_RUN
    with contextlib.suppress(OSError):
        os.write(stderr_fd, f"taskpool: {reason}\n".encode())
    return Ending(time.monotonic() - started, exit_status=status, error=reason)


def _wait(pid: int, timeout: float | None) -> tuple[int, bool]:
    """Wait for the command `pid` (the leader of its process group) to end, blocking in
    select() on its pidfd; past `timeout`, end its group. Its raw wait status, and whether
    it timed out."""
    pidfd = os.pidfd_open(pid)
    try:
        ended, _, _ = select.select([pidfd], [], [], timeout)
        timed_out = not ended
        if timed_out:
            _signal_group(pid, signal.SIGTERM)
            select.select([pidfd], [], [], TERM_GRACE)
        # The leader has ended (a zombie: its pid, the group's id, is still ours) or the
        # grace is over: nothing of the job outlives it.
        _signal_group(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    return status, timed_out


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --- call -------------------------------------------------------------------------------

def run_call(text: str, stdout_fd: int, stderr_fd: int) -> Ending:
    """Run a call job in this process: import module:function, call it with the JSON
    arguments, its return value (JSON) the result. An exception, an import that fails and
    a result that is too large or not JSON end the job failed, with the reason; what it
    prints goes to the attempt's output files."""
    started = time.monotonic()
    _cwd_importable()
    with _CALL_LOCK, _output_to(stdout_fd, stderr_fd):
        try:
            module, function, args = call_spec(text)
            target = _resolve(module, function)
        except BaseException as e:  # noqa: BLE001 - whatever the import raised fails the job
            return Ending(time.monotonic() - started,
                          error=f"cannot import {text.split(None, 1)[0]}: {_said(e)}")
        try:
            value = target(*args)
        except BaseException as e:  # noqa: BLE001 - even SystemExit is the job's outcome
            return Ending(time.monotonic() - started, error=_said(e))
    return _returned(value, time.monotonic() - started)


def _returned(value: Any, duration: float) -> Ending:
    try:
        size = len(json.dumps(value))
    except (TypeError, ValueError) as e:
        return Ending(duration, error=f"its return value is not JSON: {e}")
    if size > RESULT_MAX:
        return Ending(duration, error=f"its return value is {size} bytes as JSON, over the "
                                      f"limit of {RESULT_MAX}")
    return Ending(duration, result=value)


def _said(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _resolve(module: str, path: str) -> Callable[..., Any]:
    target: Any = importlib.import_module(module)
    for name in path.split("."):
        target = getattr(target, name)
    if not callable(target):
        raise TypeError(f"{module}:{path} is a {type(target).__name__}, not a function")
    return target  # type: ignore[no-any-return]


def _cwd_importable() -> None:
    """Modules of the directory taskpool was started in import, as with `python -m`,
    whichever way taskpool was started (its console script puts its own directory first)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


@contextlib.contextmanager
def _output_to(stdout_fd: int, stderr_fd: int) -> Iterator[None]:
    """Descriptors 1 and 2 of this process to the attempt's files while a call runs: what
    it prints, from Python or from C, is its output."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def open_output(path: str) -> int:
    """An attempt's output file, new: a file of an earlier attempt that is still held by a
    command being killed is unlinked first, so that the two never write into one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
