"""The recorder: every job a run knows of, each one's outcome recorded once, and the end.

Both engines (the local fork pool in main.py, Dask in dask_engine.py) hand their outcomes
here, so that the results file, the journal, the once-per-job-id rule, the not-done records,
the closing table and the exit status are one piece of code whichever engine ran the jobs.

With a journal, an outcome goes to the journal's pending batch first, and its results line
is written only once the batch is committed: the journal is always at least as complete as
the results file, which is what --resume relies on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Callable

from taskpool.core.journal import Journal
from taskpool.core.output import JobOutput
from taskpool.model.exits import EXIT_BAD_INPUT, EXIT_JOBS_NOT_DONE, EXIT_OK
from taskpool.model.jobs import COMMAND_KINDS, Job
from taskpool.model.outcome import DealerStats, JobRecord, Status
from taskpool.model.pools import PoolLayout
from taskpool.observe import events as ev
from taskpool.observe.log import event
from taskpool.observe.log import main_log as log
from taskpool.wire.records import results_line

# A journal batch is committed when it holds this many outcomes, or when its oldest outcome
# has waited this long: the cost of a commit is spread over many jobs, and no result waits
# long to reach the results file.
JOURNAL_BATCH_MAX = 500
JOURNAL_BATCH_DELAY = 0.05


@dataclass
class Recorder:
    """Every job of the run (whichever engine runs it), and each one's outcome, recorded
    once."""

    results: IO[str] | None
    journal: Journal | None = None
    known: dict[int, Job] = field(default_factory=dict)
    outcomes: dict[int, JobRecord] = field(default_factory=dict)
    rejected_lines: int = 0
    failed: int = 0  # this run's outcomes recorded failed (the journal's are not): --halt
    # The engine's counts: crashes (worker deaths), resends, per pool; why it stopped early.
    stats: DealerStats = field(default_factory=lambda: DealerStats(0, 0))
    batch_started: float | None = None  # when the oldest uncommitted outcome came
    journal_lost: str | None = None  # why the journal stopped taking outcomes, if it did
    results_lost: str | None = None  # why the results file stopped taking them, if it did
    # Told of each outcome as it is recorded: the live view's counts (done, failed).
    on_outcomes: Callable[[list[JobRecord]], None] | None = None
    # Where the jobs of real work's output goes, as each is recorded (core/output.py);
    # None where no job can have output (the engine set none).
    output: JobOutput | None = None

    def resume_from(self, resumed: dict[int, JobRecord]) -> None:
        """On --resume, what the journal already holds is recorded first, and the results
        file rewritten from it: the two never disagree about what is done."""
        for record in resumed.values():
            self.outcomes[record.job] = record
        self.write_results(list(resumed.values()))

    def record(self, record: JobRecord) -> None:
        self.record_all([record])

    def record_all(self, records: list[JobRecord]) -> None:
        """Record outcomes that came together: without a journal, their results lines go
        out in one write (the local engine reads the Dealer's records a pipe-read at a
        time, up to hundreds of them)."""
        unjournaled, recorded = [], []
        for record in records:
            if record.job in self.outcomes:
                log.info("Dropped duplicate record for job %d", record.job)
                continue
            record = self._with_text(record)
            self.outcomes[record.job] = record
            recorded.append(record)
            if record.status == Status.FAILED.value:
                self.failed += 1
            if self.journal is None or record.status == Status.NOT_DONE.value:
                unjournaled.append(record)
                continue
            self.journal.add_outcome(record)
            if self.batch_started is None:
                self.batch_started = time.monotonic()
            if len(self.journal.pending_outcomes) >= JOURNAL_BATCH_MAX:
                self.commit()
        self.write_results(unjournaled)
        if self.on_outcomes is not None and recorded:
            self.on_outcomes(recorded)

    def _with_text(self, record: JobRecord) -> JobRecord:
        """A job of real work's record, its arg its text: an engine may not send it (the
        local Dealer has only where it waits in the spool)."""
        job = self.known.get(record.job)
        if job is None or job.kind not in COMMAND_KINDS or record.arg == job.text:
            return record
        return dataclasses.replace(record, arg=job.text)

    def accept(self, job: Job) -> None:
        self.known[job.job_id] = job
        if self.journal is not None:
            self.journal.add_job(job)

    def seconds_to_commit(self) -> float | None:
        """How long the engine's loop may sleep before the pending batch is due; None:
        nothing pending, sleep until something happens."""
        if self.batch_started is None:
            return None
        return max(0.0, self.batch_started + JOURNAL_BATCH_DELAY - time.monotonic())

    def commit(self) -> None:
        if self.journal is not None:
            pending = self.journal.pending_outcomes
            try:
                committed = self.journal.commit()
            except sqlite3.Error as e:
                self._journal_failed(e)
                committed = pending
            if committed:
                log.debug("Journal: committed %d outcomes", len(committed))
            self.write_results(committed)
        self.batch_started = None

    def _journal_failed(self, error: sqlite3.Error) -> None:
        """The journal cannot take more (a full disk, say): the run goes on without it, its
        outcomes still reach the results file, and it ends with exit status 1, since the
        journal no longer holds what --resume would need."""
        assert self.journal is not None
        log.error("Journal: cannot write to %s (%s): recording the results file only; the "
                  "run will exit 1", self.journal.path, error)
        self.journal_lost = str(error)
        self.journal.close()
        self.journal = None

    def write_results(self, records: list[JobRecord]) -> None:
        """Each record's output delivered, then its results line written: both once, as
        the record is final (committed to the journal, if there is one)."""
        if self.output is not None:
            records = self._delivered(records)
        if self.results is not None and records:
            try:
                self.results.write("".join(map(results_line, records)))
                self.results.flush()
            except OSError as e:
                self._results_failed(e)

    def _delivered(self, records: list[JobRecord]) -> list[JobRecord]:
        assert self.output is not None
        delivered = []
        for record in records:
            kept = self.output.deliver(record)
            if kept is not record:
                self.outcomes[record.job] = kept
            delivered.append(kept)
        return delivered

    def _results_failed(self, error: OSError) -> None:
        """The results file cannot be written (a full disk, /dev/full): said once; the run
        goes on (a journal still records every outcome) and ends with exit status 1."""
        assert self.results is not None
        name = getattr(self.results, "name", "the results file")
        if name == 1:  # --results -
            name = "on standard output"
        log.error("Cannot write the results file %s (%s): %s", name,
                  error.strerror or error,
                  "its outcomes are in the journal" if self.journal is not None
                  else "the outcomes from here on are not recorded")
        self.results_lost = str(error)
        with contextlib.suppress(OSError):
            self.results.close()  # closed even when its last flush fails
        self.results = None

    def record_not_done(self, reason: str) -> None:
        self.commit()
        for job_id in sorted(self.known):
            if job_id not in self.outcomes:
                job = self.known[job_id]
                self.record(JobRecord.of(job, Status.NOT_DONE, reason=reason))

    def count(self, status: Status) -> int:
        return sum(1 for r in self.outcomes.values() if r.status == status.value)

    # --- the end ---------------------------------------------------------------------

    def finish(self, layout: PoolLayout, end_reason: str | None, wall_time: float,
               cut_short: bool = False) -> None:
        """Report every job without an outcome as not done, then log the exit table and the
        summary line. `cut_short`: the run ended early (a role lost, input left unread), so
        even with every job it knows done it is not "All done"."""
        reason = (end_reason or self.stats.stop_reason
                  or "the pool stopped before the job completed")
        self.record_not_done(reason)
        not_done = self.count(Status.NOT_DONE)
        if not_done:
            log.info("%d jobs not done: %s", not_done, reason)
        elif cut_short:
            log.info("Every job read is done, but the run stopped early: %s", reason)
        else:
            log.info("All done.")
        self._log_table(layout)
        total = len(self.outcomes)
        done, failed = self.count(Status.DONE), self.count(Status.FAILED)
        log.info(
            "Summary: %d jobs, %d done, %d failed, %d not done, %d crashes, %d resends, "
            "wall time %.2f s",
            total, done, failed, not_done, self.stats.crashes, self.stats.resends, wall_time,
            extra=event(ev.SUMMARY, jobs=total, done=done,
                        failed=failed, not_done=not_done,
                        crashes=self.stats.crashes, resends=self.stats.resends,
                        wall_time=round(wall_time, 3)),
        )

    def _log_table(self, layout: PoolLayout) -> None:
        """Per pool: workers (the most at once, on a Dask --scheduler cluster), jobs done,
        failed, not done, crashes and restarts; then how many attempts the done jobs took.
        Each line is an event with its figures."""
        outcomes = list(self.outcomes.values())
        pool_stats = {p["type"]: p for p in self.stats.pools}
        log.info("%-10s %7s %6s %6s %8s %7s %8s", "pool", "workers", "done", "failed",
                 "not done", "crashes", "restarts", extra=event(ev.TABLE_HEADER))
        for pool in layout.pools:
            counts = Counter(r.status for r in outcomes if r.type == pool.number)
            stats = pool_stats.get(pool.number, {})
            # The engine's count when it has one: a --scheduler cluster's own workers.
            row = {"type": pool.number, "workers": stats.get("workers", pool.size),
                   "done": counts[Status.DONE.value], "failed": counts[Status.FAILED.value],
                   "not_done": counts[Status.NOT_DONE.value],
                   "crashes": stats.get("crashes", 0), "restarts": stats.get("restarts", 0)}
            log.info("%-10s %7d %6d %6d %8d %7d %8d", pool.label, *list(row.values())[1:],
                     extra=event(ev.POOL_SUMMARY, **row))
        attempts = Counter(r.attempts for r in outcomes if r.status == Status.DONE.value)
        histogram = {str(n): attempts[n] for n in sorted(attempts)}
        log.info("Attempts per done job: %s",
                 ", ".join(f"{n}: {count}" for n, count in histogram.items()) or "none",
                 extra=event(ev.ATTEMPTS_HISTOGRAM, attempts=histogram))

    def exit_status(self, interrupted: int | None, cut_short: bool,
                    bad_setup: bool = False) -> int:
        """130/143 when interrupted (128 + the signal), 2 if any input line was rejected
        (or the engine could not start on what the user gave it), 1 if any job is not done
        (or the run was cut short, or its journal or results file could not be written),
        else 0."""
        if interrupted is not None:
            return 128 + interrupted
        if self.rejected_lines or bad_setup:
            return EXIT_BAD_INPUT
        not_whole = self.journal_lost or self.results_lost  # the record of the run is not
        if cut_short or not_whole or self.count(Status.DONE) < len(self.outcomes):
            return EXIT_JOBS_NOT_DONE
        return EXIT_OK
