"""The state an Executor's threads share, in one place, each part with who reads and writes
it and under which lock (or why it needs none): the calls that wait, the batches in flight,
and whether the pool is closing or broken. See client.py's module doc for the threads."""

from __future__ import annotations

import collections
import itertools
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]  # fn, args, kwargs
# (future, fn, args, kwargs): one tuple a call, as it may wait long enough to count toward
# the caller's cyclic GC.
Waiting = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
T = TypeVar("T")


class SentBatch:
    """A batch in flight: its futures in call order (None once resolved), how many are
    left, its calls (to send again one by one if their pickle does not load in a worker),
    and the memfd that holds its pickle if it was too large for a message."""

    __slots__ = ("futures", "left", "calls", "memfd")

    def __init__(self, futures: list[Future[Any] | None], calls: list[Call]) -> None:
        self.futures = futures
        self.left = len(futures)
        # A resolved call's entry is None too: once its future is resolved, we hold
        # nothing of it (its function, arguments or result), as PPE.
        self.calls: list[Call | None] = list(calls)
        self.memfd: int | None = None


class Bookkeeping:
    """Shared by the caller's threads (in submit and shutdown), the feeder and the collector.

    A call's future is resolved once: see resolve_each."""

    __slots__ = ("calls", "crashes", "resends", "failed", "submit_lock", "work", "waiting",
                 "again", "sent", "feeder_wants_work", "feeder_wants_room", "closing",
                 "cancel_requested", "broken", "seconds_per_call")

    def __init__(self) -> None:
        # What Executor.stats shows. `calls`: submitted, counted by submit under
        # submit_lock; `crashes`, `resends`: workers lost at work and calls sent again,
        # counted by the collector (LOST frames); `failed`: futures failed with
        # WorkerCrashed, counted by whoever fails them (fail_batch, the collector's sweep),
        # under no lock: an int += in one thread at a time but for a broken pool's feeder,
        # where a count a little off in a broken pool is harmless.
        self.calls = self.crashes = self.resends = self.failed = 0
        # submit() and shutdown() serialise on it alone, so that no submit can slip in after
        # shutdown has let the feeder go; the collector takes it to break the pool, so that
        # none slips in after that either.
        self.submit_lock = threading.Lock()
        # The feeder sleeps on it, and only there; submit, shutdown and the collector notify
        # it (see Feeder._wait_for_work for why no wake-up is lost).
        self.work = threading.Condition(threading.Lock())
        # Submitted calls not yet taken. submit appends (under submit_lock); the feeder takes
        # from the left without a lock (deque operations are atomic), so a submit never
        # waits for the feeder; shutdown(cancel_futures) and the collector's last sweep take
        # from the left too, and tolerate an empty deque where they looked at a full one.
        self.waiting: collections.deque[Waiting] = collections.deque()
        # Calls that go one a batch, before any waiting call, their futures RUNNING: those
        # of a batch whose pickle did not load in a worker (one argument that cannot be
        # unpickled there fails the load of all), so that only the call at fault fails, as
        # with PPE; and those that idle workers start as shutdown(cancel_futures) cancels
        # the rest (the feeder appends them, Feeder._cancel_waiting). The collector appends
        # (in Collector._send_again), the feeder takes them before any waiting call, the
        # collector's last sweep empties it: no lock, as `waiting`.
        self.again: collections.deque[tuple[Future[Any], Call]] = collections.deque()
        # Sent batches by id. The feeder adds one before it is written; the collector
        # resolves them; the last to resolve a batch's calls removes it (forget): the
        # collector, or, once the pool broke, the feeder in Feeder._encode. No lock: a
        # batch id is added once, and one caller wins its pop.
        self.sent: dict[int, SentBatch] = {}
        # Set by the feeder under `work` (and cleared as it wakes) while it waits for
        # calls (submit notifies) or for room in the window of sent batches, or for the
        # last outcomes (the collector notifies); read by the notifiers without the lock.
        self.feeder_wants_work = False
        self.feeder_wants_room = False
        # shutdown() was called, or the collector found the Dealer gone: no new submits.
        # Set by either under submit_lock, then the feeder is woken; read by submit (under
        # the lock) and by the feeder (without: it looks again under `work` before it
        # sleeps, and the setter's wake-up comes after the set).
        self.closing = False
        # shutdown(cancel_futures=True) asked the feeder to cancel what waits. Set by
        # shutdown under submit_lock (with closing), then the feeder is woken; read and
        # cleared by the feeder alone, which does the cancelling.
        self.cancel_requested = False
        # Why the pool cannot go on; None while it can. Set once, by the collector, under
        # submit_lock; read by submit (under it) and by the feeder (without: as `closing`,
        # and a batch it builds meanwhile is failed by Feeder._encode).
        self.broken: str | None = None
        # A worker's time per call, a moving average of what the workers report: written
        # by the collector, read by the feeder to size batches (a stale value only sizes
        # one batch a little off).
        self.seconds_per_call: float | None = None

    def close(self, cancel_futures: bool = False) -> None:
        """No more submits (shutdown(), or the Executor dropped): the feeder sends what is
        left and ends once every call is resolved. With cancel_futures, the feeder first
        starts what idle workers can take, and cancels the rest (Feeder._cancel_waiting)."""
        with self.submit_lock:
            self.closing = True
            if cancel_futures:
                self.cancel_requested = True
        self.wake_feeder()

    def wake_feeder(self) -> None:
        with self.work:
            self.work.notify()

    def fail_batch(self, batch_id: int, error: BaseException, first: int = 0,
                   count: int | None = None) -> None:
        """Fail the batch's calls [first, first + count) not resolved yet (all by default)."""
        sent = self.sent.get(batch_id)
        if sent is None:
            return
        end = len(sent.futures) if count is None else first + count
        errors = itertools.repeat(error, end - first)
        resolved = resolve_each(sent, first, errors, Future.set_exception)
        self.failed += resolved
        if count is None:  # the pool is broken: nothing of this batch is to come
            self.forget(batch_id)
        self.resolved(batch_id, sent, resolved)

    def resolved(self, batch_id: int, sent: SentBatch, count: int) -> None:
        """`count` more calls of the batch are resolved: once all are, it leaves `sent`."""
        sent.left -= count
        if sent.left <= 0:
            self.forget(batch_id)

    def forget(self, batch_id: int) -> None:
        sent = self.sent.pop(batch_id, None)  # one caller wins the pop, and closes
        if sent is not None and sent.memfd is not None:
            os.close(sent.memfd)


def resolve_each(sent: SentBatch, first: int, outcomes: Iterable[T],
                 resolve: Callable[[Future[Any], T], object]) -> int:
    """The calls first, first + 1, ... of a batch, each with its outcome: each one not
    resolved yet is, by resolve(its future, its outcome); how many were.

    A call's future is resolved by whoever replaces it with None in its batch's list, so it
    is resolved once; where two threads may look at once (the collector, and the feeder that
    finds the pool broken), the second's set raises InvalidStateError, caught: the first
    outcome stands."""
    resolved = 0
    futures, calls = sent.futures, sent.calls
    for i, outcome in enumerate(outcomes, first):
        future = futures[i]
        if future is not None:
            futures[i] = calls[i] = None
            resolved += 1
            try:
                resolve(future, outcome)
            except InvalidStateError:
                pass
    return resolved
