"""What the Executor tells its host process, and the sizes both sides agree on."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

# Message sizes of an Executor's queues. A worker's queue holds `credit` batches of calls
# (2 x 4,192 bytes of queue memory); the result queue takes the kernel's default largest
# message. 64 workers cost 537 kB + 83 kB + 42 kB of the default 819,200 bytes.
REQUEST_MESSAGE_SIZE = 4096


RESULT_MESSAGE_SIZE = 8192


# What the calls of one batch may take inline; the rest of a message is its fixed fields.
INLINE_CALLS_LIMIT = REQUEST_MESSAGE_SIZE - 64


@dataclass(frozen=True)
class ExecutorSettings:
    """Sent by the Executor as the first frame: everything this process needs."""

    workers: int
    max_attempts: int
    timeout: float | None
    initializer: bytes | None  # pickled (initializer, initargs)
    preparation: dict[str, Any] = field(default_factory=dict)  # multiprocessing.spawn's
    # The whole log (INFO) with verbose=True; else what needs a reader (WARNING): an
    # Executor is a library in someone's program, and says nothing when all goes well.
    log_level: int = logging.WARNING
    max_restarts: int = 10
    restart_window: float = 5.0
    max_tasks_per_child: int | None = None  # the Executor then sends one call per batch
