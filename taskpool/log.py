"""The crash-recovery log: one line per event, in the seed's tone.

    [Dealer] Sent job 1 -> fib(30)
    [Worker 1470] Starting up

Every process of a run writes to one descriptor (stderr, or the --log file opened with
O_APPEND) with a single os.write() per line. There is no buffered stream in the way, which
matters twice: lines from different processes never interleave mid-line (a write of one short
line to a pipe or an O_APPEND file is atomic), and a child forked while another thread is
logging cannot inherit a held stdio buffer lock (CPython gh-84579). The handler's own lock is
re-initialised in the child by `logging`'s at-fork hook.
"""

from __future__ import annotations

import logging
import os

_ROLE_TAGS = {
    "taskpool.main": "Main",
    "taskpool.generator": "TaskGenerator",
    "taskpool.dealer": "Dealer",
    "taskpool.dispatcher": "Dispatcher",
    "taskpool.supervisor": "Supervisor",
    "taskpool.recovery": "Recovery",
}


# In a worker of a typed pool: " type 2", so that its lines read [Worker 1471 type 2].
_worker_pool = ""


def set_worker_pool(label: str) -> None:
    """Called once in a newly forked worker of a typed pool."""
    global _worker_pool
    _worker_pool = f" {label}"


class RoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "taskpool.worker":
            tag = f"Worker {record.process}{_worker_pool}"
        else:
            tag = _ROLE_TAGS.get(record.name, record.name)
        return f"[{tag}] {record.getMessage()}"


class FdHandler(logging.Handler):
    """Writes each record with one os.write() to a raw descriptor."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            while data:
                data = data[os.write(self.fd, data) :]
        except Exception:  # a log line must never take a process down
            self.handleError(record)


def setup(fd: int, level: int = logging.INFO) -> None:
    """Route every taskpool logger to `fd`. Called once in main, before any fork; children
    inherit the configuration."""
    root = logging.getLogger("taskpool")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = FdHandler(fd)
    handler.setFormatter(RoleFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    logging.raiseExceptions = False
