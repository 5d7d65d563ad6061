"""The results journal and --resume: kill main at any instant, resume, and end with every
job's result exactly once; a resumed run never re-runs a job the journal says is done; a
torn, foreign or mismatched journal is refused with a clear error."""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from taskpool.observe import events as ev

from harness import (
    ROOT,
    PoolRun,
    assert_done_right,
    assert_exactly_once,
    kill_quietly,
    read_events,
    read_results,
    wait_for_files,
)


def journal_outcomes(journal: Path) -> dict[int, dict]:  # type: ignore[type-arg]
    proc = subprocess.run([sys.executable, "-m", "taskpool", "results", str(journal),
                           "--format", "jsonl"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return {r["job"]: r for r in rows if r["status"] != "not_done"}


def kill_main_and_resume(tmp_path: Path, total: int, kills: int, seed: int) -> None:
    """Run a job file with a journal; SIGKILL main after a random number of results; resume;
    repeat `kills` times, then resume to the end and check the union of results."""
    rng = random.Random(seed)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(rng.choice(["sleep 0.004\n", "fib 14\n", "sleep 0\n"])
                            for _ in range(total)))
    journal, results = tmp_path / "run.db", tmp_path / "r.jsonl"
    base = ["--workers", "2", "--jobs", str(jobs), "--journal", str(journal),
            "--results", str(results)]
    for round_number in range(kills + 1):
        done_before = journal_outcomes(journal) if round_number else {}
        run = PoolRun(base + (["--resume"] if round_number else []),
                      events=tmp_path / f"events{round_number}.jsonl")
        if round_number < kills:
            after = rng.randint(1, 25)
            run.wait_until_events(lambda events, after=after: (
                sum(e["event"] == ev.JOB_DONE for e in events) >= after
                or any(e["event"] == ev.SUMMARY for e in events)))
            kill_quietly(run.pid, signal.SIGKILL)
            run.finish()
        else:
            assert run.finish() == 0, run.log_text()
        rerun = {e["job"] for e in run.events_named(ev.JOB_SENT)}
        assert not rerun & set(done_before), "a resumed run re-ran a job the journal had done"
        now = journal_outcomes(journal)
        assert set(done_before) <= set(now), "the journal lost an outcome"
    records = read_results(results)
    assert_exactly_once(records, range(1, total + 1))
    assert_done_right(records)
    assert {r["job"] for r in records} == set(journal_outcomes(journal))


def test_main_killed_at_random_instants_and_resumed_gives_every_result_once(
    tmp_path: Path,
) -> None:
    kill_main_and_resume(tmp_path, total=300, kills=6, seed=1)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_soak_main_killed_at_50_random_instants_and_resumed(tmp_path: Path) -> None:
    kill_main_and_resume(tmp_path, total=2000, kills=50, seed=2)


def test_streamed_stdin_resumes_too_and_a_changed_line_is_refused(tmp_path: Path) -> None:
    journal, results = tmp_path / "run.db", tmp_path / "r.jsonl"
    lines = b"".join(b"fib %d\n" % (n % 20) for n in range(40))
    first = PoolRun(["--workers", "2", "--journal", str(journal), "--results", str(results),
                     "--verbose"], pipe_stdin=True, events=tmp_path / "events.jsonl")
    assert first.proc.stdin is not None
    first.proc.stdin.write(lines[: lines.index(b"\n", 100) + 1])  # some of the jobs
    first.proc.stdin.flush()
    first.wait_for_event(ev.JOB_DONE, count=5)
    wait_for_files(tmp_path, lambda: _journaled(journal, at_least=5), "5 committed outcomes")
    kill_quietly(first.pid, signal.SIGKILL)
    first.finish()
    journaled = _journaled(journal)
    assert journaled is not None and len(journaled) >= 5
    changed = lines.replace(b"fib 1\n", b"fib 2\n", 1)  # job 2 differs from the journal
    second = PoolRun(["--workers", "2", "--journal", str(journal), "--results", str(results),
                      "--resume"], stdin=changed)
    code = second.finish()
    log = second.log_text()
    if 2 in journaled:
        assert code == 2 and "taskpool: <stdin>:2: job 2 differs from the journal's" in log
    else:
        assert code == 0
    records = read_results(results)
    ids = [r["job"] for r in records]
    assert len(ids) == len(set(ids))
    assert_done_right([r for r in records if r["status"] == "done"])
    assert set(range(1, 41)) - {2} <= set(ids)


def _journaled(journal: Path, at_least: int = 0) -> set[int] | None:
    """The jobs the journal holds an outcome for, if at least `at_least` (else None)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
            jobs = {row[0] for row in db.execute("SELECT job FROM jobs")}
    except sqlite3.OperationalError:  # not created yet, or its table not yet
        return None
    return jobs if len(jobs) >= at_least else None


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskpool", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _journaled_run(tmp_path: Path) -> tuple[Path, Path]:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("fib 10\nsleep 0\nfib 12\n")
    journal = tmp_path / "run.db"
    assert _run("run", "--workers", "1", "--jobs", str(jobs), "--journal",
                str(journal)).returncode == 0
    return jobs, journal


@pytest.mark.parametrize("damage, message", [
    ("not sqlite", "not a usable taskpool journal (file is not a database)"),
    ("truncated", "not a usable taskpool journal"),
    ("foreign sqlite", "not a usable taskpool journal (an SQLite file, but not a taskpool "
                       "journal)"),
])
def test_a_damaged_or_foreign_journal_is_refused(tmp_path: Path, damage: str,
                                                 message: str) -> None:
    jobs, journal = _journaled_run(tmp_path)
    _run("results", str(journal))  # a clean close folds the WAL into the file
    if damage == "not sqlite":
        journal.write_bytes(b"hello, I am a text file\n" * 200)
    elif damage == "truncated":
        journal.write_bytes(journal.read_bytes()[:2000])
    else:
        journal.unlink()
        sqlite3.connect(journal).execute("CREATE TABLE t (x)").connection.commit()
    for args in (["run", "--jobs", str(jobs), "--journal", str(journal), "--resume"],
                 ["results", str(journal)]):
        proc = _run(*args)
        assert proc.returncode == 2, proc
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_journal_of_another_job_file_is_refused_naming_the_first_difference(
    tmp_path: Path,
) -> None:
    jobs, journal = _journaled_run(tmp_path)
    jobs.write_text("fib 10\n# a comment moves nothing\nsleep 0\nfib 13\n")
    proc = _run("run", "--jobs", str(jobs), "--journal", str(journal), "--resume")
    assert proc.returncode == 2
    assert (f"taskpool: {jobs}:4: job 3 is 'fib 13' here but 'fib 12' in the journal (line 3)"
            in proc.stderr)
    events = tmp_path / "events.jsonl"
    forced = _run("run", "--jobs", str(jobs), "--journal", str(journal), "--resume",
                  "--force-resume", "--events", str(events))
    assert forced.returncode == 0, forced.stderr
    assert ev.JOB_SENT not in {e["event"] for e in read_events(events)}, \
        "every job had an outcome: nothing runs again"


def test_a_journal_is_neither_overwritten_nor_resumed_by_mistake(tmp_path: Path) -> None:
    jobs, journal = _journaled_run(tmp_path)
    again = _run("run", "--jobs", str(jobs), "--journal", str(journal))
    assert again.returncode == 2
    assert "already holds a run with 3 recorded jobs: add --resume" in again.stderr
    missing = _run("run", "--jobs", str(jobs), "--journal", str(tmp_path / "none.db"),
                   "--resume")
    assert missing.returncode == 2 and "no journal to resume" in missing.stderr


def test_the_results_command_shows_done_failed_and_not_done(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("fib 10\ncrash\nsleep 60\n")
    journal = tmp_path / "run.db"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--journal", str(journal),
                   "--max-attempts", "1", "--grace", "0.1", "--verbose"],
                  events=tmp_path / "events.jsonl")
    run.wait_for_event(ev.JOB_FAILED, job=2, attempts=1)
    run.wait_for_event(ev.JOB_DONE, job=1)
    run.wait_for_event(ev.JOB_STARTED, job=3)
    kill_quietly(run.pid, signal.SIGINT)
    assert run.finish() == 130
    table = _run("results", str(journal)).stdout.splitlines()
    assert table[-1] == "3 jobs: 1 done, 1 failed, 1 not done"
    assert re.match(r"^\s+1  fib 10\s+done\s+55  1$", table[1])
    rows = {json.loads(x)["job"]: json.loads(x)
            for x in _run("results", str(journal), "--format", "jsonl").stdout.splitlines()}
    assert [rows[j]["status"] for j in (1, 2, 3)] == ["done", "failed", "not_done"]
    assert rows[2]["reason"] == "killed by signal 11 (SIGSEGV) on 1 attempts"
    csv_lines = _run("results", str(journal), "--format", "csv").stdout.splitlines()
    assert csv_lines[0] == "job,kind,arg,type,priority,status,result,worker,attempts,reason"
    assert len(csv_lines) == 4
