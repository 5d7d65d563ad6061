"""The everyday commands as a new user meets them: --version, results on standard output,
each command's own usage, a plain message for each mistake, and `results --status`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import taskpool
from taskpool.core.journal import Journal
from taskpool.model.jobs import Job, JobKind
from taskpool.model.outcome import JobRecord, Status

from harness import ROOT, assert_exactly_once, write_job_file


def _taskpool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskpool", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_version_prints_the_packages_version() -> None:
    proc = _taskpool("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"taskpool {taskpool.__version__}\n"


def test_results_dash_writes_each_result_to_standard_output_and_nothing_else(
        tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, [f"fib {n}" for n in range(12)])
    proc = _taskpool("run", "--workers", "2", "--jobs", str(jobs), "--results", "-")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is one
    assert_exactly_once(records, range(1, 13))
    assert not (tmp_path / "-").exists() and not (ROOT / "-").exists()


@pytest.mark.parametrize("command", [["run"], ["dispatch", "1"], ["results", "run.db"],
                                     ["report", "run.jsonl"]])
def test_an_unknown_option_shows_the_usage_of_its_command(command: list[str]) -> None:
    proc = _taskpool(*command, "--bogus")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: taskpool {command[0]} ")
    assert proc.stderr.endswith(
        f"taskpool {command[0]}: error: unrecognized arguments: --bogus\n")


def test_results_of_a_missing_journal_says_there_is_no_such_file(tmp_path: Path) -> None:
    missing = tmp_path / "run.db"
    proc = _taskpool("results", str(missing))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"taskpool: {missing}: no such file")
    assert "resume" not in proc.stderr  # nothing was asked of --resume


def test_force_resume_without_resume_says_it_goes_with_resume(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 1"])
    proc = _taskpool("run", "--jobs", str(jobs), "--journal", str(tmp_path / "run.db"),
                     "--force-resume")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: taskpool run ")
    assert "error: --force-resume goes with --resume" in proc.stderr
    assert not (tmp_path / "run.db").exists()  # nothing ran


def test_a_journal_in_a_missing_directory_names_the_directory(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 1"])
    journal = tmp_path / "nowhere" / "run.db"
    proc = _taskpool("run", "--jobs", str(jobs), "--journal", str(journal))
    assert proc.returncode == 2
    assert proc.stderr == (f"taskpool: {journal}: cannot create the journal: there is no "
                           f"directory {journal.parent} (create it first, or give a path in "
                           "an existing one)\n")


def test_an_unknown_fault_step_lists_the_steps(tmp_path: Path) -> None:
    proc = _taskpool("run", "--jobs", str(write_job_file(tmp_path, ["fib 1"])),
                     "--inject-fault", "3:boom")
    assert proc.returncode == 2
    assert ("argument --inject-fault: 'boom' is not a step: give one of before_ack, "
            "during_compute, before_result, after_result, hang (or 'at_start' alone)"
            in proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.fixture
def journal_of_three(tmp_path: Path) -> Path:
    """A journal of three jobs: 1 done, 2 failed, 3 without an outcome (not done)."""
    path = tmp_path / "run.db"
    journal = Journal.open(str(path), resume=False)
    jobs = [Job(1, JobKind.FIB, 10), Job(2, JobKind.CRASH, 0), Job(3, JobKind.SLEEP, 1)]
    for job in jobs:
        journal.add_job(job)
    journal.add_outcome(JobRecord.of(jobs[0], Status.DONE, result=55, worker=7, attempts=1))
    journal.add_outcome(JobRecord.of(jobs[1], Status.FAILED, worker=8, attempts=3,
                                     reason="killed by signal 11 (SIGSEGV) on 3 attempts"))
    journal.commit()
    journal.close()
    return path


@pytest.mark.parametrize(("statuses", "jobs"), [
    (["done"], [1]), (["failed"], [2]), (["not_done"], [3]),
    (["failed", "not_done"], [2, 3]), ([], [1, 2, 3]),
])
def test_results_status_shows_only_the_jobs_of_that_status(
        journal_of_three: Path, statuses: list[str], jobs: list[int]) -> None:
    flags = [arg for status in statuses for arg in ("--status", status)]
    proc = _taskpool("results", str(journal_of_three), "--format", "jsonl", *flags)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [row["job"] for row in rows] == jobs
    assert all(row["status"] in statuses for row in rows) or not statuses


def test_results_status_table_counts_the_shown_jobs_of_all(journal_of_three: Path) -> None:
    proc = _taskpool("results", str(journal_of_three), "--status", "failed")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == ("1 job (of 3 in the journal): 0 done, 1 failed, "
                                            "0 not done")


def test_results_status_rejects_an_unknown_status(journal_of_three: Path) -> None:
    proc = _taskpool("results", str(journal_of_three), "--status", "lost")
    assert proc.returncode == 2
    assert "argument --status: invalid choice: 'lost'" in proc.stderr


def test_results_dash_refuses_a_log_that_is_standard_output_too(tmp_path: Path) -> None:
    """The log written into the same file as the results would mix its lines into them."""
    jobs = write_job_file(tmp_path, ["fib 1"])
    out = tmp_path / "out.jsonl"
    with out.open("w") as stdout:
        proc = subprocess.run([sys.executable, "-m", "taskpool", "run", "--jobs", str(jobs),
                               "--results", "-", "--log", str(out)], cwd=ROOT, stdout=stdout,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.endswith(f"taskpool run: error: --log {out} is standard output, where "
                                "--results - writes the results: give --log a file of its "
                                "own\n")
    assert out.read_text() == ""


def test_the_results_table_keeps_its_columns_for_commands_long_and_short() -> None:
    import io

    from taskpool.cli.commands import SPEC_WIDTH_MAX, _write_table

    rows = [{"job": 1, "kind": "sh", "arg": "gzip -9 -f data/part-001.csv", "status": "done",
             "result": None, "attempts": 1},
            {"job": 2, "kind": "sh", "arg": "x" * 100, "status": "failed", "result": None,
             "attempts": 2}]
    out = io.StringIO()
    _write_table(out, rows, 2)
    header, first, second = out.getvalue().splitlines()[:3]
    status_at = header.index("status")
    assert first[status_at:].startswith("done") and second[status_at:].startswith("failed")
    # The spec column starts after "   job  " (8 characters) and is at most SPEC_WIDTH_MAX wide.
    assert status_at - 8 == SPEC_WIDTH_MAX + 1 and "x..." in second
