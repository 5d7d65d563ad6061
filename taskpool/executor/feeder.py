"""The feeder thread: takes submitted calls and writes them to the Dealer in batches, one
CALL job each, its calls one pickle.

Batching: the feeder sizes batches so that one takes about BATCH_SECONDS of a worker's
time, from the run time the workers report; it starts at one call a batch, stays there for
slow calls (a CPU-bound batch is shared evenly between workers), and grows for short ones.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any

from taskpool.core.calls import dumps
from taskpool.executor.bookkeeping import Bookkeeping, Call, SentBatch
from taskpool.executor.dealer_process import DealerProcess, calls_in_memfd
from taskpool.executor.errors import WorkerCrashed
from taskpool.executor.pickling import call_not_sent
from taskpool.executor.settings import INLINE_CALLS_LIMIT, ExecutorSettings
from taskpool.wire.calls import CallBatch, CallWhere

BATCH_SECONDS = 0.002  # of a worker's time per batch: the Dealer's cost per batch is ~0.1 ms
MAX_BATCH_CALLS = 512
SHARES = 4


class Feeder(threading.Thread):
    """Takes calls from `books.again`, then `books.waiting`; makes their futures RUNNING
    (cancel() succeeds only for calls not yet handed to the Dealer), puts each batch in
    `books.sent`, then writes it to the submit pipe, which it alone writes and closes.

    Blocks on `books.work` while nothing can be sent, and in the pipe write while the
    Dealer is behind. Ends, with END, once closing and every call is resolved; or at once
    when the pool broke or the Dealer is gone (the collector fails what is left)."""

    def __init__(self, books: Bookkeeping, dealer: DealerProcess,
                 settings: ExecutorSettings) -> None:
        super().__init__(name="taskpool-feeder", daemon=True)
        self._books = books
        self._dealer = dealer
        self._workers = settings.workers
        self._unbatched = settings.unbatched

    def run(self) -> None:
        # SIGPIPE blocked in this thread, which alone writes to the Dealer: a caller that
        # restored SIGPIPE's default action is not killed when its Dealer is gone, the write
        # fails with EPIPE instead. The signal, sent to this thread only, stays pending on
        # it, and goes with it: the mask of no other thread changes.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
        try:
            self._dealer.send_settings()
            self._dealer.send_end(self._feed())
        except OSError:
            pass  # the Dealer is gone: the collector fails what is left
        finally:
            self._dealer.close_submit()

    def _feed(self) -> int:
        """Send batches until done (see _wait_for_work); how many were sent."""
        batches = 0
        while self._wait_for_work():
            batches += self._send_next(batches + 1)
        return batches

    def _send_next(self, batch_id: int) -> int:
        """Send the next batch as `batch_id`: 1; or 0 if none was sent. Its calls are this
        frame's only, gone when it returns: the feeder holds nothing of a call while it
        waits (once a future is resolved, nothing of its call is left in the Executor)."""
        futures, calls = self._take_next()
        if not calls:
            return 0  # all cancelled while they waited, or swept (the pool broke)
        batch = self._encode_or_fail(batch_id, futures, calls)
        if batch is None:
            return 0
        self._dealer.send_batch(batch)
        return 1

    # --- when to send ---------------------------------------------------------------------

    def _wait_for_work(self) -> bool:
        """Until a batch may be sent (True), or the feeder is done (False): closing, and
        every call submitted before it is done; or broken, and the collector fails what
        waits. Does what shutdown(cancel_futures=True) asked on the way."""
        books = self._books
        while True:
            if books.cancel_requested:
                self._cancel_waiting()
            if books.broken is not None or self._all_sent():
                return False
            if self._can_send():
                return True
            # No lost wake-up: the flags are set before the state is checked again under
            # the lock, and submit (collector, shutdown) changes the state before it reads
            # its flag; so either we see the change, or it sees the flag and notifies,
            # under the lock that we hold until wait() releases it.
            with books.work:
                books.feeder_wants_work = not (books.waiting or books.again)
                # Room, or, once closing, the last outcomes (see _all_sent).
                books.feeder_wants_room = not books.feeder_wants_work or books.closing
                if not (self._can_send() or books.broken is not None or self._all_sent()
                        or books.cancel_requested):
                    books.work.wait()
                books.feeder_wants_work = books.feeder_wants_room = False

    def _cancel_waiting(self) -> None:
        """shutdown(cancel_futures=True): each idle worker starts one waiting call (as PPE's
        workers take theirs from its call queue), and every other waiting call is
        cancelled. Run here, not in shutdown(), so that it sees which workers are idle."""
        books = self._books
        books.cancel_requested = False
        idle = max(0, self._workers - len(books.sent))
        while True:
            try:
                future, fn, args, kwargs = books.waiting.popleft()
            except IndexError:
                break
            if idle and future.set_running_or_notify_cancel():
                books.again.append((future, (fn, args, kwargs)))
                idle -= 1
            else:
                future.cancel()

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
        books = self._books
        return bool(books.waiting or books.again) and len(books.sent) < self._window()

    def _all_sent(self) -> bool:
        """Closing, and every call is sent and resolved: none can come back to be sent
        again (see `books.again`), so the feeder may tell the Dealer it has all there is."""
        books = self._books
        # In this order: Collector._send_again fills `again` before its batch leaves `sent`.
        return books.closing and not books.sent and not books.again and not books.waiting

    # --- what to send ---------------------------------------------------------------------

    def _take_next(self) -> tuple[list[Future[Any] | None], list[Call]]:
        """A call to send again, alone; else the next batch of waiting calls."""
        again = self._books.again
        if again:
            try:
                future, call = again.popleft()
            except IndexError:  # the collector's sweep took it (the pool broke)
                return [], []
            return [future], [call]
        return self._take(self._batch_size())

    def _batch_size(self) -> int:
        per_call = self._books.seconds_per_call
        if self._unbatched:
            return 1  # a timeout is per call, and so is a worker's count of tasks
        if per_call is None:
            return 1  # an unknown call may be long
        size = min(MAX_BATCH_CALLS, max(1, int(BATCH_SECONDS / max(per_call, 1e-7))))
        # Never so large that one worker gets what several could share: what waits goes
        # out in at least SHARES batches a worker, so that a batch whose calls are slower
        # than the estimate (made on earlier, other calls) is a small part of the whole.
        return min(size, -(-len(self._books.waiting) // (self._workers * SHARES)))

    def _take(self, count: int) -> tuple[list[Future[Any] | None], list[Call]]:
        """Up to `count` waiting calls that were not cancelled, and their futures, now
        RUNNING (a call handed on can no longer be cancelled)."""
        futures: list[Future[Any] | None] = []
        calls: list[Call] = []
        popleft = self._books.waiting.popleft
        for _ in range(count):
            try:
                future, fn, args, kwargs = popleft()
            except IndexError:
                break
            if future.set_running_or_notify_cancel():  # False: cancelled while it waited
                futures.append(future)
                calls.append((fn, args, kwargs))
        return futures, calls

    # --- the batch ----------------------------------------------------------------------

    def _encode_or_fail(self, batch_id: int, futures: list[Future[Any] | None],
                        calls: list[Call]) -> CallBatch | None:
        try:
            return self._encode(batch_id, futures, calls)
        except Exception as e:  # noqa: BLE001 - pickling (see _encode), a memfd
            # These calls fail with what went wrong; the pool goes on.
            for taken in futures:
                if taken is not None and not taken.done():
                    with contextlib.suppress(InvalidStateError):
                        taken.set_exception(e)
            return None

    def _encode(self, batch_id: int, futures: list[Future[Any] | None],
                calls: list[Call]) -> CallBatch | None:
        """The calls that pickle as one batch, in `books.sent` before it is returned; None
        if none does. A call that does not pickle fails its future."""
        try:
            data = dumps(calls)
        except BaseException:  # noqa: BLE001 - find the calls that do not pickle
            futures, calls = _picklable(futures, calls)
            if not calls:
                return None
            data = dumps(calls)
        sent = SentBatch(futures, calls)
        where = CallWhere.INLINE
        if len(data) > INLINE_CALLS_LIMIT:
            sent.memfd, data = calls_in_memfd(data)
            where = CallWhere.MEMFD
        books = self._books
        books.sent[batch_id] = sent
        if books.broken is not None:
            # The pool broke while we built it: its calls fail here (the collector's
            # sweep may have run before the batch was in `sent`).
            books.fail_batch(batch_id, WorkerCrashed(books.broken))
        return CallBatch(batch_id, 0, len(futures), where, data)


def _picklable(futures: list[Future[Any] | None], calls: list[Any]) -> tuple[list[Any],
                                                                              list[Any]]:
    """The calls that pickle, and their futures; each other future gets its error (as
    PPE's, the future carries it), which names the function and the argument at fault."""
    kept_futures, kept_calls = [], []
    for future, call in zip(futures, calls):
        try:
            dumps(call)
        except BaseException as e:  # noqa: BLE001
            assert future is not None
            future.set_exception(call_not_sent(call, e))
            continue
        kept_futures.append(future)
        kept_calls.append(call)
    return kept_futures, kept_calls
