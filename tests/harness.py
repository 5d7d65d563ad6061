"""Run taskpool as a user would, and watch it through its events.

A `PoolRun` starts `python -m taskpool run ...` in a session of its own (so that a test can
send SIGINT to its whole process group, as a terminal does) and reads its log line by line in
a thread. Given `events=PATH`, the run writes its events there too (`--events`, JSON Lines: see
taskpool/observe/events.py), a second thread reads each one as it is written (woken by
inotify, never by a timer), and a test waits for an event and reads its fields
(`wait_for_event`, `events_named`): never for a fixed time, never on a log line's wording,
which tests/test_log_format.py alone checks.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Callable

import pytest

from taskpool.observe import events as ev

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0  # generous: a loaded 2-core CI machine must never fail a correct run

Event = dict[str, Any]  # one line of an --events file


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def expected_result(kind: str, arg: float) -> float | int:
    return fib(int(arg)) if kind == "fib" else float(arg)


class FileWatch:
    """Wakes a reader when a file (or any file of a directory) is written: inotify, so that
    the reader blocks in the kernel between writes instead of polling."""

    _libc = ctypes.CDLL(None, use_errno=True)
    IN_MODIFY, IN_CREATE, IN_MOVED_TO = 0x2, 0x100, 0x80
    IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC

    def __init__(self, path: Path) -> None:
        self.fd = self._libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = self.IN_MODIFY | self.IN_CREATE | self.IN_MOVED_TO
        if self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            errno = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(errno, f"inotify_add_watch {path}")

    def wait(self, also: int | None = None, timeout: float | None = None) -> list[int]:
        """Block until the file is written or `also` is readable, or `timeout` passes;
        return the descriptors that are ready. A write made since the last wait counts:
        none is missed."""
        ready, _, _ = select.select([self.fd] + ([also] if also is not None else []), [], [],
                                    timeout)
        while True:
            try:
                if not os.read(self.fd, 65536):
                    break
            except BlockingIOError:
                break
        return ready

    def close(self) -> None:
        os.close(self.fd)


def as_user(user: int, command: Sequence[str]) -> list[str]:
    """`command` run as `user` (from root), or the test skipped when that user cannot start
    this interpreter: a pyenv Python other than the system's version finds its libpython
    only under /root, which only root may enter (make test-pythons runs such Pythons)."""
    if not _runs_as(user):
        pytest.skip(f"user {user} cannot run {sys.executable} (its libpython is out of reach)")
    return [*_setpriv(user), *command]


def _setpriv(user: int) -> list[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]


@cache
def _runs_as(user: int) -> bool:
    probe = [*_setpriv(user), sys.executable, "-c", "import taskpool"]
    return subprocess.run(probe, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=WAIT).returncode == 0


class PoolRun:
    """One taskpool process tree, started in its own session.

    With `events=PATH` the run is given `--events PATH`: its events are read as they are
    written, and `wait_for_event`, `events_named` and the pid helpers read them. (That run
    logs at DEBUG level to the file, so its workers Ack every job, as with --verbose: see
    protocol.is_acked. A test of the Ack-less path runs without events.)"""

    def __init__(
        self,
        args: Sequence[str],
        *,
        stdin: bytes | None = None,
        pipe_stdin: bool = False,
        preexec_fn: Callable[[], None] | None = None,
        user: int | None = None,
        command_name: str = "run",
        events: Path | None = None,
        stdout: Path | None = None,
    ) -> None:
        command = [sys.executable, "-m", "taskpool", command_name, *args]
        if events is not None:
            command += ["--events", str(events)]
            events.write_bytes(b"")  # to watch it before the run writes a line
            if user is not None:
                events.chmod(0o666)
        if user is not None:
            command = as_user(user, command)
        self.lines: list[str] = []
        self.events_path = events
        self._events: list[Event] = []
        # Guards lines, _events, _closed and _events_ended; notified as each arrives.
        self._changed = threading.Condition()
        self._stdin_data = stdin
        watch = FileWatch(events) if events is not None else None
        # Written once by the log reader when the log ends, to wake the events reader.
        self._log_ended_r, self._log_ended_w = os.pipe() if events is not None else (-1, -1)
        out = stdout.open("wb") if stdout is not None else None  # the jobs' output, if kept
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.PIPE if (stdin is not None or pipe_stdin) else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if out is None else out,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
        if out is not None:
            out.close()  # the run has its own copy
        RUNS.append(self)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self._events_reader: threading.Thread | None = None
        if events is not None and watch is not None:
            self._events_reader = threading.Thread(target=self._read_events,
                                                   args=(events, watch), daemon=True)
            self._events_reader.start()
        else:
            self._events_ended = True
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._log_ended_w >= 0:
            # Every process of the run has closed stderr: each has exited, and written its
            # last event. The events reader reads to the end once more, and stops.
            os.write(self._log_ended_w, b"x")
            os.close(self._log_ended_w)

    _closed = False
    _events_ended = False

    def _read_events(self, path: Path, watch: FileWatch) -> None:
        """Append each whole line of the events file as it is written; stop at the end of
        the run (see _read_log)."""
        pending, ended = b"", False
        try:
            with open(path, "rb") as f:
                while True:
                    pending += f.read()
                    *whole, pending = pending.split(b"\n")
                    if whole:
                        with self._changed:
                            self._events.extend(json.loads(line) for line in whole)
                            self._changed.notify_all()
                    if ended:
                        return
                    ended = self._log_ended_r in watch.wait(also=self._log_ended_r)
        finally:
            watch.close()
            os.close(self._log_ended_r)
            with self._changed:
                self._events_ended = True
                self._changed.notify_all()

    # --- events ---------------------------------------------------------------------------

    def _await(self, take: Callable[[list[Event]], Any], what: str,
               timeout: float = WAIT) -> Any:
        """Hand each batch of new events to `take` until it returns something but None;
        return that. Fails if the run ends (its last event read) or `timeout` passes
        first: the timeout only bounds a failure."""
        assert self.events_path is not None, "this run was started without events=PATH"
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                new, seen = self._events[seen:], len(self._events)
                found = take(new)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if self._events_ended or remaining <= 0:
                    raise AssertionError(
                        f"the run's events never showed {what}"
                        f"{'' if self._events_ended else f' within {timeout:g} s'}; log:\n"
                        + "\n".join(self.lines))
                self._changed.wait(remaining)

    def wait_for_event(self, name: str, count: int = 1, timeout: float = WAIT,
                       **fields: Any) -> list[Event]:
        """Block until `count` events `name` with these field values have been written;
        return the first `count` of them."""
        assert name in ev.NAMES, f"{name!r} is not an event name of observe/events.py"
        found: list[Event] = []

        def take(new: list[Event]) -> list[Event] | None:
            found.extend(e for e in new if _matches(e, name, fields))
            return found[:count] if len(found) >= count else None

        return self._await(take, f"{count} x {name} {fields or ''}", timeout)  # type: ignore[no-any-return]

    def wait_until_events(self, predicate: Callable[[list[Event]], bool],
                          timeout: float = WAIT) -> bool:
        """Block until predicate(every event so far) holds (True) or the run has ended
        without it holding (False)."""
        try:
            return bool(self._await(lambda new: True if predicate(self._events) else None,
                                    "the awaited state", timeout))
        except AssertionError:
            if self._events_ended:
                return False
            raise

    def events_named(self, name: str, **fields: Any) -> list[Event]:
        """The events `name` with these field values written so far (all of them once
        `finish` has returned)."""
        assert name in ev.NAMES, f"{name!r} is not an event name of observe/events.py"
        assert self.events_path is not None, "this run was started without events=PATH"
        with self._changed:
            return [e for e in self._events if _matches(e, name, fields)]

    def all_events(self) -> list[Event]:
        """Every event written so far (all of them once `finish` has returned)."""
        with self._changed:
            return list(self._events)

    def one_event(self, name: str, **fields: Any) -> Event:
        """The one event `name` (with these field values) of the run."""
        found = self.events_named(name, **fields)
        assert len(found) == 1, f"{len(found)} x {name} {fields or ''}: {found}"
        return found[0]

    # --- input and end --------------------------------------------------------------------

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def finish(self, timeout: float = WAIT * 2) -> int:
        """Wait for main's exit; then for the rest of the run's processes to close the log
        (as `leftovers_of` would) and for the last event to be read."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        if self._events_reader is not None:
            self._events_reader.join(timeout)
        return code

    def log_text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    # --- who is who: from the events ------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """Every worker started so far, in the order they started."""
        return [e["pid"] for e in self.events_named(ev.WORKER_STARTED)]

    def worker_types(self) -> dict[int, str]:
        """pid: type label (``2``, ``fib``), for the workers of typed pools."""
        return {e["pid"]: e["pool"].split()[-1] for e in self.events_named(ev.WORKER_STARTED)
                if "pool" in e}

    def role_pid(self, role: str) -> int:
        """The pid of the process that writes the events of `role` (Dealer, TaskGenerator),
        once it has written one."""
        first = self._await(lambda new: next((e for e in new if e["role"] == role), None),
                            f"an event of the {role}")
        return int(first["pid"])


def _matches(event: Event, name: str, fields: dict[str, Any]) -> bool:
    return event["event"] == name and all(
        key in event and event[key] == value for key, value in fields.items())


RUNS: list[PoolRun] = []


def write_job_file(directory: Path, lines: list[str]) -> Path:
    path = directory / "jobs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_events(path: Path) -> list[Event]:
    """The events of an --events file written by a run that has ended."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_files(directory: Path, check: Callable[[], Any], what: str,
                   timeout: float = WAIT) -> Any:
    """Call `check` now and each time a file of `directory` is written (inotify), until it
    returns something but None; return that. The timeout only bounds a failure."""
    watch = FileWatch(directory)  # before the first check: no write between is missed
    deadline = time.monotonic() + timeout
    try:
        while True:
            found = check()
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{directory} never showed {what} within {timeout:g} s")
            watch.wait(timeout=remaining)
    finally:
        watch.close()


def wait_for_results(path: Path, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    """Block until main has written `count` outcomes to the results file `path`."""

    def written() -> list[dict[str, Any]] | None:
        try:
            whole = path.read_bytes().split(b"\n")[:-1]  # a line being written is not yet one
        except FileNotFoundError:
            return None
        return [json.loads(line) for line in whole] if len(whole) >= count else None

    return wait_for_files(path.parent, written, f"{count} outcomes in {path.name}",  # type: ignore[no-any-return]
                          timeout)


def assert_exactly_once(records: list[dict[str, Any]], job_ids: range | Sequence[int]) -> None:
    ids = [r["job"] for r in records]
    doubled = {i for i, n in Counter(ids).items() if n > 1}
    assert not doubled, f"results recorded more than once: {sorted(doubled)}"
    assert sorted(ids) == sorted(job_ids), (
        f"missing {sorted(set(job_ids) - set(ids))}, unexpected {sorted(set(ids) - set(job_ids))}")


def results_by_job(path: Path) -> dict[int, dict[str, Any]]:
    """A results file's records by job id, each job recorded once (asserted)."""
    records = read_results(path)
    doubled = {i for i, n in Counter(r["job"] for r in records).items() if n > 1}
    assert not doubled, f"results recorded more than once: {sorted(doubled)}"
    return {r["job"]: r for r in records}


def assert_done_right(records: list[dict[str, Any]]) -> None:
    for r in records:
        assert r["status"] == "done", r
        assert r["result"] == expected_result(r["kind"], r["arg"]), r
        assert r["attempts"] >= 1 and isinstance(r["worker"], int), r


def kill_workers_at_random(run: PoolRun, rng: random.Random, kills: int, pool_size: int) -> int:
    """Kill a random live worker at a random instant, wait for its replacement to start,
    repeat; stop early when the run is finishing. Returns how many were killed. The run
    must have been started with events=PATH."""
    killer = WorkerKiller(run, rng, pool_size)
    for _ in range(kills):
        if not killer.kill_one():
            break
    return len(killer.killed)


class WorkerKiller:
    """Kills a run's workers one at a time, at random instants, each once the pool is full
    again after the last kill."""

    def __init__(self, run: PoolRun, rng: random.Random, pool_size: int) -> None:
        self.run, self.rng, self.pool_size = run, rng, pool_size
        self.pool = _PoolWatch()
        self.killed: list[int] = []

    def kill_one(self) -> bool:
        """Once the pool is full again (as many live workers as its size: the last kill's
        replacement, and any crash's, started), kill one of them; False, killing none, once
        the run is finishing."""
        def pool_full_or_finishing(events: list[Event]) -> bool:
            self.pool.read(events)
            return self.pool.finishing or len(self._live()) >= self.pool_size

        if not self.run.wait_until_events(pool_full_or_finishing) or self.pool.finishing:
            return False
        victim = self.rng.choice(self._live())
        time.sleep(self.rng.uniform(0, 0.01))  # the random instant; not a synchronisation
        kill_quietly(victim)
        self.killed.append(victim)
        return True

    def _live(self) -> list[int]:
        return [pid for pid in self.pool.started
                if pid not in self.killed and pid not in self.pool.dead]


class _PoolWatch:
    """The workers of a run as its events tell them, read once each: a wait that looked
    at every event at each wake-up would cost the test the time of a long run."""

    def __init__(self) -> None:
        self.read_up_to = 0
        self.started: list[int] = []
        # Reaped (worker_exited), or being killed by the Supervisor (worker_killed).
        self.dead: set[int] = set()
        self.finishing = False

    def read(self, events: list[Event]) -> None:
        for e in events[self.read_up_to:]:
            if e["event"] == ev.WORKER_STARTED:
                self.started.append(e["pid"])
            elif e["event"] in (ev.WORKER_EXITED, ev.WORKER_KILLED):
                self.dead.add(e["worker"])
            elif e["event"] == ev.ALL_JOBS_COMPLETED:
                self.finishing = True
        self.read_up_to = len(events)


@contextmanager
def stdin_in_pieces(pieces: list[bytes]) -> Iterator[Callable[[], None]]:
    """fd 0 as the read end of a pipe; each call of the yielded function (stdin_lines'
    before_read) writes the next piece, and closes the pipe after the last: each read gets
    exactly one piece."""
    read_end, write_end = os.pipe()
    saved = os.dup(0)
    os.dup2(read_end, 0)
    os.close(read_end)

    def write_next() -> None:
        if pieces:
            os.write(write_end, pieces.pop(0))
        else:
            os.close(write_end)

    try:
        yield write_next
    finally:
        os.dup2(saved, 0)
        os.close(saved)


# --- leftovers ------------------------------------------------------------------------------

def group_members(pgid: int) -> list[int]:
    """Processes (alive or zombie) in process group `pgid`: every process of a run."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def await_exit(pids: list[int], timeout: float) -> list[int]:
    """Wait, in the kernel, for each pid to end (pidfds become readable at exit); the pids
    still running when the time is up."""
    deadline = time.monotonic() + timeout
    running = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
        if not ready:
            running.append(pid)
    return running


def _reap_if_ours(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def leftovers_of(run: PoolRun, timeout: float = 10.0) -> list[str]:
    """What a finished run left behind: live or zombie processes of its group, and queues.
    Processes get `timeout` to go (the promise is 2 s; the margin is for a loaded CI)."""
    if run.proc.poll() is None:
        return [f"main (PID {run.pid}) is still running"]
    members = [p for p in group_members(run.pid)]
    await_exit(members, timeout)
    for pid in members:
        _reap_if_ours(pid)  # orphans are reparented to the test process, a subreaper
    problems = []
    for pid in group_members(run.pid):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        problems.append(f"PID {pid} state {state}: {cmd}")
    return problems


def queues_left() -> list[str]:
    try:
        return [name for name in os.listdir("/dev/mqueue") if name.startswith("taskpool-")]
    except FileNotFoundError:
        return []


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
