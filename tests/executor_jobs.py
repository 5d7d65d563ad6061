"""Functions that tests/test_executor.py submits to a taskpool.Executor. They live in an
importable module because a call is pickled by reference and unpickled in a worker."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

INITIALIZED: str | None = None
_NOTED = False  # this worker has already written its pid file (note_worker)


class JobError(Exception):
    """Raised by a job, to be seen by the caller with the same type and args."""


def square(x: int) -> int:
    return x * x


def power(x: int, y: int) -> int:
    return int(x**y)


def ordered(x: int, wait_for: str | None, create: str | None) -> int:
    """Touch `create`, or wait until `wait_for` exists: forces an order of completion."""
    if create:
        Path(create).touch()
    if wait_for:
        _wait(wait_for)
    return x * x


def raise_job_error(*args: object) -> None:
    raise JobError(*args)


def _write_pid(directory: str) -> None:
    """One file per process, named by its pid, written atomically."""
    tmp = os.path.join(directory, f".{os.getpid()}.tmp")
    Path(tmp).touch()
    os.replace(tmp, os.path.join(directory, str(os.getpid())))


def _wait(marker: str, limit: float = 60.0) -> None:
    # The job waits for a file that the test creates; `limit` only turns a hung test into
    # a failed one (not a TimeoutError: that would pass for the one map's timeout raises).
    deadline = time.monotonic() + limit
    while not os.path.exists(marker):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{marker} never appeared")
        time.sleep(0.005)


def wait_for_file(marker: str, started: str | None = None, value: object = None) -> object:
    """Note our pid in the `started` directory (one file per attempt's worker), then block
    until `marker` exists; return `value`."""
    if started is not None:
        _write_pid(started)
    _wait(marker)
    return value


def touch(path: str) -> None:
    Path(path).touch()


def kill_own_worker(log: str | None = None) -> None:
    """Kill our worker, every time: a poison call. Appends a line to `log` first."""
    if log is not None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def note_worker(x: int, directory: str) -> int:
    """x*x after ~1 ms; notes (once per worker) that this worker has taken a job."""
    global _NOTED
    if not _NOTED:
        _write_pid(directory)
        _NOTED = True
    time.sleep(0.001)
    return x * x


def note_worker_bytes(seed: int, directory: str, size: int) -> bytes:
    """random_bytes(size, seed), noting (once per worker) that this worker has taken a
    job."""
    note_worker(0, directory)
    return random_bytes(size, seed)


def hand_over_then_die(marker: str) -> str:
    """The first time (no `marker` yet): what a worker killed between handing a result's
    payload over and announcing it leaves (taskpool/posix/handoff.py), then death. After:
    'survived'."""
    if os.path.exists(marker):
        return "survived"
    open(marker, "w").close()
    from taskpool.posix.handoff import INLINE_LIMIT, pool_handoff

    handoff = pool_handoff()
    assert handoff is not None
    handoff.hand_over((os.getpid(), 2**40, 1), b"o" * (INLINE_LIMIT + 1))  # by memfd
    os.kill(os.getpid(), signal.SIGKILL)
    return "not reached"


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def echo(data: bytes) -> bytes:
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def return_lock() -> object:
    return threading.Lock()


def init_worker(value: str, directory: str) -> None:
    global INITIALIZED
    INITIALIZED = value
    _write_pid(directory)


def initialized() -> tuple[int, str | None]:
    return os.getpid(), INITIALIZED


def failing_initializer() -> None:
    raise RuntimeError("no database here")


def count_call(x: int, directory: str) -> int:
    """x, after adding a line to this worker's file (named by its pid) in `directory`."""
    with open(os.path.join(directory, str(os.getpid())), "a") as f:
        f.write(f"{x}\n")
    return x


class FlakyPickle:
    """Pickles on every third attempt only: stands in for an argument that another thread
    mutates while it is pickled ('dictionary changed size during iteration'). Third: a
    batch is tried with pickle, then cloudpickle, before its calls are tried one by one."""

    attempts = 0

    def __reduce__(self) -> tuple[type, tuple[()]]:
        FlakyPickle.attempts += 1
        if FlakyPickle.attempts % 3:
            raise RuntimeError("dictionary changed size during iteration")
        return (FlakyPickle, ())


def type_name(x: object) -> str:
    return type(x).__name__


def sleep_then(seconds: float, pad: bytes) -> int:
    time.sleep(seconds)
    return len(pad)


GROWN: dict[str, list[int]] = {}


def grow(key: str, x: int) -> list[int]:
    """The list named `key`, after appending x: the same mutable object every call."""
    GROWN.setdefault(key, []).append(x)
    return GROWN[key]


def _load_in(pid: int, marker: str | None = None,
             started: str | None = None) -> LoadsOnlyInCaller:
    if os.getpid() != pid:
        if started is not None:
            _write_pid(started)
        if marker is not None:
            _wait(marker)
        raise pickle.UnpicklingError("this argument loads only in the process that made it")
    return LoadsOnlyInCaller(marker, started)


class LoadsOnlyInCaller:
    """Pickles anywhere, unpickles only in the process that pickled it: elsewhere it notes
    the process's pid in `started`, waits for `marker` (each if given), then fails. Stands
    in for an argument whose class a worker cannot import."""

    def __init__(self, marker: str | None = None, started: str | None = None) -> None:
        self.marker = marker
        self.started = started

    def __reduce__(self) -> tuple[Any, tuple[int, str | None, str | None]]:
        return (_load_in, (os.getpid(), self.marker, self.started))


class Box:
    """A value whose lifetime a test watches through a weakref."""

    def __init__(self, value: int) -> None:
        self.value = value

    def get(self) -> int:
        return self.value


def box_value(box: Box) -> Box:
    return Box(box.value)


def failing_initializer_that_logs_to(path: str) -> None:
    """Attach a handler to PPE's logger, as a program that watches it would, then fail."""
    import logging

    class ToFile(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            exc = record.exc_info[1] if record.exc_info else None
            with open(path, "a") as f:
                f.write(f"{record.levelname}|{record.getMessage()}|{exc!r}\n")

    logging.getLogger("concurrent.futures").addHandler(ToFile())
    raise ValueError("bad config")


def fork_in_call(raise_in_child: bool = False) -> int:
    """Fork; the child returns (or raises) into its worker's loop, as a careless call's
    child would; the parent returns the child's exit code."""
    pid = os.fork()
    if pid == 0:
        if raise_in_child:
            raise JobError("in the child")
        return -1
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


SHARED: dict[str, Any] = {}


def keep_shared(queue: Any, lock: Any, event: Any, semaphore: Any) -> None:
    """An initializer: multiprocessing objects from initargs, kept for the calls."""
    SHARED.update(queue=queue, lock=lock, event=event, semaphore=semaphore)


def use_shared(what: str) -> object:
    """One use of a shared object, as the caller's test drives it."""
    if what == "try lock":
        got = SHARED["lock"].acquire(False)
        if got:
            SHARED["lock"].release()
        return got
    if what == "wait event":
        return SHARED["event"].wait(60)
    if what == "put pid":
        SHARED["queue"].put(os.getpid())
        return os.getpid()
    SHARED["semaphore"].release()
    return None


def store(mapping: Any, key: str, value: object) -> None:
    mapping[key] = value


def send_on(connection: Any, value: object) -> None:
    connection.send(value)
