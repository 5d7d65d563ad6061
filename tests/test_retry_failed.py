"""--retry-failed [N]: a job that failed (a non-zero exit status, a raised exception; not a
crash) runs up to N more times; with --resume it also runs again the jobs the journal has
as failed, whatever failed them, and their new outcome replaces the old one."""

from __future__ import annotations

from pathlib import Path

from taskpool.observe import events as ev

from harness import PoolRun, results_by_job, write_job_file


def fails_once(marker: Path) -> str:
    """A command that exits 3 the first time it runs, and 0 from then on."""
    return f"sh test -e {marker} || {{ touch {marker}; exit 3; }}"


def runs_of(run: PoolRun, job: int) -> int:
    return len(run.events_named(ev.JOB_SENT, job=job))


def test_a_failed_command_runs_again_once_with_the_flag(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, [fails_once(tmp_path / "m1"), "sh exit 4"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--retry-failed",
                   "--results", str(results)], events=tmp_path / "e.jsonl")
    assert run.finish() == 1  # job 2 fails on both runs
    got = results_by_job(results)
    assert (got[1]["status"], got[1]["exit_status"]) == ("done", 0)
    assert (got[2]["status"], got[2]["exit_status"]) == ("failed", 4)
    assert (runs_of(run, 1), runs_of(run, 2)) == (2, 2)


def test_retry_failed_n_runs_a_failing_command_n_more_times(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sh exit 5"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--retry-failed", "3",
                   "--results", str(results)], events=tmp_path / "e.jsonl")
    assert run.finish() == 1
    assert runs_of(run, 1) == 4
    assert len(run.events_named(ev.JOB_RESENT, job=1)) == 3
    assert results_by_job(results)[1]["status"] == "failed"


def test_without_the_flag_a_failed_command_runs_once(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, [fails_once(tmp_path / "m1")])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--results", str(results)],
                  events=tmp_path / "e.jsonl")
    assert run.finish() == 1
    assert runs_of(run, 1) == 1
    assert results_by_job(results)[1]["status"] == "failed"


def test_a_crash_is_not_retried_as_a_failure(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["crash"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--max-attempts", "2",
                   "--retry-failed", "3", "--results", str(results)],
                  events=tmp_path / "e.jsonl")
    assert run.finish() == 1
    assert runs_of(run, 1) == 2  # --max-attempts bounds a crash; --retry-failed does not
    assert results_by_job(results)[1]["attempts"] == 2


def test_resume_with_retry_failed_runs_the_journals_failed_jobs_again(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 5", "crash", fails_once(tmp_path / "m1")])
    journal, results = tmp_path / "run.db", tmp_path / "r.jsonl"
    base = ["--workers", "2", "--jobs", str(jobs), "--max-attempts", "1",
            "--journal", str(journal), "--results", str(results)]

    def run(*extra: str, name: str) -> tuple[int, PoolRun, dict[int, dict]]:  # type: ignore[type-arg]
        pool_run = PoolRun([*base, *extra], events=tmp_path / f"{name}.jsonl")
        code = pool_run.finish()
        return code, pool_run, results_by_job(results)

    code, first, got = run(name="first")
    assert code == 1
    assert [got[j]["status"] for j in (1, 2, 3)] == ["done", "failed", "failed"]

    code, plain, got = run("--resume", name="plain")  # failed is an outcome: nothing runs
    assert code == 1 and not plain.events_named(ev.JOB_SENT)
    assert [got[j]["status"] for j in (1, 2, 3)] == ["done", "failed", "failed"]

    code, again, got = run("--resume", "--retry-failed", name="again")
    assert code == 1  # the crash job fails again
    assert sorted(e["job"] for e in again.events_named(ev.JOB_SENT)) == [2, 3]
    assert [got[j]["status"] for j in (1, 2, 3)] == ["done", "failed", "done"]

    # The journal now has job 3 done: only the crash job is run again.
    code, last, got = run("--resume", "--retry-failed", name="last")
    assert sorted(e["job"] for e in last.events_named(ev.JOB_SENT)) == [2]
    assert [got[j]["status"] for j in (1, 2, 3)] == ["done", "failed", "done"]


def test_resume_with_retry_failed_still_refuses_a_changed_line(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 5", "sh exit 3"])
    journal = tmp_path / "run.db"
    base = ["--workers", "1", "--jobs", str(jobs), "--journal", str(journal)]
    assert PoolRun(base).finish() == 1
    jobs.write_text("fib 5\nsh exit 0\n")
    run = PoolRun([*base, "--resume", "--retry-failed"])
    assert run.finish() == 2
