"""What the Executor tells its host process (its constructor's arguments, checked, become
ExecutorSettings), and the sizes both sides agree on."""

from __future__ import annotations

import logging
import math
import multiprocessing.spawn
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from taskpool.executor.pickling import dumps_initializer
from taskpool.posix import mqueue

# An Executor's queues, sized so that many Executors fit one user's queue budget
# (RLIMIT_MSGQUEUE, 819,200 bytes by default; mqueue.queue_cost is the kernel's charge):
#
#   ready queue   READY_QUEUE_DEPTH x REQUEST_MESSAGE_SIZE   2 x 4,096  =  8,384 bytes
#   result queue  RESULT_QUEUE_DEPTH x RESULT_MESSAGE_SIZE  10 x 1,024  = 11,200 bytes
#   one Executor (EXECUTOR_QUEUE_COST)                                  = 19,584 bytes
#
# and its workers' request slots, in shared memory, cost none of it: so 16 Executors take
# 313,344 bytes (38% of the default budget), and 41 fit in it. (Was: 10 x 4,096 and
# 10 x 8,192, 124,800 bytes: 6 fitted.)
#
# A request message is one batch of calls, its pickle inline up to INLINE_CALLS_LIMIT,
# else in a memfd (feeder.py); a worker's request slot holds messages of this size too.
# The ready queue is shallow: its only writer (the host's intake thread) and its only
# reader (the Dealer's send thread) are threads of one process, and the submit pipe
# before it (64 KB) is the Executor's buffer; two messages let the intake thread decode
# the next batch while the send thread hands out this one (measured: no loss of submits/s
# against a depth of 10).
# A result message takes the Acks and the outcomes of a small batch (a few hundred small
# ints). A larger result's payload is handed to the Dealer out of the queue, over a datagram
# socket (posix/handoff.py): one sendmsg() and one recvmsg() up to 64 KB, a memfd beyond,
# where 1 KB parts would cost two system calls a KB. Measured (bench/executor_payloads.py):
# 2,000 results of 50 KB 0.38 s against 0.49 s with the old 8 KB parts; 5 MB results
# as fast as before.
REQUEST_MESSAGE_SIZE = 4096
READY_QUEUE_DEPTH = 2
RESULT_MESSAGE_SIZE = 1024
EXECUTOR_QUEUE_COST = (mqueue.queue_cost(READY_QUEUE_DEPTH, REQUEST_MESSAGE_SIZE)
                       + mqueue.queue_cost(mqueue.RESULT_QUEUE_DEPTH, RESULT_MESSAGE_SIZE))


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
    # The caller's multiprocessing authkey, for the workers: a Manager() proxy passed as
    # an argument connects back to its manager with it, as in a process PPE started.
    authkey: bytes = b""
    # Descriptors the initargs refer to (a multiprocessing.Queue's pipe): passed to the
    # Dealer under the same numbers, kept open in its workers (see pickling.py).
    shared_fds: tuple[int, ...] = ()
    # The whole log (INFO) with verbose=True; else what needs a reader (WARNING): an
    # Executor is a library in someone's program, and says nothing when all goes well.
    log_level: int = logging.WARNING
    max_restarts: int = 10
    restart_window: float = 5.0
    max_tasks_per_child: int | None = None  # the Executor then sends one call per batch

    @classmethod
    def from_arguments(
        cls,
        max_workers: int | None,
        *,
        max_attempts: int,
        timeout: float | None,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        max_tasks_per_child: int | None,
        verbose: bool,
    ) -> ExecutorSettings:
        """The Executor's constructor arguments (see taskpool.Executor), checked as PPE
        checks its own (ValueError), in the form its host process takes them."""
        workers = (os.cpu_count() or 1) if max_workers is None else max_workers
        if workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_attempts < 0:
            raise ValueError("max_attempts must be 0 (no limit) or more")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout must be a finite number of seconds > 0")
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ValueError("max_tasks_per_child must be >= 1")
        init: bytes | None = None
        shared_fds: tuple[int, ...] = ()
        if initializer is not None:
            init, shared_fds = dumps_initializer(initializer, tuple(initargs))
        preparation = multiprocessing.spawn.get_preparation_data("taskpool-executor")
        # Not the caller's main module: what of it the calls use goes by value (see
        # core/calls.py), so that a `python -c`, a script on stdin or the REPL works, and
        # the caller's script is never run again in the Dealer.
        for key in ("init_main_from_path", "init_main_from_name", "authkey"):
            preparation.pop(key, None)  # the authkey refuses to pickle: see `authkey`
        return cls(
            workers=workers, max_attempts=max_attempts, timeout=timeout, initializer=init,
            preparation=preparation, shared_fds=shared_fds,
            authkey=bytes(multiprocessing.current_process().authkey),
            log_level=logging.INFO if verbose else logging.WARNING,
            max_tasks_per_child=max_tasks_per_child)

    @property
    def unbatched(self) -> bool:
        """Calls go one a batch: a timeout is per call, and so is a worker's count of
        tasks."""
        return self.timeout is not None or self.max_tasks_per_child is not None


# What each multiprocessing start method means for an Executor, whose workers are forked
# from its own Dealer process, itself started with fork+exec: never a copy of the caller.
START_METHODS = {
    "forkserver": "what the Executor does: workers forked from a fresh server process",
    "spawn": "as forkserver: workers start from a fresh interpreter, not from your process",
}


def check_start_method(mp_context: Any) -> None:
    """PPE's mp_context: None, or a context whose start method the Executor can honour;
    ValueError naming why not, else (TypeError) not a context."""
    if mp_context is None:
        return
    get_start_method = getattr(mp_context, "get_start_method", None)
    if get_start_method is None:
        raise TypeError(f"mp_context must be a multiprocessing context (such as "
                        f"multiprocessing.get_context('forkserver')), not {mp_context!r}")
    method = get_start_method()
    if method == "fork":
        raise ValueError(
            "taskpool.Executor cannot use the 'fork' start method: it never forks your "
            "process (which may run threads); its workers are forked from a fresh Dealer "
            "process, so they inherit nothing of yours. Pass mp_context=None, or "
            "multiprocessing.get_context('forkserver') or ('spawn'), which mean just that")
    if method not in START_METHODS:
        raise ValueError(f"unknown start method {method!r} for taskpool.Executor; "
                         f"it takes {', '.join(START_METHODS)}")
