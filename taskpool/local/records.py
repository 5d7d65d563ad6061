"""Where the recv thread's outcomes go, and how many there are: RecordWriter and Tally.

A CLI Dealer writes JSON lines on main's record pipe (RecordWriter); an Executor's Dealer
writes frames on its caller's outcome pipe instead (executor/host.py, FrameWriter). Either
is handed what was decided as data (a Result; a Death and the Decision that failed the
job): nothing downstream edits or parses a reason.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, NoReturn

from taskpool.core.supervision import Death, Decision
from taskpool.model.exits import EXIT_STOPPED_EARLY
from taskpool.model.jobs import Job
from taskpool.model.outcome import DealerStats, JobRecord, Status
from taskpool.posix import mqueue, proc
from taskpool.wire.commands import Ending
from taskpool.wire.queue import Result
from taskpool.wire.records import encode_done, encode_ended, encode_record


def _exit_stopped_early() -> NoReturn:
    mqueue.exit_between_creations(EXIT_STOPPED_EARLY)


class RecordWriter:
    """Where the recv thread's outcomes go: JSON lines on main's record pipe. Owned by the
    recv thread, but for the stats, written by the main thread after the others have ended.

    Outcomes are held until `flush`, which the recv thread calls before it blocks (nothing
    more to read for now), and which `write` calls itself once FLUSH_BYTES are held. So
    under load one write, and one wake-up of the reader, carries many outcomes; it was one
    of each per job, two thirds of main's time. An outcome never waits on more work: only
    on the messages already in the result queue, or a failure of a Dealer thread. A lock
    guards what is held, so that the thread that fails (the send thread, say) can flush
    what the recv thread holds before the Dealer exits (`Dealer._guarded`)."""

    # Held at most: PIPE_BUF, so that a write of records stays atomic, and a Dealer
    # killed outright loses at most this much of the outcomes it has (~27 jobs': main
    # reports them not done, and --resume runs them again).
    FLUSH_BYTES = 4096

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # What to do when a write finds our reader gone: the Dealer sets it (_reader_lost).
        self.reader_lost: Callable[[], NoReturn] = _exit_stopped_early
        self.lock = threading.Lock()
        self.pending: list[bytes] = []  # under `lock`
        self.pending_bytes = 0  # under `lock`

    def done(self, job: Job, result: Result) -> None:
        self.write(encode_done(job, result))

    def ended(self, job: Job, result: Result, ending: Ending, failure: Death | None) -> None:
        """A job of real work ran to its end: done, or failed for `failure`'s reason."""
        self.write(encode_ended(job, result, ending,
                                None if failure is None else failure.reason))

    def failed(self, job: Job, pid: int, death: Death, decision: Decision) -> None:
        """`job` failed for good: `death` ended its last attempt, `decision` counts them."""
        self.write(encode_record(JobRecord.of(
            job, Status.FAILED, worker=pid, attempts=decision.failed_attempts,
            reason=decision.failure_reason(death))))

    def stats(self, stats: DealerStats) -> None:
        self.write(encode_record(stats))

    def worker_lost(self, pid: int, death: Death, resent: int) -> None:
        """A worker died at work (not retired, not stopped with the pool), and `resent`
        calls or jobs it held go again. A CLI run has it in its log and events already;
        an Executor's Dealer tells its caller (executor/host.py)."""

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.pending_bytes + len(data) > self.FLUSH_BYTES:
                self._flush()
            self.pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes >= self.FLUSH_BYTES:
                self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        try:
            proc.write_all(self.fd, data)
        except BrokenPipeError:
            self.reader_lost()


@dataclass
class Tally:
    """How far the run has come, for the all-done decision. Owned by the recv thread (the
    receiver records results, recovery records failures and splits batches): no lock."""

    expected_total: int | None = None  # jobs the generator sent: known from EndOfJobs
    recorded: int = 0  # jobs recorded, done or failed
    failed: int = 0  # of them, failed: what --halt counts
    # Jobs made by splitting a crashed batch of calls, beyond the one each replaced.
    split_extra: int = 0

    def all_recorded(self) -> bool:
        return (self.expected_total is not None
                and self.recorded == self.expected_total + self.split_extra)
