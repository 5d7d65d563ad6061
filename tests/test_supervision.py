"""The supervision policy: poison jobs, restart intensity, timeouts, hung workers, worker
recycling and the memory cap, the policy line, and graceful shutdown."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from harness import (
    PoolRun,
    assert_done_right,
    assert_exactly_once,
    read_results,
    write_job_file,
)


def _by_job(results: Path) -> dict[int, dict]:  # type: ignore[type-arg]
    return {r["job"]: r for r in read_results(results)}


def test_the_policy_is_printed_at_start() -> None:
    run = PoolRun(["--workers", "2", "--max-attempts", "5", "--timeout", "30"], stdin=b"fib 3\n")
    assert run.finish() == 0
    assert ("[Supervisor] one_for_one, max_attempts=5, max_restarts=10 in 5s, timeout=30s, "
            "heartbeat=10s, grace=10s, max_tasks_per_child=none, max_memory=none"
            ) in run.log_text().splitlines()[:4]


def test_a_poison_job_fails_after_max_attempts_and_the_others_go_on(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 10", "crash", "fib 12", "sleep 0", "fib 14"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results)])
    assert run.finish() == 1
    by_job = _by_job(results)
    assert_exactly_once(list(by_job.values()), range(1, 6))
    assert_done_right([r for j, r in by_job.items() if j != 2])
    poison = by_job[2]
    assert poison["status"] == "failed" and poison["result"] is None
    assert poison["attempts"] == 3
    assert poison["reason"] == "killed by signal 11 (SIGSEGV) on 3 attempts"
    log = run.log_text()
    assert ("[Supervisor] Job 2 failed after 3 attempts: killed by signal 11 (SIGSEGV)"
            in log)
    assert log.count("Resent job 2 after crash") == 2
    assert log.splitlines()[-1].startswith("[Main] Summary: 5 jobs, 4 done, 1 failed, 0 not done")


def test_workers_that_die_at_start_up_stop_the_pool_instead_of_forking_forever(
    tmp_path: Path,
) -> None:
    jobs = write_job_file(tmp_path, ["fib 5"] * 20)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--inject-fault", "at_start"])
    assert run.finish() == 1
    log = run.log_text()
    assert re.search(r"^\[Supervisor\] Giving up: 11 workers died without taking a job within "
                     r"5 s \(max_restarts=10\); the last killed by signal 9 \(SIGKILL\)$",
                     log, re.M), log
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
                   "--max-attempts", "2"])
    assert run.finish() == 1
    by_job = _by_job(results)
    assert_done_right([by_job[2], by_job[3]])
    assert by_job[1]["status"] == "failed" and by_job[1]["attempts"] == 2
    assert by_job[1]["reason"] == "ran job 1 past its timeout of 0.3 s on 2 attempts"
    assert run.log_text().count("ran job 1 past its timeout of 0.3 s: killed it") == 2


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
                   "--verbose"])
    started = run.wait_for(r"^\[Dealer\] Job 1 started by worker PID \[(\d+)\]")[0]
    worker = int(started.group(1))
    os.kill(worker, signal.SIGSTOP)
    assert run.finish() == 0
    by_job = _by_job(results)
    assert_done_right(list(by_job.values()))
    assert by_job[1]["attempts"] == 2 and by_job[1]["worker"] != worker
    assert (f"[Supervisor] Worker PID {worker} was stopped by signal 19 (SIGSTOP): killed it"
            in run.log_text())


@pytest.mark.parametrize("workers", ["2", "1"], ids=["sent_to_an_idle_worker",
                                                    "queued_behind_another_job"])
def test_a_worker_that_stops_beating_mid_job_is_killed_and_its_job_resent(
    tmp_path: Path, workers: str,
) -> None:
    """At INFO, without --events, workers send no Acks (protocol.is_acked), so the heartbeat
    clock of job 2 starts as it is sent to an idle worker (2 workers) or, queued behind job
    1 on the one worker, with job 1's Result."""
    jobs = write_job_file(tmp_path, ["fib 10", "sleep 0.3"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", workers, "--jobs", str(jobs), "--results", str(results),
                   "--heartbeat", "0.5", "--inject-fault", "2:hang"])
    assert run.finish() == 0
    by_job = _by_job(results)
    assert_done_right(list(by_job.values()))
    assert by_job[1]["attempts"] == 1 and by_job[2]["attempts"] == 2
    assert re.search(r"^\[Supervisor\] Worker PID \d+ sent no heartbeat for 0.5 s: killed it$",
                     run.log_text(), re.M)


def test_a_long_job_that_beats_is_not_mistaken_for_a_hung_one(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 1.2", "fib 27"])  # each longer than the heartbeat
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--heartbeat", "0.4"])
    assert run.finish() == 0
    assert all(r["attempts"] == 1 for r in read_results(results))
    assert "sent no heartbeat" not in run.log_text()


def test_workers_retire_after_max_tasks_per_child(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 8"] * 10)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--max-tasks-per-child", "2"])
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 11))
    assert_done_right(records)
    assert all(r["attempts"] == 1 for r in records), "a retirement is not a failed attempt"
    per_worker: dict[int, int] = {}
    for r in records:
        per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + 1
    assert max(per_worker.values()) <= 2 and len(per_worker) >= 5
    assert re.search(r"^\[Supervisor\] Worker PID \d+ retired after 2 jobs$", run.log_text(),
                     re.M)
    assert "0 crashes" in run.log_text().splitlines()[-1]


def test_a_job_over_the_memory_cap_fails_like_a_crash(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["alloc 4", "alloc 600", "fib 10"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--max-memory", "300", "--max-attempts", "2"])
    assert run.finish() == 1
    by_job = _by_job(results)
    assert by_job[1]["status"] == "done" and by_job[1]["result"] == 4
    assert by_job[2]["status"] == "failed"
    assert by_job[2]["reason"] == "memory limit (300 MB) on 2 attempts"
    assert by_job[3]["status"] == "done"


def test_sigterm_lets_running_jobs_finish_and_reports_the_rest(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 0.4"] * 20)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--verbose"])
    run.wait_for(r"Received result for job \d+:", count=2)
    os.kill(run.pid, signal.SIGTERM)
    assert run.finish() == 143
    log = run.log_text()
    started = {int(j) for j in re.findall(r"^\[Dealer\] Job (\d+) started by", log, re.M)}
    by_job = _by_job(results)
    assert_exactly_once(list(by_job.values()), range(1, 21))
    done = {j for j, r in by_job.items() if r["status"] == "done"}
    assert started == done, "every started job finished; none not started ran"
    assert_done_right([by_job[j] for j in done])
    assert re.search(r"^\[Dealer\] Stopping on signal 15: letting 2 running jobs finish "
                     r"\(grace 10 s\); \d+ jobs not started$", log, re.M)
    assert "[Supervisor] Worker PID" not in log


def test_jobs_still_running_when_the_grace_period_ends_are_killed(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 60", "sleep 60", "sleep 60"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--grace", "0.3", "--verbose"])
    run.wait_for(r"^\[Dealer\] Job \d+ started by", count=2)
    os.kill(run.pid, signal.SIGINT)
    assert run.finish(timeout=30) == 130
    assert all(r["status"] == "not_done" for r in read_results(results))
    assert run.log_text().count("was still running when the 0.3 s grace period ended") == 2


def test_a_second_signal_skips_the_grace_period(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 60"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--results", str(results),
                   "--grace", "1000", "--verbose"])
    run.wait_for(r"^\[Dealer\] Job 1 started by")
    os.killpg(run.pid, signal.SIGINT)
    run.wait_for(r"letting 1 running jobs finish")
    os.killpg(run.pid, signal.SIGINT)
    assert run.finish(timeout=30) == 130, "only the second signal can end this run in time"
    assert "[Dealer] Stopping now: killing 1 running jobs" in run.log_text()
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
                   "--max-attempts", "1", "--grace", "2", "--verbose"])
    run.wait_for(r"^\[Dealer\] Job \d+ started by", count=2)
    os.kill(run.pid, signal.SIGTERM)
    assert run.finish(timeout=30) == 143
    by_job = _by_job(results)
    assert by_job[1]["status"] == "failed"
    assert by_job[1]["reason"] == "ran job 1 past its timeout of 0.5 s on 1 attempts"
    assert by_job[2]["status"] == "not_done", "the grace period ran out: not the job's fault"
    assert by_job[2]["reason"] == "interrupted by SIGTERM"
