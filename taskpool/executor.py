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
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _FuturesExecutor
from concurrent.futures import Future, InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
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


@dataclass
class _Sent:
    future: Future[Any]
    memfd: int | None = None  # holds a call's pickle too large for a message


def _exactly(fd: int) -> Callable[[int], bytes]:
    def read(n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(fd, n)
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    return read


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the feeder waits on it
        self._waiting: collections.deque[tuple[int, Future[Any], Callable[..., Any],
                                               tuple[Any, ...], dict[str, Any]]] = (
            collections.deque())
        self._sent: dict[int, _Sent] = {}
        self._call_ids = itertools.count(1)
        self._feeder_idle = False
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
        _write_all(self._submit_w, encode_frame(FrameType.SETTINGS, pickle.dumps(settings)))
        self._feeder = threading.Thread(target=self._feed, name="taskpool-feeder", daemon=True)
        self._collector = threading.Thread(target=self._collect, name="taskpool-collector",
                                           daemon=True)
        self._feeder.start()
        self._collector.start()
        _LIVE.add(self)

    # --- the caller's side ----------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._work:
            if self._broken is not None:
                raise WorkerCrashed(self._broken)
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._waiting.append((next(self._call_ids), future, fn, args, kwargs))
            if self._feeder_idle:
                self._feeder_idle = False
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
        with self._work:
            if cancel_futures:
                while self._waiting:
                    self._waiting.popleft()[1].cancel()
            self._closing = True
            self._work.notify()
        if wait:
            self._feeder.join()
            self._collector.join()

    # --- feeder thread ------------------------------------------------------------------

    def _batch_size(self) -> int:
        """Called with the lock held."""
        per_call = self._seconds_per_call
        if self._timeout is not None or per_call is None:
            return 1  # a timeout is per call; an unknown call may be long
        size = min(MAX_BATCH_CALLS, max(1, int(BATCH_SECONDS / max(per_call, 1e-7))))
        # Never so large that one worker gets what several could share.
        return min(size, -(-len(self._waiting) // self._workers))

    def _feed(self) -> None:
        batches = 0
        try:
            while True:
                with self._work:
                    while not self._waiting and not self._closing:
                        self._feeder_idle = True
                        self._work.wait()
                    if not self._waiting:
                        break
                    take = self._batch_size()
                    taken = [self._waiting.popleft()
                             for _ in range(min(take, len(self._waiting)))]
                for payload in self._encode(taken):
                    batches += 1
                    _write_all(self._submit_w, encode_batch(batches, payload))
            _write_all(self._submit_w, encode_end(batches))
        except OSError:
            pass  # the Dealer is gone: the collector fails what is left
        finally:
            os.close(self._submit_w)

    def _encode(self, taken: list[Any]) -> Iterator[bytes]:
        """The taken calls as batch payloads of at most INLINE_CALLS_LIMIT bytes."""
        calls: list[tuple[int, CallWhere, bytes]] = []
        size = 0
        for call_id, future, fn, args, kwargs in taken:
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            try:
                data = pickle.dumps((fn, args, kwargs), pickle.HIGHEST_PROTOCOL)
            except BaseException as e:  # noqa: BLE001 - as PPE: the future carries it
                future.set_exception(e)
                continue
            sent = _Sent(future)
            where = CallWhere.INLINE
            if len(data) + _CALL_FRAME_OVERHEAD > INLINE_CALLS_LIMIT:
                sent.memfd = fd = os.memfd_create("taskpool-call", os.MFD_CLOEXEC)
                _write_all(fd, data)
                data, where = encode_memfd_ref(os.getpid(), fd, len(data)), CallWhere.MEMFD
            if size + len(data) + _CALL_FRAME_OVERHEAD > INLINE_CALLS_LIMIT and calls:
                yield encode_calls(calls)
                calls, size = [], 0
            with self._lock:
                if self._broken is not None:
                    self._resolve(sent, WorkerCrashed(self._broken))
                    continue
                self._sent[call_id] = sent
            calls.append((call_id, where, data))
            size += len(data) + _CALL_FRAME_OVERHEAD
        if calls:
            yield encode_calls(calls)

    # --- collector thread -------------------------------------------------------------

    def _collect(self) -> None:
        read = _exactly(self._outcome_r)
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
                elif ftype is FrameType.STOPPED:
                    reason = body.decode()
        except (ProtocolError, OSError, ValueError) as e:
            reason = f"the Executor's Dealer sent a bad frame: {e}"
        status = self._dealer.wait()
        if status != 0:
            ipc.sweep_queues_of(self._dealer.pid)  # it may have died inside a creation
            if reason is None:
                how = (f"killed by signal {-status}" if status < 0
                       else f"exited with status {status}")
                reason = f"the Executor's Dealer process (PID {self._dealer.pid}) {how}"
        os.close(self._outcome_r)
        os.close(self._lifeline_w)
        with self._lock:
            if reason is not None or self._sent or self._waiting:
                self._broken = reason or "the Executor's Dealer ended before its calls"
            sent_left = list(self._sent.values())
            waiting_left = [item[1] for item in self._waiting]
            self._sent.clear()
            self._waiting.clear()
            self._work.notify()
        error = WorkerCrashed(self._broken or "")
        for sent in sent_left:
            self._resolve(sent, error)
        for future in waiting_left:
            if future.set_running_or_notify_cancel():
                self._resolve(_Sent(future), error)

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

    def _finish(self, call_id: int, *, value: Any = None,
                error: BaseException | None = None) -> None:
        with self._lock:
            sent = self._sent.pop(call_id, None)
        if sent is not None:  # None: already resolved (a duplicate cannot get here, but...)
            self._resolve(sent, error, value)

    @staticmethod
    def _resolve(sent: _Sent, error: BaseException | None, value: Any = None) -> None:
        if sent.memfd is not None:
            os.close(sent.memfd)
        try:
            if error is not None:
                sent.future.set_exception(error)
            else:
                sent.future.set_result(value)
        except InvalidStateError:
            pass  # cancelled before it started: nothing to tell


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
