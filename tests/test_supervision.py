"""The supervision policy: poison jobs, restart intensity, timeouts, hung workers, worker
recycling and the memory cap, and graceful shutdown. (The policy line: test_log_format.py.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from taskpool.observe import events as ev

from harness import (
    PoolRun,
    assert_done_right,
    assert_exactly_once,
    read_results,
    write_job_file,
)


def _by_job(results: Path) -> dict[int, dict]:  # type: ignore[type-arg]
    return {r["job"]: r for r in read_results(results)}


def test_a_poison_job_fails_after_max_attempts_and_the_others_go_on(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 10", "crash", "fib 12", "sleep 0", "fib 14"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results)],
                  events=tmp_path / "events.jsonl")
    assert run.finish() == 1
    by_job = _by_job(results)
    assert_exactly_once(list(by_job.values()), range(1, 6))
    assert_done_right([r for j, r in by_job.items() if j != 2])
    poison = by_job[2]
    assert poison["status"] == "failed" and poison["result"] is None
    assert poison["attempts"] == 3
    assert poison["reason"] == "killed by signal 11 (SIGSEGV) on 3 attempts"
    failed = run.one_event(ev.JOB_FAILED)
    assert (failed["job"], failed["attempts"], failed["reason"]) == (
        2, 3, "killed by signal 11 (SIGSEGV)")
    assert len(run.events_named(ev.JOB_RESENT, job=2)) == 2
    summary = run.one_event(ev.SUMMARY)
    assert (summary["jobs"], summary["done"], summary["failed"], summary["not_done"]) == \
        (5, 4, 1, 0)


def test_workers_that_die_at_start_up_stop_the_pool_instead_of_forking_forever(
    tmp_path: Path,
) -> None:
    jobs = write_job_file(tmp_path, ["fib 5"] * 20)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--inject-fault", "at_start"], events=tmp_path / "events.jsonl")
    assert run.finish() == 1
    assert run.one_event(ev.GAVE_UP)["reason"] == (
        "11 workers died without taking a job within 5 s (max_restarts=10); the last killed "
        "by signal 9 (SIGKILL)"), run.log_text()
    assert len(run.worker_pids()) < 20, "bounded: no endless forking"
    records = read_results(results)
    assert_exactly_once(records, range(1, 21))
    assert all(r["status"] == "not_done" for r in records)
    assert all(r["reason"].startswith("11 workers died without taking a job") for r in records)


def test_a_job_past_its_timeout_has_its_worker_killed_and_counts_an_attempt(
    tmp_path: Path,
) -> None:
    jobs = write_job_file(tmp_path, ["sleep 60 timeout=0.3", "fib 10", "sleep 0.05"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--max-attempts", "2"], events=tmp_path / "events.jsonl")
    assert run.finish() == 1
    by_job = _by_job(results)
    assert_done_right([by_job[2], by_job[3]])
    assert by_job[1]["status"] == "failed" and by_job[1]["attempts"] == 2
    assert by_job[1]["reason"] == "ran job 1 past its timeout of 0.3 s on 2 attempts"
    assert len(run.events_named(ev.WORKER_KILLED,
                                reason="ran job 1 past its timeout of 0.3 s")) == 2


def test_the_global_timeout_applies_to_jobs_without_their_own(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 60", "sleep 0.05 timeout=30"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--timeout", "0.2", "--max-attempts", "1"])
    assert run.finish() == 1
    by_job = _by_job(results)
    assert by_job[1]["reason"] == "ran job 1 past its timeout of 0.2 s on 1 attempts"
    assert by_job[2]["status"] == "done"


def test_a_worker_stopped_mid_job_is_killed_replaced_and_its_job_resent(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 0.5", "fib 12"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--verbose"], events=tmp_path / "events.jsonl")
    [started] = run.wait_for_event(ev.JOB_STARTED, job=1)
    worker = started["worker"]
    os.kill(worker, signal.SIGSTOP)
    assert run.finish() == 0
    by_job = _by_job(results)
    assert_done_right(list(by_job.values()))
    assert by_job[1]["attempts"] == 2 and by_job[1]["worker"] != worker
    assert run.events_named(ev.WORKER_KILLED, worker=worker,
                            reason="was stopped by signal 19 (SIGSTOP)")


@pytest.mark.parametrize("workers, events", [("2", False), ("1", False), ("2", True)],
                         ids=["sent_to_an_idle_worker", "queued_behind_another_job",
                              "acked_with_events"])
def test_a_worker_that_stops_beating_mid_job_is_killed_and_its_job_resent(
    tmp_path: Path, workers: str, events: bool,
) -> None:
    """At INFO, without --events, workers send no Acks (protocol.is_acked), so the heartbeat
    clock of job 2 starts as it is sent to an idle worker (2 workers) or, queued behind job
    1 on the one worker, with job 1's Result. With --events every job is Acked, and its Ack
    starts the clock."""
    jobs = write_job_file(tmp_path, ["fib 10", "sleep 0.3"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", workers, "--jobs", str(jobs), "--results", str(results),
                   "--heartbeat", "0.5", "--inject-fault", "2:hang"],
                  events=tmp_path / "events.jsonl" if events else None)
    assert run.finish() == 0
    by_job = _by_job(results)
    assert_done_right(list(by_job.values()))
    # No other deadline (no timeout) can end the hang: without the heartbeat's kill the run
    # would never finish, and job 2 would have no second attempt.
    assert by_job[1]["attempts"] == 1 and by_job[2]["attempts"] == 2
    if events:
        [killed] = run.events_named(ev.WORKER_KILLED)
        assert killed["reason"] == "sent no heartbeat for 0.5 s"
        assert killed["worker"] != by_job[2]["worker"]


@pytest.mark.parametrize("events", [False, True], ids=["unacked", "acked_with_events"])
def test_a_long_job_that_beats_is_not_mistaken_for_a_hung_one(
    tmp_path: Path, events: bool,
) -> None:
    """Without --events no job is Acked (the heartbeat clock starts as a job is sent); with
    them every job is (it starts with the Ack)."""
    jobs = write_job_file(tmp_path, ["sleep 1.2", "fib 27"])  # each longer than the heartbeat
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--heartbeat", "0.4"], events=tmp_path / "events.jsonl" if events else None)
    assert run.finish() == 0
    assert all(r["attempts"] == 1 for r in read_results(results)), "no job's worker killed"
    if events:  # nor any worker once idle
        assert not run.events_named(ev.WORKER_KILLED)
        assert not [e for e in run.events_named(ev.WORKER_EXITED) if e["crash"]]


def test_workers_retire_after_max_tasks_per_child(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 8"] * 10)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--max-tasks-per-child", "2"], events=tmp_path / "events.jsonl")
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 11))
    assert_done_right(records)
    assert all(r["attempts"] == 1 for r in records), "a retirement is not a failed attempt"
    per_worker: dict[int, int] = {}
    for r in records:
        per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + 1
    assert max(per_worker.values()) <= 2 and len(per_worker) >= 5
    assert run.events_named(ev.WORKER_EXITED, reason="retired", crash=False)
    assert run.one_event(ev.SUMMARY)["crashes"] == 0


def test_a_job_over_the_memory_cap_fails_like_a_crash(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["alloc 4", "alloc 600", "fib 10"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--max-memory", "300", "--max-attempts", "2"],
                  events=tmp_path / "events.jsonl")
    assert run.finish() == 1
    by_job = _by_job(results)
    assert by_job[1]["status"] == "done" and by_job[1]["result"] == 4
    assert by_job[2]["status"] == "failed"
    assert by_job[2]["reason"] == "memory limit (300 MB) on 2 attempts"
    assert by_job[3]["status"] == "done"
    # Each death says why at once, as the failure will: not its bare exit status.
    deaths = run.events_named(ev.WORKER_EXITED, crash=True)
    assert [e["reason"] for e in deaths] == ["memory limit (300 MB)"] * 2


def test_sigterm_lets_running_jobs_finish_and_reports_the_rest(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 0.4"] * 20)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--verbose"], events=tmp_path / "events.jsonl")
    run.wait_for_event(ev.JOB_DONE, count=2)
    os.kill(run.pid, signal.SIGTERM)
    assert run.finish() == 143
    started = {e["job"] for e in run.events_named(ev.JOB_STARTED)}
    by_job = _by_job(results)
    assert_exactly_once(list(by_job.values()), range(1, 21))
    done = {j for j, r in by_job.items() if r["status"] == "done"}
    assert started == done, "every started job finished; none not started ran"
    assert_done_right([by_job[j] for j in done])
    stopping = run.one_event(ev.STOPPING)
    assert (stopping["running"], stopping["grace"]) == (2, 10)
    assert isinstance(stopping["not_started"], int)
    assert not run.events_named(ev.WORKER_KILLED), "no worker was killed"
    assert not [e for e in run.events_named(ev.WORKER_EXITED) if e["crash"]], \
        "a stopped worker is not a crash"


def test_jobs_still_running_when_the_grace_period_ends_are_killed(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 60", "sleep 60", "sleep 60"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--grace", "0.3", "--verbose"], events=tmp_path / "events.jsonl")
    run.wait_for_event(ev.JOB_STARTED, count=2)
    os.kill(run.pid, signal.SIGINT)
    assert run.finish(timeout=30) == 130
    assert all(r["status"] == "not_done" for r in read_results(results))
    assert len(run.events_named(
        ev.WORKER_KILLED, reason="was still running when the 0.3 s grace period ended")) == 2


def test_a_second_signal_skips_the_grace_period(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 60"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--results", str(results),
                   "--grace", "1000", "--verbose"], events=tmp_path / "events.jsonl")
    run.wait_for_event(ev.JOB_STARTED, job=1)
    os.killpg(run.pid, signal.SIGINT)
    run.wait_for_event(ev.STOPPING, running=1, grace=1000)
    os.killpg(run.pid, signal.SIGINT)
    assert run.finish(timeout=30) == 130, "only the second signal can end this run in time"
    assert run.events_named(ev.STOPPING, running=1, grace=0), "stopped now: no grace"
    assert [r["status"] for r in read_results(results)] == ["not_done"]


def test_the_memory_cap_is_on_top_of_what_a_worker_maps_and_replacements_start(
    tmp_path: Path,
) -> None:
    # Replacements (one per job here) inherit more address space than the first workers:
    # a cap counted from zero used to hang their start-up.
    jobs = write_job_file(tmp_path, ["alloc 30"] * 6)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--max-memory", "100", "--max-tasks-per-child", "1"])
    assert run.finish(timeout=60) == 0, run.log_text()
    records = read_results(results)
    assert_exactly_once(records, range(1, 7))
    assert all(r["status"] == "done" and r["result"] == 30 for r in records)


def test_a_job_that_fails_during_the_grace_period_is_recorded_failed(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 30 timeout=0.5", "sleep 30"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--max-attempts", "1", "--grace", "2", "--verbose"],
                  events=tmp_path / "events.jsonl")
    run.wait_for_event(ev.JOB_STARTED, count=2)
    os.kill(run.pid, signal.SIGTERM)
    assert run.finish(timeout=30) == 143
    by_job = _by_job(results)
    assert by_job[1]["status"] == "failed"
    assert by_job[1]["reason"] == "ran job 1 past its timeout of 0.5 s on 1 attempts"
    assert by_job[2]["status"] == "not_done", "the grace period ran out: not the job's fault"
    assert by_job[2]["reason"] == "interrupted by SIGTERM"
