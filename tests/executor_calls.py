"""Functions the Executor tests submit: importable by reference, as pickled calls need."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

INITIALIZED: str | None = None


def square(x: int) -> int:
    return x * x


def raise_value_error(x: int) -> int:
    raise ValueError(f"bad {x}")


def kill_own_worker() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sized(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


def digest(data: bytes) -> int:
    return sum(data[::997]) + len(data)


def unpicklable() -> object:
    return threading.Lock()


def wait_for_file(marker: str, pid_file: str | None = None, value: int = 0) -> int:
    """Write our pid to pid_file (if given), then block until `marker` exists. The test
    creates the marker: an event, not a sleep, ends the call."""
    if pid_file is not None:
        Path(pid_file + ".tmp").write_text(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
    while not os.path.exists(marker):
        time.sleep(0.01)  # in the job, not the test: a job that waits for a file
    return value


def touch(path: str) -> None:
    Path(path).touch()


def set_initialized(value: str) -> None:
    global INITIALIZED
    INITIALIZED = value


def initialized() -> str | None:
    return INITIALIZED


def failing_initializer() -> None:
    raise RuntimeError("no database here")


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
