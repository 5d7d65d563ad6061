"""Process plumbing: a forked child's set-up, parent death, wait statuses, writes.

Every role that forks (main, the Dealer's recovery thread) and every child it makes use these,
so that each child starts the same way: the parent-death signal first (and a check that the
parent is still there), then its signal mask and handlers reset, then every descriptor it does
not need closed. What each fork's child may and may not touch is argued where the fork is.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal

PR_SET_PDEATHSIG = 1  # prctl(2) options
PR_SET_CHILD_SUBREAPER = 36


# Loaded once, at import, before any fork or thread: a forked child must not dlopen().
_LIBC = ctypes.CDLL(None, use_errno=True)


def write_all(fd: int, data: bytes) -> None:
    """All of `data` to a blocking descriptor: a pipe write larger than PIPE_BUF may be
    partial."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_exactly(fd: int, size: int, offset: int = 0) -> bytes:
    """`size` bytes of a file at `offset` (pread: no shared position); OSError if it ends
    before them."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise OSError(f"the file ends at {offset + len(data)}, before {offset + size}")
        data += more
    return data


def set_parent_death_signal(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    """Die with `sig` when the thread that forked us exits; if the parent is already gone,
    exit now. Call first thing in a child."""
    if _LIBC.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != expected_parent:
        os._exit(1)


def become_subreaper() -> None:
    """Orphaned descendants (workers of a killed Dealer) are reparented to us, so that we
    can reap them instead of leaving zombies to an init that may not."""
    if _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def children_of_self() -> set[int]:
    """This process's children, of all its threads (a child belongs to the thread that
    forked it; an orphan reparented to us, to one of our threads)."""
    children: set[int] = set()
    for task in _listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children.update(int(child) for child in f.read().split())
        except OSError:
            pass  # a thread that has just ended
    return children


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def kill_orphans(keep: set[int]) -> None:
    """SIGKILL every child of ours not in `keep`: processes orphaned by a worker that died
    and reparented to us, a child subreaper. A child that leads a process group of its own
    (a command: core/commands.py starts each in its own session) takes its whole group with
    it. A child is not reaped until we wait for it, so its pid, and the group's id, are
    still its own when we signal them."""
    own_group = os.getpgrp()
    for pid in children_of_self() - keep:
        try:
            if os.getpgid(pid) == pid != own_group:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone


def close_on_exec_all() -> None:
    """Mark every descriptor but 0, 1 and 2 close-on-exec, so that a command a worker
    starts inherits none of the pool's (queues, pipes): posix_ipc opens its queues without
    O_CLOEXEC."""
    for name in _listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, already closed


def close_fds_except(keep: set[int]) -> None:
    """Close every descriptor not in `keep`: queues, pipes and pidfds a forked child
    inherited but must not hold (a held queue outlives its owner and eats the budget)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        _close_range_except(keep)  # no descriptor left to list them with
        return
    for name in names:
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed


def _close_range_except(keep: set[int]) -> None:
    """Close every descriptor but those in `keep`, range by range: up to the hard limit,
    since some may have been opened under a higher soft limit than today's."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = soft if hard == resource.RLIM_INFINITY else max(soft, hard)
    start = 0
    for fd in sorted(keep | {limit}):
        if start < fd:  # closerange(a, 0) would close everything from a on
            os.closerange(start, fd)
        start = fd + 1


def redirect_stdin_to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def reset_signals_in_child(
    blocked: frozenset[int] = frozenset(), ignored: frozenset[int] = frozenset({signal.SIGINT})
) -> None:
    """A forked child starts with its parent's handlers, wake-up fd and signal mask (the
    parent forks with its signals blocked, so none is handled in between). Reset the
    handlers and the wake-up fd first, then set the mask, so that a signal pending since the
    fork meets this process's own dispositions. SIGINT is ignored because Ctrl-C reaches the
    whole process group, and main alone decides how a run ends. SIGPIPE is always ignored:
    a log whose reader went away (`taskpool run ... 2>&1 | head`) costs log lines, never a
    process (a write then fails with EPIPE, which the log handlers swallow)."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def kill_child(pid: int) -> bool:
    """SIGKILL `pid` if it is still a child of this process (so never a reused pid); whether
    it was. Its parent, which waits for it, reaps it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The command name, in parentheses, may hold spaces: the fields follow its last ')'.
    ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
    if ppid != os.getpid():
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def describe_wait_status(status: int) -> str:
    """'exited with status 3' or 'killed by signal 11 (SIGSEGV)'."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by signal {sig} ({name})"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"changed state ({status:#x})"
