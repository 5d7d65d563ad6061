"""taskpool.Executor: a concurrent.futures.Executor that a dead worker cannot break.

It runs on the same Dealer, queues and recovery as the CLI. Its Dealer runs in a process
of its own (host.py), started with fork+exec, which forks and supervises the workers. In
the caller's process, the Executor installs no signal handler, reaps only the Dealer
process it started (by pid), and starts two threads. The data flow (one module a role):

|=============== the caller's process ================|=== its Dealer process ===|
                                                       (host.py, fork+exec'd)
            +-------------------+
            | Bookkeeping       |
submit() => | waiting           | => Feeder ===== submit pipe =====> intake thread
            | again             | =>  thread     SETTINGS,            | one CALL job
            |                   |      |         BATCH ... END        v per batch
            | sent: batch id -> | <====+ each batch, before        Dealer => workers
            |   its futures     |        it is written                |
            |                   |                                     |
            |                   | <=> Collector <== outcome pipe =====+
            | closing, broken,  |      thread       OUTCOMES, FAILED,
            | seconds_per_call  |        |          LOST, STOPPED
            +-------------------+        +==> futures: set_result, set_exception

DealerProcess: the lifeline pipe, held and never written ====> EOF: we are gone, the
                                                               pool ends at once

submit() (client.py): appends (future, fn, args, kwargs) to `waiting`, and wakes the feeder
if it sleeps for want of calls. shutdown() marks the pool closing (and may cancel what
waits); the feeder ends once every call is resolved.

Feeder thread (feeder.py): takes calls (those to send again first), makes their futures
RUNNING, pickles them as one batch, puts it in `sent`, writes it to the submit pipe. Blocks
on its Condition while nothing is to be sent (no call, or the window of sent batches is
full), and in the pipe write while the Dealer is behind.

Collector thread (collector.py): reads the Dealer's outcome frames and resolves the futures
of `sent`; a batch whose pickle did not load in its worker goes back to the feeder by
`again`, one call a batch. At the Dealer's exit, reaps it and fails whatever is left.

DealerProcess (dealer_process.py): the Dealer's start (fork+exec, the three pipes), its
memfds for large batches, its end, and the pools still running: each closes when its
Executor is collected (neither thread holds it), and the atexit hook finishes them.

Pickling (pickling.py, core/calls.py): by reference where the workers can import a
function, by value (cloudpickle) where not (the caller's `__main__`, lambdas, closures).

Invariants:
- a future is RUNNING from the moment the feeder takes it (as PPE's are once they leave its
  pending queue): cancel() succeeds only for calls not yet handed to the Dealer;
- a batch is in `sent` before it is written, and leaves it when its last call's outcome
  is set, so the collector never sees an outcome it cannot place; a call's future is
  resolved by whoever replaces it with None in its batch's list, so it is resolved once;
- a batch is one job to the Dealer: a worker that dies in one gets its calls resent one by
  one without an attempt charged (local/recovery.py, Recovery._split), so a call fails
  with WorkerCrashed only after killing max_attempts workers on its own.

Batching (feeder.py): a batch takes about BATCH_SECONDS of a worker's time, from the run
time the workers report: one call a batch for slow calls, more for short ones.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _FuturesExecutor
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from taskpool.executor.bookkeeping import Bookkeeping
from taskpool.executor.collector import Collector
from taskpool.executor.dealer_process import DealerProcess, running_pool_started
from taskpool.executor.errors import WorkerCrashed
from taskpool.executor.feeder import Feeder
from taskpool.executor.settings import ExecutorSettings, check_start_method

__all__ = ["Executor", "ExecutorStats", "WorkerCrashed"]

T = TypeVar("T")


class Executor(_FuturesExecutor):
    """A pool of `max_workers` forked workers (default: the CPU count), with
    ProcessPoolExecutor's signature, and its own keywords after it.

    mp_context: None, or a multiprocessing context of the 'forkserver' or 'spawn' start
        method, which both mean what this pool does anyway: workers start from a fresh
        process (its Dealer), never as copies of yours. 'fork' cannot apply (ValueError):
        see docs/EXECUTOR.md.
    max_attempts: workers a call may kill before its future raises WorkerCrashed (0: no
        limit). timeout: seconds a call may run; its worker is killed past it, which counts
        as an attempt. max_tasks_per_child: calls a worker runs before it exits and is
        replaced (as PPE's; not a crash). Either sends calls one at a time, unbatched.
    initializer(*initargs): run once in each new worker; if it raises, the worker exits,
        and a pool whose workers keep failing to start is broken.
    verbose: write taskpool's crash-recovery log (every job sent, every worker death and
        resend) to stderr; by default only warnings and errors are written.
    stats: what it did and survived (ExecutorStats); crashes are also logged at WARNING by
        the `taskpool.executor` logger.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        max_attempts: int = 3,
        timeout: float | None = None,
        verbose: bool = False,
    ) -> None:
        check_start_method(mp_context)
        settings = ExecutorSettings.from_arguments(
            max_workers, max_attempts=max_attempts, timeout=timeout, initializer=initializer,
            initargs=initargs, max_tasks_per_child=max_tasks_per_child, verbose=verbose)
        # What submit, shutdown and the two threads share (each part says who reads and
        # writes it, and under which lock).
        self._books = Bookkeeping()
        self._dealer = DealerProcess(settings)
        self._feeder = Feeder(self._books, self._dealer, settings)
        self._collector = Collector(self._books, self._dealer)
        self._feeder.start()
        self._collector.start()
        # Neither thread holds us: dropped without shutdown(), we are collected, and the
        # pool closes as by shutdown(wait=False); at interpreter exit, its calls finish.
        running_pool_started(self, self._books, (self._feeder, self._collector))

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        books = self._books
        future: Future[T] = Future()
        with books.submit_lock:
            if books.broken is not None:
                raise WorkerCrashed(books.broken)
            if books.closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            books.waiting.append((future, fn, args, kwargs))
            books.calls += 1
        if books.feeder_wants_work:
            books.wake_feeder()
        return future

    @property
    def stats(self) -> ExecutorStats:
        """What the pool has done and survived so far: a snapshot."""
        books = self._books
        return ExecutorStats(books.calls, books.crashes, books.resends, books.failed)

    def map(self, fn: Callable[..., T], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[T]:
        """As PPE's: results in input order; `timeout` counts from this call; `chunksize`
        calls travel and run as one (a crash resends them together)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        # One iterable (the common case): a chunk is its items, and each runs as fn(item),
        # with no argument tuple to build, pickle and unpickle per item.
        one = len(iterables) == 1
        chunks = _chunks(iter(iterables[0]) if one else zip(*iterables), chunksize)
        results = super().map(_run_chunk_of_items if one else _run_chunk, itertools.repeat(fn),
                              chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._books.close(cancel_futures)
        if wait:
            if threading.current_thread() in (self._feeder, self._collector):
                # A done callback: it runs in one of our threads, and the wait needs both
                # (the feeder ends only once the collector has every outcome). PPE's
                # raises here too: its callbacks run in the thread its shutdown joins.
                raise RuntimeError("shutdown(wait=True) cannot wait in a done callback, "
                                   "which runs in the Executor's own thread; the shutdown "
                                   "goes on: use wait=False there")
            self._feeder.join()
            self._collector.join()


@dataclass(frozen=True)
class ExecutorStats:
    """Executor.stats: calls submitted (a map chunk is one call), workers lost at work
    (crashes: killed, crashed, timed out), calls sent again after a crash (resends), and
    futures failed with WorkerCrashed (failed). Crashes and resends are also logged, at
    WARNING, by the `taskpool.executor` logger."""

    calls: int
    crashes: int
    resends: int
    failed: int


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


def _run_chunk_of_items(fn: Callable[..., Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk]
