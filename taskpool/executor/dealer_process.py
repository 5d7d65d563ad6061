"""An Executor's Dealer process as the caller's process sees it: its start, its pipes, its
end, and the Executors still running when the caller's interpreter exits.

The process runs `python -m taskpool.executor.host` (started by that name only: this side
never imports it), with three pipes:

    submit pipe    feeder -> Dealer: SETTINGS (first), BATCH frames, END.
                   Closed by the feeder when it is done, or when the Dealer is gone.
    outcome pipe   Dealer -> collector: OUTCOMES, FAILED, STOPPED frames; EOF when the
                   Dealer has exited.
    lifeline pipe  nothing is ever written: we hold the write end, and the Dealer ends the
                   pool at once when it reads EOF, because our process is gone or the
                   collector gave the Dealer up (see host.py).

Our ends are close-on-exec (os.pipe's default), so that no other child of the caller's
process, such as another Executor's Dealer, holds them open. A batch's pickle too large for
a queue message is written to a memfd of ours, which a worker reads through
/proc/PID/fd/FD: it has no name that could be left behind.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable

from taskpool.executor.bookkeeping import Bookkeeping
from taskpool.executor.settings import ExecutorSettings
from taskpool.posix import mqueue, proc
from taskpool.wire.calls import CallBatch, encode_memfd_ref
from taskpool.wire.frames import FrameType, encode_batch, encode_end, encode_frame


class DealerProcess:
    """Started by its constructor; its settings written first by the feeder; reaped by the
    collector.

    The feeder alone writes to the submit pipe and closes it (send_batch, send_end,
    close_submit); the collector alone reads the outcome pipe, closes it and the lifeline,
    and reaps the process (outcome_reader, reap). So no lock: each end has one thread."""

    def __init__(self, settings: ExecutorSettings) -> None:
        submit_r, self._submit_w = os.pipe()
        self._outcome_r, outcome_w = os.pipe()
        lifeline_r, self._lifeline_w = os.pipe()
        ours = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ours, env.get("PYTHONPATH")]))
        try:
            # fork+exec (subprocess runs no Python between the two): safe whatever threads
            # the caller runs. See host.py's module doc.
            self._process = subprocess.Popen(
                [sys.executable, "-m", "taskpool.executor.host",
                 str(submit_r), str(outcome_w), str(lifeline_r)],
                pass_fds=(submit_r, outcome_w, lifeline_r, *settings.shared_fds),
                stdin=subprocess.DEVNULL, env=env)
        finally:
            for fd in (submit_r, outcome_w, lifeline_r):
                os.close(fd)
        self.pid = self._process.pid
        self._settings = encode_frame(FrameType.SETTINGS, pickle.dumps(settings))

    @property
    def returncode(self) -> int | None:
        """Its exit status once reaped (negative: the signal that killed it), else None."""
        return self._process.returncode

    # --- the feeder's end ---------------------------------------------------------------

    def send_settings(self) -> None:
        """First, once: the settings the Dealer waits for."""
        proc.write_all(self._submit_w, self._settings)

    def send_batch(self, batch: CallBatch) -> None:
        """Blocks while the pipe is full (the Dealer is behind); OSError if it is gone."""
        proc.write_all(self._submit_w, encode_batch(batch))

    def send_end(self, batches: int) -> None:
        """All `batches` are sent: the Dealer ends once their jobs are done."""
        proc.write_all(self._submit_w, encode_end(batches))

    def close_submit(self) -> None:
        os.close(self._submit_w)

    # --- the collector's end ------------------------------------------------------------

    def outcome_reader(self) -> Callable[[int], bytes]:
        """A read(n) of the outcome pipe: buffered, it gives exactly n bytes, or fewer at
        EOF (as read_frame needs)."""
        return os.fdopen(self._outcome_r, "rb", closefd=False).read

    def reap(self, reason: str | None) -> str | None:
        """Close our ends, wait for the process to exit, and clean up after it: why the pool
        cannot go on (`reason` if given, else how the process ended if it failed), or None
        after a clean end."""
        # Closed before the wait: a Dealer still running (the collector stopped reading
        # after a bad frame) sees its lifeline end, and a write to us fail, and exits.
        os.close(self._outcome_r)
        os.close(self._lifeline_w)
        status = self._process.wait()
        if status != 0:
            mqueue.sweep_queues_of(self.pid)  # it may have died inside a creation
            if reason is None:
                how = (f"killed by signal {-status} ({signal.Signals(-status).name})"
                       if status < 0 else f"exited with status {status}")
                reason = f"the Executor's Dealer process (PID {self.pid}) {how}"
        return reason


def calls_in_memfd(data: bytes) -> tuple[int, bytes]:
    """A batch's pickle, too large for a message, in a new memfd: the fd (ours to close once
    the batch is resolved) and the reference a worker opens it by."""
    fd = os.memfd_create("taskpool-calls", os.MFD_CLOEXEC)
    try:
        proc.write_all(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd, encode_memfd_ref(os.getpid(), fd, len(data))


# Pools still running: until its collector ends, each is here, with the weakref that
# closes it when its Executor is collected without shutdown() (PPE's behaviour: the calls
# already submitted still run, then the Dealer, its workers and queues go). At interpreter
# exit, each is closed and its threads joined: its calls finish first, as PPE's do. The
# atexit hook is registered with the first Executor, not at import: importing taskpool
# changes nothing in the caller's process.
_RUNNING: dict[Bookkeeping, tuple[weakref.ref[object], tuple[threading.Thread, ...]]] = {}
_running_lock = threading.Lock()  # guards _RUNNING and _hooked
_hooked = False


def running_pool_started(executor: object, books: Bookkeeping,
                         threads: tuple[threading.Thread, ...]) -> None:
    global _hooked
    with _running_lock:
        if not _hooked:
            atexit.register(_finish_running_pools)
            # The Executor's warnings (collector.py) are a library's: shown only if the
            # caller configures logging, never by logging's last resort.
            logging.getLogger("taskpool").addHandler(logging.NullHandler())
            _hooked = True
        _RUNNING[books] = (weakref.ref(executor, lambda _: _abandoned(books, threads)),
                           threads)


def _abandoned(books: Bookkeeping, threads: tuple[threading.Thread, ...]) -> None:
    """Its Executor was collected without shutdown(): close the pool. The cyclic GC may
    collect it in any thread, our own feeder or collector included, while it holds the
    locks close() takes: there, the close is left to a thread of its own."""
    if threading.current_thread() not in threads:
        books.close()
        return
    try:
        threading.Thread(target=books.close, name="taskpool-close", daemon=True).start()
    except RuntimeError:
        pass  # the interpreter is exiting: _finish_running_pools closes it


def running_pool_ended(books: Bookkeeping) -> None:
    """Its collector is done: the Dealer is reaped, every future resolved."""
    with _running_lock:
        _RUNNING.pop(books, None)


def _finish_running_pools() -> None:
    with _running_lock:
        running = list(_RUNNING.items())
    for books, (_, threads) in running:
        books.close()
        for thread in threads:
            thread.join()
