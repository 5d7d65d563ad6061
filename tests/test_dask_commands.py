"""Jobs of real work (sh, exec, call) on the Dask engine's own LocalCluster: the same
results, output and exit status as the local engine, the same supervision of a command
(its timeout, its death by a signal, its worker's death), --retry-failed and --output-dir.
Watched through the events and the results; a command's processes are found by their
process group in /proc, never by a log line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from test_command_jobs import (
    by_job,
    finish_mid_command,
    kill_its_worker,
    run_a_command_past_its_timeout,
    start_mid_command,
    wait_until_ended,
)

# Each test's runs have a TMPDIR of their own, empty at the end: no run directory, no Dask
# scratch space, no job output left behind.
from test_dask import temporary_directory  # noqa: F401 - an autouse fixture

from taskpool.observe import events as ev

from harness import PoolRun, group_members, write_job_file

pytest.importorskip("distributed")

DASK = ["--engine", "dask"]


def _substance(record: dict[str, Any]) -> dict[str, Any]:
    """A record but for what differs from run to run: its worker and duration."""
    assert isinstance(record["duration"], float) and record["duration"] >= 0, record
    return {k: v for k, v in record.items() if k not in ("worker", "duration")}


def test_sh_exec_and_call_jobs_give_the_local_engines_results_and_output(
        tmp_path: Path) -> None:
    lines = ["sh echo out-1; echo err-1 >&2", "exec printf '%s\\n' 'two words'",
             "sh echo out-3; exit 3", "call tests.call_targets:square 7",
             'call tests.call_targets:fail "bad size"', "call no_such_module_for_taskpool:f 1",
             "exec no-such-program-x"]
    jobs = write_job_file(tmp_path, lines)
    runs = {}
    for engine in ("local", "dask"):
        results, out = tmp_path / f"{engine}.jsonl", tmp_path / f"{engine}.out"
        run = PoolRun(["--engine", engine, "--workers", "2", "--jobs", str(jobs),
                       "--results", str(results)], events=tmp_path / f"{engine}.events",
                      stdout=out)
        assert run.finish() == 1, run.log_text()
        runs[engine] = (by_job(results), out.read_text().splitlines(), run)
    (local, local_out, _), (dask, dask_out, run) = runs["local"], runs["dask"]
    assert {j: _substance(r) for j, r in dask.items()} == \
        {j: _substance(r) for j, r in local.items()}
    assert (dask[3]["status"], dask[3]["reason"], dask[3]["exit_status"]) == \
        ("failed", "exit status 3", 3), "a non-zero exit is failed, not run again"
    assert (dask[4]["status"], dask[4]["result"]) == ("done", 49)
    assert dask[5]["reason"] == "ValueError: bad size"
    assert dask[6]["reason"].startswith("cannot import no_such_module_for_taskpool:f")
    assert (dask[7]["status"], dask[7]["reason"]) == ("failed", "exit status 127")
    # Each job's output once, on our standard output and error, as the local engine's.
    assert sorted(dask_out) == sorted(local_out) == \
        ["out-1", "out-3", "squaring 7", "two words"]
    log = run.log_text().splitlines()
    assert "err-1" in log and "to stderr 7" in log
    assert run.events_named(ev.JOB_RESENT) == []
    [failed] = run.events_named(ev.JOB_FAILED, job=3)
    assert failed["exit_status"] == 3


def test_timeout_ends_a_command_that_ignores_sigterm_and_its_worker_lives(
        tmp_path: Path) -> None:
    run, records, leader = run_a_command_past_its_timeout(tmp_path, DASK)
    # Ended: killed, the orphans among them reaped by whoever adopted them (no subreaper
    # here: a zombie may linger for a moment).
    assert wait_until_ended(group_members(leader)) == []
    # The worker ended the command itself (SIGTERM, then SIGKILL): main killed no worker.
    assert run.events_named(ev.WORKER_KILLED) == [] and run.events_named(ev.WORKER_EXITED) == []
    assert records[1]["worker"] == records[2]["worker"]


def test_command_killed_by_sigkill_counts_as_a_crash_and_is_resent(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sh echo dying; kill -9 $$", "exec true"])
    results, out = tmp_path / "r.jsonl", tmp_path / "out.txt"
    run = PoolRun([*DASK, "--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--max-attempts", "2"], events=tmp_path / "events.jsonl", stdout=out)
    assert run.finish() == 1
    records = by_job(results)
    assert records[1]["status"] == "failed"
    assert records[1]["attempts"] == 2
    assert records[1]["reason"] == "its command was killed by signal 9 (SIGKILL) on 2 attempts"
    [resent] = run.events_named(ev.JOB_RESENT, job=1)
    assert resent["reason"] == "its command was killed by signal 9 (SIGKILL)"
    assert records[2]["status"] == "done"
    assert "dying" not in out.read_text(), "a crashed attempt's output is never printed"


def test_retry_failed_runs_a_failed_command_again_and_prints_the_recorded_run_alone(
        tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    flaky = (f"if [ -e {marks}/ran ]; then echo second run; else touch {marks}/ran; "
             "echo first run; exit 5; fi")
    jobs = write_job_file(tmp_path, [f"sh {flaky}", "sh echo always; exit 2"])
    results, out = tmp_path / "r.jsonl", tmp_path / "out.txt"
    run = PoolRun([*DASK, "--workers", "1", "--jobs", str(jobs), "--results", str(results),
                   "--retry-failed", "1"], events=tmp_path / "events.jsonl", stdout=out)
    assert run.finish() == 1
    records = by_job(results)
    # Run again, it keeps its attempt number (as locally): a crash is bounded by
    # --max-attempts alone.
    assert (records[1]["status"], records[1]["attempts"], records[1]["exit_status"]) == \
        ("done", 1, 0)
    assert (records[2]["status"], records[2]["attempts"], records[2]["reason"]) == \
        ("failed", 1, "exit status 2"), "one more run, then failed"
    assert sorted(e["job"] for e in run.events_named(ev.JOB_RESENT)) == [1, 2]
    assert [len(run.events_named(ev.JOB_SENT, job=job)) for job in (1, 2)] == [2, 2]
    assert sorted(out.read_text().splitlines()) == ["always", "second run"]


def test_output_dir_keeps_each_jobs_output_and_results_name_the_files(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sh echo one; echo uno >&2", "exec echo two",
                                     "sh exit 4", "fib 10", "call tests.call_targets:square 3"])
    results, out, kept = tmp_path / "r.jsonl", tmp_path / "out.txt", tmp_path / "kept"
    run = PoolRun([*DASK, "--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--output-dir", str(kept)], stdout=out)
    assert run.finish() == 1
    records = by_job(results)
    for job in (1, 2, 3, 5):
        assert records[job]["stdout"] == str(kept / f"{job}.out")
        assert records[job]["stderr"] == str(kept / f"{job}.err")
    assert "stdout" not in records[4]
    assert (kept / "1.out").read_text() == "one\n"
    assert (kept / "1.err").read_text() == "uno\n"
    assert (kept / "2.out").read_text() == "two\n"
    assert (kept / "3.out").read_text() == "" and records[3]["exit_status"] == 4
    assert (kept / "5.out").read_text() == "squaring 3\n"
    assert sorted(os.listdir(kept)) == ["1.err", "1.out", "2.err", "2.out", "3.err", "3.out",
                                        "5.err", "5.out"], "the run's own directory is gone"
    assert out.read_text() == "", "kept, not printed"


def test_worker_killed_mid_command_takes_the_command_tree_and_the_job_is_resent(
        tmp_path: Path) -> None:
    case = start_mid_command(tmp_path, DASK)
    [started] = case.run.events_named(ev.JOB_STARTED, job=1)
    assert started["worker"] == case.worker, "the command is a child of its Dask worker"
    kill_its_worker(case)
    finish_mid_command(case)


def test_halt_now_ends_the_running_commands_with_the_run(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    os.mkfifo(marks / "up")  # job 2 fails once job 1 has written its leader's pid
    jobs = write_job_file(tmp_path, [
        f"sh echo $$ > {marks}/leader; echo up > {marks}/up; (sleep 300 & wait) & wait",
        f"sh read line < {marks}/up; exit 1", "sh echo never"])
    results = tmp_path / "r.jsonl"
    run = PoolRun([*DASK, "--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--halt", "now,fail=1"], events=tmp_path / "events.jsonl")
    assert run.finish() == 1
    records = by_job(results)
    assert records[2]["status"] == "failed"
    assert (records[1]["status"], records[3]["status"]) == ("not_done", "not_done")
    run.one_event(ev.HALTED)
    leader = int((marks / "leader").read_text())
    assert wait_until_ended(group_members(leader)) == [], "a command outlived its run"
