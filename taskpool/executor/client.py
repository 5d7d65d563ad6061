"""taskpool.Executor: a concurrent.futures.Executor that a dead worker cannot break.

It runs on the same Dealer, queues and recovery as the CLI. Its Dealer runs in a process
of its own (executor_host.py), started with fork+exec, which forks and supervises the
workers. In the caller's process, this module installs no signal handler, reaps only the
Dealer process it started (by pid), and starts two threads:

    feeder thread     takes submitted calls and writes them to the Dealer in batches (one
                      CALL job each, its calls one pickle). Blocks on its Condition while nothing
                      is submitted, and in the pipe write while the Dealer is behind.
    collector thread  reads the Dealer's outcome frames and resolves the futures; at the
                      Dealer's exit, reaps it and fails whatever is left.

Invariants:
- a future is RUNNING from the moment the feeder takes it (as PPE's are once they leave its
  pending queue): cancel() succeeds only for calls not yet handed to the Dealer;
- a batch is in `_sent` before it is written, and leaves it when its last call's outcome
  is set, so the collector never sees an outcome it cannot place; a call's future is
  resolved by whoever replaces it with None in its batch's list, so it is resolved once;
- a batch is one job to the Dealer: a worker that dies in one gets its calls resent one by
  one without an attempt charged (dealer.Dealer._split), so a call fails with WorkerCrashed
  only after killing max_attempts workers on its own.

Batching: the feeder sizes batches so that one takes about BATCH_SECONDS of a worker's
time, from the run time the workers report; it starts at one call a batch, stays there for
slow calls (a CPU-bound batch is shared evenly between workers), and grows for short ones.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import logging
import math
import multiprocessing.spawn
import os
import pickle
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _FuturesExecutor
from concurrent.futures import Future, InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from taskpool.core.calls import raised
from taskpool.executor.settings import INLINE_CALLS_LIMIT, ExecutorSettings
from taskpool.posix import mqueue, proc
from taskpool.wire import ProtocolError
from taskpool.wire.calls import CallBatch, CallWhere, encode_memfd_ref
from taskpool.wire.frames import (
    FrameType,
    decode_failed,
    decode_outcomes_frame,
    encode_batch,
    encode_end,
    encode_frame,
    read_frame,
)

BATCH_SECONDS = 0.002  # of a worker's time per batch: the Dealer's cost per batch is ~0.1 ms
MAX_BATCH_CALLS = 512
SHARES = 4


_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]  # fn, args, kwargs
_Waiting = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class WorkerCrashed(BrokenProcessPool):
    """A call's worker died `max_attempts` times (the message says how: the signal), or
    the pool could not keep workers at all. A BrokenProcessPool, so that code written for
    ProcessPoolExecutor still catches it; unlike PPE's, the pool goes on."""


class Executor(_FuturesExecutor):
    """A pool of `max_workers` forked workers (default: the CPU count).

    max_attempts: workers a call may kill before its future raises WorkerCrashed (0: no
        limit). timeout: seconds a call may run; its worker is killed past it, which counts
        as an attempt. max_tasks_per_child: calls a worker runs before it exits and is
        replaced (as PPE's; not a crash). Either sends calls one at a time, unbatched.
    initializer(*initargs): run once in each new worker; if it raises, the worker exits,
        and a pool whose workers keep failing to start is broken.
    verbose: write taskpool's crash-recovery log (every job sent, every worker death and
        resend) to stderr; by default only warnings and errors are written.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        max_attempts: int = 3,
        timeout: float | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        verbose: bool = False,
    ) -> None:
        workers = (os.cpu_count() or 1) if max_workers is None else max_workers
        if workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_attempts < 0:
            raise ValueError("max_attempts must be 0 (no limit) or more")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout must be a finite number of seconds > 0")
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ValueError("max_tasks_per_child must be >= 1")
        self._max_tasks_per_child = max_tasks_per_child
        self._workers = workers
        self._timeout = timeout
        init = None if initializer is None else pickle.dumps((initializer, tuple(initargs)))
        preparation = multiprocessing.spawn.get_preparation_data("taskpool-executor")
        preparation.pop("authkey", None)  # multiprocessing's, not ours; it refuses to pickle
        settings = ExecutorSettings(
            workers=workers, max_attempts=max_attempts, timeout=timeout, initializer=init,
            preparation=preparation, log_level=logging.INFO if verbose else logging.WARNING,
            max_tasks_per_child=max_tasks_per_child)

        # submit() and shutdown() serialise on _submit_lock alone, so that no submit can
        # slip in after shutdown has let the feeder go. The feeder takes calls from
        # `_waiting` without a lock (deque operations are atomic), and sleeps on `_work`
        # only when it is empty: submit notifies it then (see _feed for why no wake-up
        # is lost). So a submit never waits for the feeder.
        self._submit_lock = threading.Lock()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        # (future, fn, args, kwargs): one tuple a call, as it may wait long enough to count
        # toward the caller's cyclic GC.
        self._waiting: collections.deque[_Waiting] = collections.deque()
        # Calls of a batch whose pickle did not load in a worker (one argument that cannot
        # be unpickled there fails the load of all): sent again, each as a batch of its
        # own, so that only the call at fault fails, as with PPE. The collector puts them
        # here, the feeder takes them, before any waiting call.
        self._again: collections.deque[tuple[Future[Any], _Call]] = collections.deque()
        # Sent batches by id: their calls' futures, in order, each replaced by None once
        # resolved. Not under the lock: the collector resolves them, and whoever finds the
        # pool broken (the collector, or the feeder in _encode) fails what is left.
        self._sent: dict[int, _SentBatch] = {}
        # The feeder waits for calls (submit notifies) or for room in the window of sent
        # batches (the collector notifies): see _feed.
        self._feeder_wants_work = False
        self._feeder_wants_room = False
        self._closing = False  # shutdown() was called: no new submits
        self._broken: str | None = None  # why the pool cannot go on
        self._seconds_per_call: float | None = None

        submit_r, self._submit_w = os.pipe()
        self._outcome_r, outcome_w = os.pipe()
        lifeline_r, self._lifeline_w = os.pipe()
        ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ours, env.get("PYTHONPATH")]))
        try:
            # fork+exec (subprocess runs no Python between the two): safe whatever threads
            # the caller runs. See executor_host's module doc.
            self._dealer = subprocess.Popen(
                [sys.executable, "-m", "taskpool.executor.host",
                 str(submit_r), str(outcome_w), str(lifeline_r)],
                pass_fds=(submit_r, outcome_w, lifeline_r), stdin=subprocess.DEVNULL,
                env=env)
        finally:
            for fd in (submit_r, outcome_w, lifeline_r):
                os.close(fd)
        proc.write_all(self._submit_w, encode_frame(FrameType.SETTINGS, pickle.dumps(settings)))
        self._feeder = threading.Thread(target=self._feed, name="taskpool-feeder", daemon=True)
        self._collector = threading.Thread(target=self._collect, name="taskpool-collector",
                                           daemon=True)
        self._feeder.start()
        self._collector.start()
        _LIVE.add(self)

    # --- the caller's side ----------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._submit_lock:
            if self._broken is not None:
                raise WorkerCrashed(self._broken)
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._waiting.append((future, fn, args, kwargs))
        if self._feeder_wants_work:
            with self._work:
                self._work.notify()
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        """As PPE's: results in input order; `timeout` counts from this call; `chunksize`
        calls travel and run as one (a crash resends them together)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = _chunks(iterables, chunksize)
        results = super().map(_run_chunk, itertools.repeat(fn), chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._submit_lock:
            if cancel_futures:
                while self._waiting:
                    try:
                        self._waiting.popleft()[0].cancel()
                    except IndexError:
                        break  # the feeder took the last one
            self._closing = True
        with self._work:
            self._work.notify()
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

    # --- feeder thread ------------------------------------------------------------------

    def _batch_size(self) -> int:
        per_call = self._seconds_per_call
        if self._timeout is not None or self._max_tasks_per_child is not None:
            return 1  # a timeout is per call, and so is a worker's count of tasks
        if per_call is None:
            return 1  # an unknown call may be long
        size = min(MAX_BATCH_CALLS, max(1, int(BATCH_SECONDS / max(per_call, 1e-7))))
        # Never so large that one worker gets what several could share: what waits goes
        # out in at least SHARES batches a worker, so that a batch whose calls are slower
        # than the estimate (made on earlier, other calls) is a small part of the whole.
        return min(size, -(-len(self._waiting) // (self._workers * SHARES)))

    def _window(self) -> int:
        """How many batches may be sent and not yet resolved: two per worker, so that each
        has one to run and one queued. The rest wait here, where they can be cancelled,
        and grow into larger batches meanwhile. Counted in batches, not calls: when the
        estimate of a call's time grows (the first calls were short, these are long),
        batches shrink, and a window in calls, sized from the new estimate, would hold
        back new ones while the large batches sent before still run, and leave a worker
        idle behind them."""
        return self._workers * 2

    def _can_send(self) -> bool:
        return bool(self._waiting or self._again) and len(self._sent) < self._window()

    def _all_sent(self) -> bool:
        """Closing, and every call is sent and resolved: none can come back to be sent
        again (see `_again`), so the feeder may tell the Dealer it has all there is."""
        # In this order: `_send_again` fills `_again` before its batch leaves `_sent`.
        return (self._closing and not self._sent and not self._again
                and not self._waiting)

    def _feed(self) -> None:
        batches = 0
        try:
            while True:
                if not self._can_send():
                    # No lost wake-up: the flags are set before the state is checked again
                    # under the lock, and submit (collector) changes the state before it
                    # reads its flag; so either we see the change, or it sees the flag and
                    # notifies, under the lock that we hold until wait() releases it.
                    with self._work:
                        while True:
                            self._feeder_wants_work = not (self._waiting or self._again)
                            # Room, or, once closing, the last outcomes (see _all_sent).
                            self._feeder_wants_room = (not self._feeder_wants_work
                                                       or self._closing)
                            if (self._can_send() or self._broken is not None
                                    or self._all_sent()):
                                break
                            self._work.wait()
                        self._feeder_wants_work = self._feeder_wants_room = False
                    if self._broken is not None or self._all_sent():
                        # Closing, and every call submitted before it is done; or broken,
                        # and the collector fails what waits.
                        break
                futures: list[Future[Any] | None]
                if self._again:
                    try:
                        future, call = self._again.popleft()
                    except IndexError:  # the collector's sweep took it (the pool broke)
                        continue
                    futures, calls = [future], [call]
                else:
                    futures, calls = self._take(self._batch_size())
                if not calls:
                    continue  # all cancelled while they waited
                try:
                    batch = self._encode(batches + 1, futures, calls)
                except Exception as e:  # noqa: BLE001 - pickling (see _encode), a memfd
                    # These calls fail with what went wrong; the pool goes on.
                    for taken in futures:
                        if taken is not None and not taken.done():
                            with contextlib.suppress(InvalidStateError):
                                taken.set_exception(e)
                    continue
                if batch is not None:
                    batches += 1
                    proc.write_all(self._submit_w, encode_batch(batch))
            proc.write_all(self._submit_w, encode_end(batches))
        except OSError:
            pass  # the Dealer is gone: the collector fails what is left
        finally:
            os.close(self._submit_w)

    def _take(self, count: int) -> tuple[list[Future[Any] | None], list[_Call]]:
        """Up to `count` waiting calls that were not cancelled, and their futures, now
        RUNNING (a call handed on can no longer be cancelled)."""
        futures: list[Future[Any] | None] = []
        calls: list[_Call] = []
        popleft = self._waiting.popleft
        for _ in range(count):
            try:
                future, fn, args, kwargs = popleft()
            except IndexError:
                break
            if future.set_running_or_notify_cancel():  # False: cancelled while it waited
                futures.append(future)
                calls.append((fn, args, kwargs))
        return futures, calls

    def _encode(self, batch_id: int, futures: list[Future[Any] | None],
                calls: list[_Call]) -> CallBatch | None:
        """The calls that pickle as one batch, in `_sent` before it is returned; None if
        none does. A call that does not pickle fails its future."""
        try:
            data = pickle.dumps(calls, pickle.HIGHEST_PROTOCOL)
        except BaseException:  # noqa: BLE001 - find the calls that do not pickle
            futures, calls = _picklable(futures, calls)
            if not calls:
                return None
            data = pickle.dumps(calls, pickle.HIGHEST_PROTOCOL)
        sent = _SentBatch(futures, calls)
        where = CallWhere.INLINE
        if len(data) > INLINE_CALLS_LIMIT:
            fd = os.memfd_create("taskpool-calls", os.MFD_CLOEXEC)
            try:
                proc.write_all(fd, data)
            except BaseException:
                os.close(fd)
                raise
            sent.memfd = fd
            data, where = encode_memfd_ref(os.getpid(), fd, len(data)), CallWhere.MEMFD
        self._sent[batch_id] = sent
        if self._broken is not None:
            # The pool broke while we built it: its calls fail here (the collector's
            # sweep may have run before the batch was in `_sent`).
            self._fail_batch(batch_id, WorkerCrashed(self._broken))
        return CallBatch(batch_id, 0, len(futures), where, data)

    # --- collector thread -------------------------------------------------------------

    def _collect(self) -> None:
        read = os.fdopen(self._outcome_r, "rb", closefd=False).read  # buffered; exact reads
        reason = None
        try:
            while True:
                frame = read_frame(read)
                if frame is None:
                    break
                ftype, body = frame
                if ftype is FrameType.OUTCOMES:
                    self._on_outcomes(body)
                elif ftype is FrameType.FAILED:
                    batch_id, first, count, why = decode_failed(body)
                    self._fail_batch(batch_id, WorkerCrashed(why), first, count)
                    self._make_room()
                elif ftype is FrameType.STOPPED:
                    reason = body.decode()
        except Exception as e:  # noqa: BLE001 - this thread must not die and leave futures
            reason = f"the Executor's Dealer sent a bad frame: {e!r}"
        # Closed before the wait: a Dealer still running (we stopped reading after a bad
        # frame) sees its lifeline end, and a write to us fail, and exits.
        os.close(self._outcome_r)
        os.close(self._lifeline_w)
        status = self._dealer.wait()
        if status != 0:
            mqueue.sweep_queues_of(self._dealer.pid)  # it may have died inside a creation
            if reason is None:
                how = (f"killed by signal {-status} ({signal.Signals(-status).name})"
                       if status < 0 else f"exited with status {status}")
                reason = f"the Executor's Dealer process (PID {self._dealer.pid}) {how}"
        with self._submit_lock:
            if reason is not None or self._sent or self._waiting or self._again:
                self._broken = reason or "the Executor's Dealer ended before its calls"
            self._closing = True  # the feeder has nowhere to send: let it go
        error = WorkerCrashed(self._broken or "")
        for batch_id in list(self._sent):
            self._fail_batch(batch_id, error)
        while True:  # what the feeder has not taken (it fails what it has: _encode)
            try:
                future = self._waiting.popleft()[0]
            except IndexError:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        while True:  # running already, to be sent again
            try:
                future = self._again.popleft()[0]
            except IndexError:
                break
            with contextlib.suppress(InvalidStateError):
                future.set_exception(error)
        # Last: the feeder may have looked between our setting `_broken` and the sweep,
        # seen a full window and calls waiting, and gone back to sleep.
        with self._work:
            self._work.notify()

    def _on_outcomes(self, body: bytes) -> None:
        batch_id, first, count, seconds, outcomes = decode_outcomes_frame(body)
        sent = self._sent.get(batch_id)
        if sent is None:
            return  # failed already (the Dealer records a job once; this is a guard)
        futures = sent.futures
        loads = pickle.loads
        try:
            returned, values = loads(outcomes)
        except Exception as e:  # noqa: BLE001 - the workers' own pickle of bytes and a list
            raise ProtocolError(f"outcomes that do not unpickle: {e!r}") from None
        if returned is None and isinstance(values, bytes):  # the pickle did not load
            if len(futures) > 1:  # it holds other calls: one may be at fault, not these
                self._send_again(batch_id, sent, first, count)
                return
            returned, values = b"\x00", [values]  # this call's own pickle: it fails
        resolved = 0
        if returned is None:  # every call returned a plain value: here they are
            for i, value in enumerate(values, first):
                future = futures[i]
                if future is not None:
                    futures[i] = None
                    resolved += 1
                    try:
                        future.set_result(value)
                    except InvalidStateError:
                        pass  # resolved by a racing path: the first one stands
        else:  # each value (or exception) pickled alone
            for i, data in enumerate(values):
                future = futures[first + i]
                if future is None:
                    continue
                futures[first + i] = None
                resolved += 1
                try:
                    if returned[i]:
                        future.set_result(loads(data))
                    else:
                        future.set_exception(raised(data))
                except InvalidStateError:
                    pass  # resolved by a racing path: the first one stands
                except BaseException as e:  # noqa: BLE001 - a value that does not unpickle
                    future.set_exception(e)
        self._resolved(batch_id, sent, resolved)
        if resolved:
            per_call = seconds / resolved
            old = self._seconds_per_call
            self._seconds_per_call = per_call if old is None else 0.7 * old + 0.3 * per_call
        self._make_room()

    def _send_again(self, batch_id: int, sent: _SentBatch, first: int, count: int) -> None:
        """The calls [first, first + count) of a batch whose pickle did not load in their
        worker go back to the feeder, to be sent one by one: they leave this batch as if
        resolved."""
        again = []
        for i in range(first, first + count):
            future = sent.futures[i]
            if future is not None:
                sent.futures[i] = None
                again.append((future, sent.calls[i]))
        # Queued before their batch leaves `_sent`, so that the feeder never sees them nowhere
        # (neither in flight nor in `_again`) and ends too soon (see _all_sent).
        self._again.extend(again)
        self._resolved(batch_id, sent, len(again))
        with self._work:
            self._work.notify()

    def _make_room(self) -> None:
        """Calls were resolved (by any frame), and their batch may have left the window: a
        feeder waiting for room, or for the last outcomes, goes on."""
        if self._feeder_wants_room:
            with self._work:
                self._work.notify()

    def _fail_batch(self, batch_id: int, error: BaseException, first: int = 0,
                    count: int | None = None) -> None:
        """Fail the batch's calls [first, first + count) not resolved yet (all by default)."""
        sent = self._sent.get(batch_id)
        if sent is None:
            return
        futures = sent.futures
        end = len(futures) if count is None else first + count
        resolved = 0
        for i in range(first, end):
            future = futures[i]
            if future is not None:
                futures[i] = None
                resolved += 1
                try:
                    future.set_exception(error)
                except InvalidStateError:
                    pass
        if count is None:  # the pool is broken: nothing of this batch is to come
            self._forget(batch_id)
        self._resolved(batch_id, sent, resolved)

    def _resolved(self, batch_id: int, sent: _SentBatch, count: int) -> None:
        sent.left -= count
        if sent.left <= 0:
            self._forget(batch_id)

    def _forget(self, batch_id: int) -> None:
        sent = self._sent.pop(batch_id, None)  # one caller wins the pop, and closes
        if sent is not None and sent.memfd is not None:
            os.close(sent.memfd)


class _SentBatch:
    """A batch in flight: its futures in call order (None once resolved), how many are
    left, its calls (to send again one by one if their pickle does not load in a worker),
    and the memfd that holds its pickle if it was too large for a message."""

    __slots__ = ("futures", "left", "calls", "memfd")

    def __init__(self, futures: list[Future[Any] | None], calls: list[_Call]) -> None:
        self.futures = futures
        self.left = len(futures)
        self.calls = calls
        self.memfd: int | None = None


def _picklable(futures: list[Future[Any] | None], calls: list[Any]) -> tuple[list[Any],
                                                                              list[Any]]:
    """The calls that pickle, and their futures; each other future gets its error (as
    PPE's, the future carries it)."""
    kept_futures, kept_calls = [], []
    for future, call in zip(futures, calls):
        try:
            pickle.dumps(call, pickle.HIGHEST_PROTOCOL)
        except BaseException as e:  # noqa: BLE001
            assert future is not None
            future.set_exception(e)
            continue
        kept_futures.append(future)
        kept_calls.append(call)
    return kept_futures, kept_calls


def _chunks(iterables: tuple[Iterable[Any], ...], size: int) -> Iterator[list[tuple[Any, ...]]]:
    it = zip(*iterables)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


# Executors still running at interpreter exit finish their work first, as PPE's do.
_LIVE: weakref.WeakSet[Executor] = weakref.WeakSet()


@atexit.register
def _finish_at_exit() -> None:
    for executor in list(_LIVE):
        executor.shutdown(wait=True)
