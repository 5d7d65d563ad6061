"""The collector thread: reads the Dealer's outcome frames and resolves the futures; at the
Dealer's exit, reaps it and fails whatever is left."""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any

from taskpool.core.calls import raised
from taskpool.executor.bookkeeping import Bookkeeping, SentBatch, resolve_each
from taskpool.executor.dealer_process import DealerProcess, running_pool_ended
from taskpool.executor.errors import WorkerCrashed
from taskpool.wire import ProtocolError
from taskpool.wire.frames import (
    FrameType,
    decode_failed,
    decode_lost,
    decode_outcomes_frame,
    read_frame,
)

# The caller's view of what the pool survived (or did not), at WARNING: a library's logger,
# silent unless the caller configures logging (a NullHandler is on "taskpool" from the
# first Executor on: dealer_process.running_pool_started).
log = logging.getLogger("taskpool.executor")


class Collector(threading.Thread):
    """Reads the outcome pipe, which it alone reads, and blocks on nothing else. A frame:

        OUTCOMES  resolves calls of a batch in `books.sent` (or, if the batch's pickle did
                  not load in its worker, hands its calls back to the feeder: _send_again)
        FAILED    fails calls of a batch: each killed `max_attempts` workers
    LOST      a worker died at work, and how many of its calls go again: logged, counted
        STOPPED   says why the Dealer gave up (its restart intensity was spent)

    At EOF (the Dealer exited) or a bad frame: reaps the Dealer, breaks the pool if it
    failed or calls are left, fails them, and lets the feeder go."""

    def __init__(self, books: Bookkeeping, dealer: DealerProcess) -> None:
        super().__init__(name="taskpool-collector", daemon=True)
        self._books = books
        self._dealer = dealer

    def run(self) -> None:
        try:
            reason = self._read_outcomes()
            self._end_pool(self._dealer.reap(reason))
        finally:
            running_pool_ended(self._books)

    def _read_outcomes(self) -> str | None:
        """Frames until EOF; then why the pool cannot go on, if the Dealer said it (STOPPED)
        or sent a frame we cannot read."""
        read = self._dealer.outcome_reader()
        reason = None
        try:
            while (frame := read_frame(read)) is not None:
                ftype, body = frame
                if ftype is FrameType.OUTCOMES:
                    self._on_outcomes(body)
                elif ftype is FrameType.FAILED:
                    self._on_failed(body)
                elif ftype is FrameType.LOST:
                    self._on_lost(body)
                elif ftype is FrameType.STOPPED:
                    reason = body.decode()
        except Exception as e:  # noqa: BLE001 - this thread must not die and leave futures
            reason = f"the Executor's Dealer sent a bad frame: {e!r}"
        return reason

    # --- outcomes -----------------------------------------------------------------------

    def _on_outcomes(self, body: bytes) -> None:
        batch_id, first, count, seconds, outcomes = decode_outcomes_frame(body)
        books = self._books
        sent = books.sent.get(batch_id)
        if sent is None:
            return  # failed already (the Dealer records a job once; this is a guard)
        returned, values = _unpickled(outcomes)
        if returned is None and isinstance(values, bytes):  # the pickle did not load
            if len(sent.futures) > 1:  # it holds other calls: one may be at fault, not these
                self._send_again(batch_id, sent, first, count)
                return
            returned, values = b"\x00", [values]  # this call's own pickle: it fails
        if returned is None:  # every call returned a plain value: here they are
            resolved = resolve_each(sent, first, values, Future.set_result)
        else:  # each value (or exception) pickled alone, returned[i] says which
            resolved = resolve_each(sent, first, zip(returned, values), _set_pickled)
        books.resolved(batch_id, sent, resolved)
        if resolved:
            self._learn_time_per_call(seconds / resolved)
        self._make_room()

    def _learn_time_per_call(self, per_call: float) -> None:
        """A moving average of the workers' time per call, that sizes the feeder's batches."""
        old = self._books.seconds_per_call
        self._books.seconds_per_call = per_call if old is None else 0.7 * old + 0.3 * per_call

    def _on_lost(self, body: bytes) -> None:
        pid, why, resent = decode_lost(body)
        self._books.crashes += 1
        self._books.resends += resent
        log.warning("A worker (PID %d) %s; %d call(s) sent again", pid, why, resent)

    def _on_failed(self, body: bytes) -> None:
        batch_id, first, count, why = decode_failed(body)
        log.warning("%d call(s) failed with WorkerCrashed: %s", count, why)
        self._books.fail_batch(batch_id, WorkerCrashed(why), first, count)
        self._make_room()

    def _send_again(self, batch_id: int, sent: SentBatch, first: int, count: int) -> None:
        """The calls [first, first + count) of a batch whose pickle did not load in their
        worker go back to the feeder, to be sent one by one: they leave this batch as if
        resolved."""
        books = self._books
        again = []
        for i in range(first, first + count):
            future = sent.futures[i]
            call = sent.calls[i]
            if future is not None and call is not None:
                sent.futures[i] = sent.calls[i] = None
                again.append((future, call))
        # Queued before their batch leaves `sent`, so that the feeder never sees them nowhere
        # (neither in flight nor in `again`) and ends too soon (see Feeder._all_sent).
        books.again.extend(again)
        books.resolved(batch_id, sent, len(again))
        books.wake_feeder()

    def _make_room(self) -> None:
        """Calls were resolved (by any frame), and their batch may have left the window: a
        feeder waiting for room, or for the last outcomes, goes on."""
        if self._books.feeder_wants_room:
            self._books.wake_feeder()

    # --- the end ------------------------------------------------------------------------

    def _end_pool(self, reason: str | None) -> None:
        """The Dealer is reaped: break the pool if it failed (`reason`) or left calls, fail
        those, and let the feeder go (it has nowhere to send)."""
        books = self._books
        with books.submit_lock:
            if reason is not None or books.sent or books.waiting or books.again:
                books.broken = reason or "the Executor's Dealer ended before its calls"
                log.warning("The pool is broken: %s", books.broken)
            books.closing = True
        self._fail_what_is_left(WorkerCrashed(books.broken or ""))
        # Last: the feeder may have looked between our setting `broken` and the sweep,
        # seen a full window and calls waiting, and gone back to sleep.
        books.wake_feeder()

    def _fail_what_is_left(self, error: WorkerCrashed) -> None:
        books = self._books
        for batch_id in list(books.sent):
            books.fail_batch(batch_id, error)
        while True:  # what the feeder has not taken (it fails what it has: Feeder._encode)
            try:
                future = books.waiting.popleft()[0]
            except IndexError:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
                books.failed += 1
        while True:  # running already, to be sent again
            try:
                future = books.again.popleft()[0]
            except IndexError:
                break
            with contextlib.suppress(InvalidStateError):
                future.set_exception(error)
                books.failed += 1


def _unpickled(outcomes: bytes) -> tuple[Any, Any]:
    """(returned, values), as the workers' run_calls pickled them."""
    try:
        returned, values = pickle.loads(outcomes)
    except Exception as e:  # noqa: BLE001 - the workers' own pickle of bytes and a list
        raise ProtocolError(f"outcomes that do not unpickle: {e!r}") from None
    return returned, values


def _set_pickled(future: Future[Any], outcome: tuple[int, bytes]) -> None:
    """A call's pickled outcome: its value if it returned, else its exception."""
    returned, data = outcome
    try:
        value = pickle.loads(data) if returned else raised(data)
    except BaseException as e:  # noqa: BLE001 - a value that does not unpickle
        future.set_exception(e)
        return
    if returned:
        future.set_result(value)
    else:
        future.set_exception(value)
