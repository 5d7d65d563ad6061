"""--halt, in GNU parallel's form: once N jobs (or P% of them) have failed, `soon` takes no
new job and lets the running ones finish, `now` also stops them; every job left is
not_done and the run exits 1. A failed job here is a `crash` job out of --max-attempts."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from taskpool.observe import events as ev

from harness import PoolRun, leftovers_of, results_by_job, write_job_file

LONG = "sleep 300"  # a job that only a halt that stops running jobs ends in time


def statuses(results: Path) -> dict[int, str]:
    return {job: r["status"] for job, r in results_by_job(results).items()}


def after(events: list[dict], name: str, mark: dict) -> list[dict]:  # type: ignore[type-arg]
    return [e for e in events if e["event"] == name and e["t"] > mark["t"]]


@pytest.mark.parametrize("command", ["run", "dispatch"])
def test_halt_now_on_the_first_failure_stops_the_running_jobs(
    tmp_path: Path, command: str,
) -> None:
    jobs = write_job_file(tmp_path, [f"{LONG} type=1", "crash type=2", f"{LONG} type=1",
                                     f"{LONG} type=2", f"{LONG} type=2"])
    results = tmp_path / "r.jsonl"
    pools = ["1", "1"] if command == "dispatch" else ["--pools", "1,1"]
    run = PoolRun([*pools, "--jobs", str(jobs), "--max-attempts", "1", "--halt", "now,fail=1",
                   "--results", str(results)], command_name=command,
                  events=tmp_path / "e.jsonl")
    assert run.finish() == 1  # well before the long jobs could end
    halted = run.one_event(ev.HALTED)
    assert (halted["when"], halted["failed"]) == ("now", 1)
    assert statuses(results) == {1: "not_done", 2: "failed", 3: "not_done", 4: "not_done",
                                 5: "not_done"}
    assert not after(run.all_events(), ev.JOB_SENT, halted)
    assert leftovers_of(run) == []


def test_halt_soon_lets_the_running_jobs_finish_and_starts_none(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 2", "crash", "crash", *["sleep 0.5"] * 12])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--max-attempts", "1",
                   "--halt", "soon,fail=2", "--results", str(results)],
                  events=tmp_path / "e.jsonl")
    assert run.finish() == 1
    halted = run.one_event(ev.HALTED)
    assert (halted["when"], halted["failed"]) == ("soon", 2)
    events = run.all_events()
    assert not after(events, ev.JOB_SENT, halted)
    assert not after(events, ev.WORKER_KILLED, halted)
    recorded = statuses(results)
    assert recorded[1] == "done"  # sleep 2: running when the crashes halted the run
    assert [recorded[2], recorded[3]] == ["failed", "failed"]
    assert halted["not_started"] > 0 and "not_done" in recorded.values()
    assert len(recorded) == 15


def test_a_ctrl_c_during_a_soon_halt_gives_the_running_jobs_the_grace_period(
    tmp_path: Path,
) -> None:
    jobs = write_job_file(tmp_path, [LONG, "crash", LONG])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--max-attempts", "1",
                   "--halt", "soon,fail=1", "--grace", "0.5", "--results", str(results)],
                  events=tmp_path / "e.jsonl")
    run.wait_for_event(ev.HALTED)
    os.killpg(run.pid, signal.SIGINT)  # the long job would run 300 s: the grace ends it
    assert run.finish() == 128 + signal.SIGINT
    assert run.one_event(ev.STOPPING)["grace"] == 0.5
    assert statuses(results) == {1: "not_done", 2: "failed", 3: "not_done"}


def test_halt_at_a_percentage_counts_the_jobs_of_the_run(tmp_path: Path) -> None:
    # 50% of 4 jobs: the first crash does not halt, the second does.
    jobs = write_job_file(tmp_path, ["crash", "crash", LONG, LONG])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--max-attempts", "1",
                   "--halt", "now,fail=50%", "--results", str(results)],
                  events=tmp_path / "e.jsonl")
    assert run.finish() == 1
    halted = run.one_event(ev.HALTED)
    assert (halted["failed"], halted["jobs"]) == (2, 4)
    assert statuses(results) == {1: "failed", 2: "failed", 3: "not_done", 4: "not_done"}


def test_without_halt_every_job_runs_after_failures(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["crash", "fib 5", "crash", "fib 6"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--max-attempts", "1",
                   "--results", str(results)], events=tmp_path / "e.jsonl")
    assert run.finish() == 1
    assert not run.events_named(ev.HALTED)
    assert statuses(results) == {1: "failed", 2: "done", 3: "failed", 4: "done"}


def test_halt_on_standard_input_stops_reading(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--max-attempts", "1", "--halt", "now,fail=1",
                   "--results", str(results)], pipe_stdin=True, events=tmp_path / "e.jsonl")
    run.send_line("crash")
    run.wait_for_event(ev.HALTED)
    assert run.finish() == 1  # stdin still open: the halt ended the run
    assert statuses(results) == {1: "failed"}


@pytest.mark.parametrize("value", ["sometimes", "now", "soon,fail=0", "now,fail=0%",
                                   "now,fail=101%", "now,success=1", "now,fail=x"])
def test_a_halt_that_is_not_gnu_parallels_form_is_a_usage_error(value: str) -> None:
    run = PoolRun(["--workers", "1", "--halt", value], stdin=b"fib 3\n")
    assert run.finish() == 2
    assert "--halt" in run.log_text()


@pytest.mark.parametrize("when", ["now", "soon"])
def test_halt_on_the_dask_engine(tmp_path: Path, when: str) -> None:
    pytest.importorskip("distributed")
    # soon: job 1 runs on when the crash halts the run, and is done; now: it is stopped.
    jobs = write_job_file(tmp_path, ["sleep 3" if when == "soon" else LONG, "crash", LONG,
                                     LONG])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--engine", "dask", "--workers", "2", "--jobs", str(jobs),
                   "--max-attempts", "1", "--halt", f"{when},fail=1",
                   "--results", str(results)], events=tmp_path / "e.jsonl")
    assert run.finish() == 1
    halted = run.one_event(ev.HALTED)
    assert (halted["when"], halted["failed"]) == (when, 1)
    first = "done" if when == "soon" else "not_done"
    assert statuses(results) == {1: first, 2: "failed", 3: "not_done", 4: "not_done"}


def test_resume_runs_the_jobs_a_halt_left_not_done(tmp_path: Path) -> None:
    # Both others take a second: a replacement worker could otherwise finish one (done, rightly)
    # between the crash and the halt's kill.
    jobs = write_job_file(tmp_path, ["crash", "sleep 1", "sleep 1"])
    journal, results = tmp_path / "run.db", tmp_path / "r.jsonl"
    base = ["--workers", "1", "--jobs", str(jobs), "--max-attempts", "1",
            "--journal", str(journal), "--results", str(results)]
    halted = PoolRun([*base, "--halt", "now,fail=1"], events=tmp_path / "e1.jsonl")
    assert halted.finish() == 1
    assert statuses(results) == {1: "failed", 2: "not_done", 3: "not_done"}
    resumed = PoolRun([*base, "--resume"], events=tmp_path / "e2.jsonl")
    assert resumed.finish() == 1  # the crash job stays failed
    assert sorted(e["job"] for e in resumed.events_named(ev.JOB_SENT)) == [2, 3]
    assert statuses(results) == {1: "failed", 2: "done", 3: "done"}
