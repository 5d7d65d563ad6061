"""taskpool.Executor: a concurrent.futures.Executor that a dead worker cannot break.

It runs on the same Dealer, queues and recovery as the CLI. Its Dealer runs in a process
of its own (executor_host.py), started with fork+exec, which forks and supervises the
workers. In the caller's process, this module installs no signal handler, reaps only the
Dealer process it started (by pid), and starts two threads:

    feeder thread     takes submitted calls, pickles them, and writes them to the Dealer
                      in batches (one CALL job each). Blocks on its Condition while nothing
                      is submitted, and in the pipe write while the Dealer is behind.
    collector thread  reads the Dealer's outcome frames and resolves the futures; at the
                      Dealer's exit, reaps it and fails whatever is left.

Invariants:
- a future is RUNNING from the moment the feeder takes it (as PPE's are once they leave its
  pending queue): cancel() succeeds only for calls not yet handed to the Dealer;
- a call is in `_sent` before its batch is written, and leaves it when its outcome is set,
  so the collector never sees an outcome it cannot place, and a future is resolved once;
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
import itertools
import json
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

from taskpool import ipc
from taskpool.calls import call_outcome
from taskpool.executor_host import INLINE_CALLS_LIMIT, ExecutorSettings
from taskpool.protocol import (
    CallWhere,
    FrameType,
    ProtocolError,
    decode_outcomes,
    decode_outcomes_frame,
    encode_batch,
    encode_calls,
    encode_end,
    encode_frame,
    encode_memfd_ref,
    read_frame,
)

BATCH_SECONDS = 0.002  # of a worker's time per batch: the Dealer's cost per batch is ~0.1 ms
MAX_BATCH_CALLS = 512
_CALL_FRAME_OVERHEAD = 13  # protocol._CALL's size


class WorkerCrashed(BrokenProcessPool):
    """A call's worker died `max_attempts` times (the message says how: the signal), or
    the pool could not keep workers at all. A BrokenProcessPool, so that code written for
    ProcessPoolExecutor still catches it; unlike PPE's, the pool goes on."""


class Executor(_FuturesExecutor):
    """A pool of `max_workers` forked workers (default: the CPU count).

    max_attempts: workers a call may kill before its future raises WorkerCrashed (0: no
        limit). timeout: seconds a call may run; its worker is killed past it, which counts
        as an attempt. initializer(*initargs): run once in each new worker; if it raises,
        the worker exits, and a pool whose workers keep failing to start is broken.
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
        verbose: bool = False,
    ) -> None:
        workers = (os.cpu_count() or 1) if max_workers is None else max_workers
        if workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_attempts < 0:
            raise ValueError("max_attempts must be 0 (no limit) or more")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout must be a finite number of seconds > 0")
        self._workers = workers
        self._timeout = timeout
        init = None if initializer is None else pickle.dumps((initializer, tuple(initargs)))
        preparation = multiprocessing.spawn.get_preparation_data("taskpool-executor")
        preparation.pop("authkey", None)  # multiprocessing's, not ours; it refuses to pickle
        settings = ExecutorSettings(
            workers=workers, max_attempts=max_attempts, timeout=timeout, initializer=init,
            preparation=preparation, log_level=logging.INFO if verbose else logging.WARNING)

        # submit() and shutdown() serialise on _submit_lock alone, so that no submit can
        # slip in after shutdown has let the feeder go. The feeder takes calls from
        # `_waiting` without a lock (deque operations are atomic), and sleeps on `_work`
        # only when it is empty: submit notifies it then (see _feed for why no wake-up
        # is lost). So a submit never waits for the feeder.
        self._submit_lock = threading.Lock()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting: collections.deque[tuple[int, Future[Any], Callable[..., Any],
                                               tuple[Any, ...], dict[str, Any]]] = (
            collections.deque())
        # Sent calls by id. Not under the lock: one dict operation is atomic, and pop()
        # decides who resolves a future (the collector, or whoever finds the pool broken).
        self._sent: dict[int, Future[Any]] = {}
        self._memfds: dict[int, int] = {}  # call id -> memfd holding its pickle
        self._call_ids = itertools.count(1)
        # The feeder waits for calls (submit notifies) or for room in the window of sent
        # calls (the collector notifies): see _feed.
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
                [sys.executable, "-m", "taskpool.executor_host",
                 str(submit_r), str(outcome_w), str(lifeline_r)],
                pass_fds=(submit_r, outcome_w, lifeline_r), stdin=subprocess.DEVNULL,
                env=env)
        finally:
            for fd in (submit_r, outcome_w, lifeline_r):
                os.close(fd)
        ipc.write_all(self._submit_w, encode_frame(FrameType.SETTINGS, pickle.dumps(settings)))
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
            self._waiting.append((next(self._call_ids), future, fn, args, kwargs))
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
                        self._waiting.popleft()[1].cancel()
                    except IndexError:
                        break  # the feeder took the last one
            self._closing = True
        with self._work:
            self._work.notify()
        if wait:
            self._feeder.join()
            self._collector.join()

    # --- feeder thread ------------------------------------------------------------------

    def _batch_size(self) -> int:
        per_call = self._seconds_per_call
        if self._timeout is not None or per_call is None:
            return 1  # a timeout is per call; an unknown call may be long
        size = min(MAX_BATCH_CALLS, max(1, int(BATCH_SECONDS / max(per_call, 1e-7))))
        # Never so large that one worker gets what several could share.
        return min(size, -(-len(self._waiting) // self._workers))

    def _window(self) -> int:
        """How many calls may be sent and unresolved: two batches per worker, so that each
        has one to run and one queued. The rest wait here, where they can be cancelled,
        and grow into larger batches meanwhile."""
        return self._workers * 2 * max(1, self._batch_size())

    def _can_send(self) -> bool:
        return bool(self._waiting) and len(self._sent) < self._window()

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
                            self._feeder_wants_work = not self._waiting
                            self._feeder_wants_room = not self._feeder_wants_work
                            if self._can_send() or (self._closing and not self._waiting):
                                break
                            self._work.wait()
                        self._feeder_wants_work = self._feeder_wants_room = False
                    if not self._waiting:
                        break  # closing, and every call submitted before it is sent
                room = self._window() - len(self._sent)
                taken = []
                for _ in range(min(room, self._batch_size())):
                    try:
                        taken.append(self._waiting.popleft())
                    except IndexError:
                        break
                for count, payload in self._encode(taken):
                    batches += 1
                    ipc.write_all(self._submit_w, encode_batch(batches, count, payload))
            ipc.write_all(self._submit_w, encode_end(batches))
        except OSError:
            pass  # the Dealer is gone: the collector fails what is left
        finally:
            os.close(self._submit_w)

    def _encode(self, taken: list[Any]) -> Iterator[tuple[int, bytes]]:
        """The taken calls as batch payloads of at most INLINE_CALLS_LIMIT bytes, each with
        its number of calls. Every call is in `_sent` before its batch is yielded."""
        calls: list[tuple[int, CallWhere, bytes]] = []
        size = 0
        sent = self._sent
        dumps, protocol = pickle.dumps, pickle.HIGHEST_PROTOCOL
        for call_id, future, fn, args, kwargs in taken:
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            try:
                data = dumps((fn, args, kwargs), protocol)
            except BaseException as e:  # noqa: BLE001 - as PPE: the future carries it
                future.set_exception(e)
                continue
            where = CallWhere.INLINE
            if len(data) + _CALL_FRAME_OVERHEAD > INLINE_CALLS_LIMIT:
                fd = self._memfds[call_id] = os.memfd_create("taskpool-call", os.MFD_CLOEXEC)
                ipc.write_all(fd, data)
                data, where = encode_memfd_ref(os.getpid(), fd, len(data)), CallWhere.MEMFD
            if size + len(data) + _CALL_FRAME_OVERHEAD > INLINE_CALLS_LIMIT and calls:
                yield self._checked(calls)
                calls, size = [], 0
            sent[call_id] = future
            calls.append((call_id, where, data))
            size += len(data) + _CALL_FRAME_OVERHEAD
        if calls:
            yield self._checked(calls)

    def _checked(self, calls: list[tuple[int, CallWhere, bytes]]) -> tuple[int, bytes]:
        """A batch ready to write, unless the pool broke while we built it: then its calls
        fail here (the collector's sweep may have run before they were in `_sent`)."""
        if self._broken is not None:
            for call_id, _where, _data in calls:
                self._finish(call_id, error=WorkerCrashed(self._broken))
        return len(calls), encode_calls(calls)

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
                    failed = json.loads(body)
                    for call_id in failed["calls"]:
                        self._finish(call_id, error=WorkerCrashed(failed["reason"]))
                    self._make_room()
                elif ftype is FrameType.STOPPED:
                    reason = body.decode()
        except (ProtocolError, OSError, ValueError) as e:
            reason = f"the Executor's Dealer sent a bad frame: {e}"
        status = self._dealer.wait()
        if status != 0:
            ipc.sweep_queues_of(self._dealer.pid)  # it may have died inside a creation
            if reason is None:
                how = (f"killed by signal {-status} ({signal.Signals(-status).name})"
                       if status < 0 else f"exited with status {status}")
                reason = f"the Executor's Dealer process (PID {self._dealer.pid}) {how}"
        os.close(self._outcome_r)
        os.close(self._lifeline_w)
        with self._submit_lock:
            if reason is not None or self._sent or self._waiting:
                self._broken = reason or "the Executor's Dealer ended before its calls"
            self._closing = True  # the feeder has nowhere to send: let it go
        with self._work:
            self._work.notify()
        error = WorkerCrashed(self._broken or "")
        for call_id in list(self._sent):
            self._finish(call_id, error=error)
        while True:  # what the feeder has not taken (it fails what it has: _checked)
            try:
                future = self._waiting.popleft()[1]
            except IndexError:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _on_outcomes(self, body: bytes) -> None:
        _job_id, seconds, payload = decode_outcomes_frame(body)
        count = 0
        for call_id, kind, data in decode_outcomes(payload):
            count += 1
            try:
                ok, value = call_outcome(kind, data)
            except BaseException as e:  # noqa: BLE001 - a value that does not unpickle here
                ok, value = False, e
            if ok:
                self._finish(call_id, value=value)
            else:
                self._finish(call_id, error=value)
        if count:
            per_call = seconds / count
            old = self._seconds_per_call
            self._seconds_per_call = per_call if old is None else 0.7 * old + 0.3 * per_call
        self._make_room()

    def _make_room(self) -> None:
        """Calls left the window (resolved, by any frame): a feeder waiting for room goes on."""
        if self._feeder_wants_room:
            with self._work:
                self._work.notify()

    def _finish(self, call_id: int, *, value: Any = None,
                error: BaseException | None = None) -> None:
        """Resolve a sent call's future, once: whoever pops it from `_sent` does."""
        future = self._sent.pop(call_id, None)
        if future is None:
            return  # resolved already (the Dealer records a result once; this is a guard)
        if self._memfds:
            memfd = self._memfds.pop(call_id, None)
            if memfd is not None:
                os.close(memfd)
        try:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)
        except InvalidStateError:
            pass  # resolved by a racing path: the first one stands


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
