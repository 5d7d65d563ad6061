"""The results journal: an SQLite file (WAL mode) of the accepted jobs and of every recorded
outcome, so that a run killed at any instant can be resumed with exactly-once results.

Only main writes it, in batches (see `Journal.commit`): a results line is written to
--results after its batch is committed, never before, so the journal is always at least as
complete as the results file, and `--resume` rewrites the results file from the journal.

Durability: with journal_mode=WAL and synchronous=NORMAL, a committed batch survives the
death of any of our processes (kill -9, OOM): it is in the WAL file, which the next open
replays. After a power loss or an OS crash, the batches committed since the last checkpoint
of the WAL may be lost (NORMAL does not fsync at every commit); those jobs simply run again
on resume, and still appear once in the results.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from taskpool.model.jobs import COMMAND_KINDS, Job, JobKind, job_digest, kind_of_label
from taskpool.model.outcome import JobRecord, Status

SCHEMA_VERSION = "2"  # 2 added jobs.pool and jobs.priority (typed pools)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job INTEGER PRIMARY KEY, kind TEXT NOT NULL, arg TEXT NOT NULL, timeout REAL,
    line INTEGER NOT NULL, digest TEXT NOT NULL,
    pool INTEGER NOT NULL DEFAULT 1, priority INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS outcomes (
    job INTEGER PRIMARY KEY, status TEXT NOT NULL, result TEXT, worker INTEGER,
    attempts INTEGER NOT NULL, reason TEXT);
"""


# The columns taskpool reads; a table that lacks one is not our journal.
_COLUMNS = {
    "jobs": {"job", "kind", "arg", "timeout", "line", "digest", "pool", "priority"},
    "outcomes": {"job", "status", "result", "worker", "attempts", "reason"},
}


class JournalError(Exception):
    """A journal that cannot be used as asked; the message is for people."""


def describe(job: Job) -> str:
    return _describe(job.kind.label, _arg_text(job), job.timeout, job.pool, job.priority)


def _arg_text(job: Job) -> str:
    """A job's arg column: a command's text, any other job's repr(arg)."""
    return job.text if job.kind in COMMAND_KINDS else repr(job.arg)


def _describe(kind: str, arg: object, timeout: float | None, pool: int, priority: int) -> str:
    text = f"{kind} {arg}"
    if timeout:
        text += f" timeout={timeout:g}"
    if pool != 1:
        text += f" type={pool}"
    if priority:
        text += f" priority={priority}"
    return text


class Journal:
    def __init__(self, path: str, connection: sqlite3.Connection,
                 lock_fd: int | None = None) -> None:
        self.path = path
        self.db = connection
        # flock()ed for the whole run: a second run on this journal is refused. Main's
        # children close their copy at start (proc.close_fds_except), so the lock is main's.
        self.lock_fd = lock_fd
        self.pending_jobs: list[Job] = []
        self.pending_outcomes: list[JobRecord] = []
        # --resume --retry-failed: the jobs the journal has as failed that this run runs
        # again. Their new outcome replaces the old one as its batch commits; until then
        # the old one stands, so a run killed meanwhile still resumes from a whole record.
        # Every other outcome is written once, never replaced.
        self.rerunning: frozenset[int] = frozenset()

    @classmethod
    def open(cls, path: str, resume: bool, *, for_run: bool = True) -> Journal:
        """Open (resume) or create (not resume) a journal; JournalError if that cannot be
        done safely. `for_run`: a run will write it, so it is locked for this process (and
        refused if another run holds it); `taskpool results` only reads."""
        if os.path.isdir(path):
            raise JournalError(f"{path}: a directory, not a journal")
        if not for_run and not _has_content(path):
            raise JournalError(_not_a_journal_yet(path))
        if resume and not _has_content(path):
            raise JournalError(f"{path}: no journal to resume (run once without --resume)")
        lock_fd = _lock(path) if for_run else None
        try:
            journal = cls._connect(path, lock_fd)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        if for_run and not resume:
            journal._refuse_another_run()
        return journal

    @classmethod
    def _connect(cls, path: str, lock_fd: int | None) -> Journal:
        exists = _has_content(path)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            journal = cls(path, db, lock_fd)
            if exists:
                journal._check_usable()
            else:
                db.executescript(_SCHEMA)
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            if lock_fd is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('owner', ?)",
                           (str(os.getpid()),))
        except sqlite3.DatabaseError as e:
            raise JournalError(f"{path}: not a usable taskpool journal ({e})") from None
        except OSError as e:
            raise JournalError(_cannot_open(path, e)) from None
        return journal

    def _refuse_another_run(self) -> None:
        """A journal that holds jobs already is another run's (or this job file's, killed):
        only --resume may go on with it. Its outcomes would otherwise be taken for ours."""
        outcomes = self.outcome_count()
        jobs = len(self.jobs()) if not outcomes else 0
        if outcomes or jobs:
            held = (f"{outcomes} recorded jobs" if outcomes
                    else f"{jobs} jobs (none recorded yet)")
            self.close()
            raise JournalError(f"{self.path}: already holds a run with {held}: add --resume "
                               "to go on with it, or give a new journal file")

    def _check_usable(self) -> None:
        check = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check}")
        tables = {row[0] for row in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"meta", "jobs", "outcomes"} <= tables:
            raise sqlite3.DatabaseError("an SQLite file, but not a taskpool journal")
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is not None and row[0] == "1":
            # A journal of a run from before typed pools: every job was type 1, priority 0.
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("ALTER TABLE jobs ADD COLUMN pool INTEGER NOT NULL DEFAULT 1")
                self.db.execute(
                    "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
                self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (SCHEMA_VERSION,))
            row = (SCHEMA_VERSION,)
        if row is None or row[0] != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"journal schema {row and row[0]}, "
                                        f"expected {SCHEMA_VERSION}")
        for table, columns in _COLUMNS.items():
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if not columns <= have:
                missing = ", ".join(sorted(columns - have))
                raise sqlite3.DatabaseError(f"its {table} table has no {missing} column")

    # --- reading ---------------------------------------------------------------------

    def jobs(self) -> dict[int, tuple[str, int, str]]:
        """job id: (digest, line, description)"""
        rows = self.db.execute(
            "SELECT job, kind, arg, timeout, line, digest, pool, priority FROM jobs")
        return {job: (digest, line, _describe(kind, arg, t, pool, priority))
                for job, kind, arg, t, line, digest, pool, priority in rows}

    def all_jobs(self) -> dict[int, Job]:
        rows = self.db.execute(
            "SELECT job, kind, arg, timeout, line, pool, priority FROM jobs ORDER BY job")
        try:
            return {job: _job(job, kind, arg, timeout, pool, priority, line)
                    for job, kind, arg, timeout, line, pool, priority in rows}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise JournalError(f"{self.path}: not a usable taskpool journal (a job cannot be "
                               f"read: {e!r})") from None

    def outcomes(self) -> dict[int, JobRecord]:
        """Every recorded outcome; JournalError if one cannot be read back (a journal
        written by something else than taskpool)."""
        rows = self.db.execute(
            "SELECT o.job, j.kind, j.arg, o.status, o.result, o.worker, o.attempts, o.reason, "
            "j.pool, j.priority FROM outcomes o JOIN jobs j USING (job) ORDER BY o.job")
        try:
            return {job: JobRecord(job=job, kind=kind, arg=_arg(kind, arg), status=status,
                                   result=None if result is None else json.loads(result),
                                   worker=worker, attempts=attempts, reason=reason, type=pool,
                                   priority=priority)
                    for job, kind, arg, status, result, worker, attempts, reason, pool, priority
                    in rows}
        except (ValueError, TypeError, KeyError) as e:
            raise JournalError(f"{self.path}: not a usable taskpool journal (an outcome "
                               f"cannot be read: {e})") from None

    def outcome_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM outcomes").fetchone()[0])

    def first_difference(self, jobs: Iterable[Job], source: str) -> str | None:
        """Where the jobs given differ from the journal's, as a message; None if they agree."""
        recorded = self.jobs()
        given = 0
        for job in jobs:
            given += 1
            entry = recorded.get(job.job_id)
            if entry is None:
                if recorded:
                    return (f"{source}:{job.line}: job {job.job_id} ({describe(job)}) is not in "
                            f"the journal, which has {len(recorded)} jobs")
                return None  # a journal with no jobs yet: nothing to differ from
            if entry[0] != job_digest(job):
                return (f"{source}:{job.line}: job {job.job_id} is '{describe(job)}' here but "
                        f"'{entry[2]}' in the journal (line {entry[1]})")
        if given < len(recorded):
            missing = min(j for j in recorded if j > given)
            return (f"{source}: has {given} jobs, the journal {len(recorded)}: job {missing} "
                    f"(line {recorded[missing][1]} then) is missing")
        return None

    # --- writing, in batches -------------------------------------------------------------

    def add_job(self, job: Job) -> None:
        self.pending_jobs.append(job)

    def add_outcome(self, record: JobRecord) -> None:
        self.pending_outcomes.append(record)

    def commit(self) -> list[JobRecord]:
        """Write what is pending in one transaction; return the outcomes now durable."""
        if not self.pending_jobs and not self.pending_outcomes:
            return []
        jobs, outcomes = self.pending_jobs, self.pending_outcomes
        self.pending_jobs, self.pending_outcomes = [], []
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR IGNORE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(j.job_id, j.kind.label, _arg_text(j), j.timeout, j.line, job_digest(j),
                  j.pool, j.priority) for j in jobs])
            for verb, rows in (("IGNORE", [r for r in outcomes if r.job not in self.rerunning]),
                               ("REPLACE", [r for r in outcomes if r.job in self.rerunning])):
                self.db.executemany(
                    f"INSERT OR {verb} INTO outcomes VALUES (?, ?, ?, ?, ?, ?)",
                    [(r.job, r.status, None if r.result is None else json.dumps(r.result),
                      r.worker, r.attempts, r.reason) for r in rows])
        return outcomes

    def failed_to_run_again(self, resumed: dict[int, JobRecord]) -> dict[int, JobRecord]:
        """--resume --retry-failed: take the failed outcomes out of what resumes (their
        jobs run again) and mark them to be replaced; the outcomes that stand."""
        self.rerunning = frozenset(job for job, record in resumed.items()
                                   if record.status == Status.FAILED.value)
        return {job: record for job, record in resumed.items() if job not in self.rerunning}

    def close(self) -> None:
        self.db.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _has_content(path: str) -> bool:
    try:
        return Path(path).stat().st_size > 0
    except OSError:
        return False


def _not_a_journal_yet(path: str) -> str:
    """Why `taskpool results` finds nothing to read at `path`."""
    if not os.path.lexists(path):
        return f"{path}: no such file (a run writes its journal with --journal {path})"
    return f"{path}: an empty file, not a taskpool journal"


def _cannot_open(path: str, e: OSError) -> str:
    """Why the journal cannot be opened or created, in the user's terms."""
    directory = os.path.dirname(path) or "."
    if e.errno == errno.ENOENT and not os.path.isdir(directory):
        return (f"{path}: cannot create the journal: there is no directory {directory} "
                "(create it first, or give a path in an existing one)")
    return f"{path}: cannot open the journal ({e.strerror})"


def _lock(path: str) -> int:
    """An exclusive lock on the journal for this run, or JournalError naming the run that
    holds it. flock(), not SQLite's own locks: those last a transaction, this the run (and
    the kernel drops it when the holder dies, however it dies)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise JournalError(_cannot_open(path, e)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        owner = _owner(path)
        by = f"another run (PID {owner})" if owner else "another run"
        raise JournalError(f"{path}: in use by {by}: wait for it to end, or give another "
                           "journal file") from None
    return fd


def _owner(path: str) -> str | None:
    """The pid of the run that holds the journal, as it wrote it: read-only, so as not to
    disturb it."""
    try:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=1.0)) as db:
            row = db.execute("SELECT value FROM meta WHERE key='owner'").fetchone()
    except (sqlite3.Error, OSError, ValueError):
        return None
    return None if row is None else str(row[0])


def _arg(kind: str, text: str) -> float | int | str:
    """A job's arg from its column: a command's is its text."""
    if kind in _COMMAND_LABELS:
        return text
    return float(text) if kind == JobKind.SLEEP.label else int(text)


_COMMAND_LABELS = frozenset(kind.label for kind in COMMAND_KINDS)


def _job(job: int, label: str, arg: str, timeout: float | None, pool: int, priority: int,
         line: int) -> Job:
    kind = kind_of_label(label)
    if kind in COMMAND_KINDS:
        return Job(job, kind, 0, timeout, pool, priority, line=line, payload=arg.encode())
    return Job(job, kind, _arg(label, arg), timeout, pool, priority,  # type: ignore[arg-type]
               line=line)
