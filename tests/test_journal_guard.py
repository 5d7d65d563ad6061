"""A journal belongs to one run: another run's journal is refused without --resume, a journal
in use is locked, and a journal that cannot be written (a full disk) loses no job."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from taskpool.core.journal import Journal, JournalError
from taskpool.core.recorder import Recorder
from taskpool.model.exits import EXIT_JOBS_NOT_DONE, EXIT_OK
from taskpool.model.jobs import Job, JobKind
from taskpool.model.outcome import JobRecord, Status

from harness import ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskpool", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _jobs(n: int) -> list[Job]:
    return [Job(i, JobKind.FIB, 10 + i, line=i) for i in range(1, n + 1)]


def test_a_journal_holding_a_killed_runs_jobs_is_refused_to_another_job_file(
        tmp_path: Path) -> None:
    """Run A journaled its jobs and was killed before recording any outcome: a run of another
    job file on that journal would take A's rows for its own. Only --resume goes on."""
    path = tmp_path / "run.db"
    journal = Journal.open(str(path), resume=False)
    for job in _jobs(3):
        journal.add_job(job)
    journal.commit()
    journal.close()
    other = tmp_path / "other.txt"
    other.write_text("sleep 0\nsleep 0\n")
    proc = _run("run", "--jobs", str(other), "--journal", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "already holds a run with 3 jobs (none recorded yet): add --resume" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_journal_in_use_is_refused_naming_the_run_that_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    holder = Journal.open(str(path), resume=False)  # this process is "the other run"
    try:
        jobs = tmp_path / "jobs.txt"
        jobs.write_text("fib 10\n")
        for resume in ([], ["--resume"]):
            proc = _run("run", "--jobs", str(jobs), "--journal", str(path), *resume)
            assert proc.returncode == 2, proc.stderr
            assert f"in use by another run (PID {os.getpid()})" in proc.stderr
        with pytest.raises(JournalError, match=f"PID {os.getpid()}"):
            Journal.open(str(path), resume=False)
        reader = Journal.open(str(path), resume=True, for_run=False)  # `taskpool results`
        reader.close()
    finally:
        holder.close()
    again = Journal.open(str(path), resume=True)  # the lock went with its holder
    again.close()


def test_a_journal_that_cannot_be_opened_is_said_plainly(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(JournalError, match="cannot open the journal"):
        Journal.open(str(not_a_dir / "run.db"), resume=False)


def _crafted(path: Path, sql: str) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(sql)


def test_a_journal_with_the_right_tables_but_wrong_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "crafted.db"
    _crafted(path, "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);"
                   "INSERT INTO meta VALUES ('schema', '2');"
                   "CREATE TABLE jobs (job INTEGER PRIMARY KEY, kind TEXT);"
                   "CREATE TABLE outcomes (job INTEGER PRIMARY KEY, status TEXT);")
    with pytest.raises(JournalError, match="not a usable taskpool journal .*its jobs table has no"):
        Journal.open(str(path), resume=True, for_run=False)


def test_an_outcome_that_is_not_json_is_refused_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    journal = Journal.open(str(path), resume=False)
    journal.add_job(_jobs(1)[0])
    journal.commit()
    journal.db.execute("INSERT INTO outcomes VALUES (1, 'done', 'not json', 1, 1, NULL)")
    journal.close()
    reader = Journal.open(str(path), resume=True, for_run=False)
    with pytest.raises(JournalError, match="an outcome cannot be read"):
        reader.outcomes()
    reader.close()


def test_a_full_disk_under_the_journal_loses_no_outcome_and_exits_1(tmp_path: Path) -> None:
    """SQLITE_FULL ("database or disk is full"), made by capping the database's pages: every
    outcome still reaches the results file, once, and the run's status says the journal is
    not whole."""
    path = tmp_path / "run.db"
    journal = Journal.open(str(path), resume=False)
    journal.db.execute(f"PRAGMA max_page_count={_pages(journal) + 2}")
    jobs = _jobs(400)
    results = (tmp_path / "results.jsonl").open("w", encoding="utf-8")
    recorder = Recorder(results, journal)
    for job in jobs:
        recorder.accept(job)
    recorder.record_all([JobRecord.of(job, Status.DONE, result=1, worker=1, attempts=1)
                         for job in jobs])
    recorder.commit()
    results.close()
    assert recorder.journal_lost is not None and "full" in recorder.journal_lost
    written = [json.loads(line)["job"] for line in (tmp_path / "results.jsonl").open()]
    assert sorted(written) == [job.job_id for job in jobs]
    assert recorder.exit_status(None, cut_short=False) == EXIT_JOBS_NOT_DONE


def test_without_a_journal_failure_the_same_run_exits_0(tmp_path: Path) -> None:
    journal = Journal.open(str(tmp_path / "run.db"), resume=False)
    results = (tmp_path / "results.jsonl").open("w", encoding="utf-8")
    recorder = Recorder(results, journal)
    for job in _jobs(400):
        recorder.accept(job)
        recorder.record(JobRecord.of(job, Status.DONE, result=1, worker=1, attempts=1))
    recorder.commit()
    results.close()
    journal.close()
    assert recorder.exit_status(None, cut_short=False) == EXIT_OK


def _pages(journal: Journal) -> int:
    return int(journal.db.execute("PRAGMA page_count").fetchone()[0])
