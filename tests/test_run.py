"""End-to-end runs: right values, the results file's contract, the log's tone."""

from __future__ import annotations

import re
from pathlib import Path

from harness import PoolRun, assert_done_right, assert_exactly_once, read_results


def test_the_demo_recovers_from_crashes_with_every_value_right(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--demo", "--results", str(results)])
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 13))
    assert_done_right(records)
    log = run.log_text()
    crashes = re.findall(r"^\[Supervisor\] Worker PID (\d+) killed by signal 11 \(SIGSEGV\)$",
                         log, re.M)
    assert len(crashes) >= 3, log
    for pid in crashes:
        assert f"[Worker {pid}] Simulated crash!" in log
    assert re.search(r"^\[Recovery\] Resent job \d+ after crash of \d+$", log, re.M)
    # Each crash forks a replacement, except one that comes when the pool is stopping.
    assert len(run.worker_pids()) >= 4 + len(crashes) - 1
    assert any(r["attempts"] > 1 for r in records)
    assert "[Dealer] Sent job 6 -> fib(35)" in log
    assert "[Dealer] All jobs completed. Shutting down workers..." in log
    lines = log.splitlines()
    assert lines[-5] == "[Main] All done."
    # The exit table: per pool, then the attempts the done jobs took.
    assert lines[-4].split()[1:] == ["pool", "workers", "done", "failed", "not", "done",
                                     "crashes", "restarts"]
    row = lines[-3].split()
    assert row[1:7] == ["type", "1", "4", "12", "0", "0"] and int(row[7]) == len(crashes)
    histogram = re.fullmatch(r"\[Main\] Attempts per done job: (.*)", lines[-2])
    assert histogram is not None
    counts = dict(pair.split(": ") for pair in histogram.group(1).split(", "))
    assert sum(map(int, counts.values())) == 12 and "2" in counts
    assert re.fullmatch(
        r"\[Main\] Summary: 12 jobs, 12 done, 0 failed, 0 not done, (\d+) crashes, \d+ "
        r"resends, wall time [\d.]+ s", log.splitlines()[-1])


def test_results_lines_carry_the_contract_fields(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--results", str(results)], stdin=b"fib 30\nsleep 0.01\n")
    assert run.finish() == 0
    by_job = {r["job"]: r for r in read_results(results)}
    assert set(by_job[1]) == {"job", "kind", "arg", "type", "priority", "status", "result",
                              "worker", "attempts"}
    assert by_job[1]["kind"] == "fib" and by_job[1]["arg"] == 30
    assert by_job[1]["result"] == 832040 and by_job[1]["attempts"] == 1
    assert by_job[2] | {"worker": 0} == {"job": 2, "kind": "sleep", "arg": 0.01, "type": 1,
                                         "priority": 0, "status": "done", "result": 0.01,
                                         "worker": 0, "attempts": 1}
    assert by_job[1]["worker"] in run.worker_pids()


def test_no_input_is_an_empty_successful_run(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--results", str(results)], stdin=b"# nothing\n")
    assert run.finish() == 0
    assert results.read_text() == ""
    assert "[Main] Summary: 0 jobs" in run.log_text()


def test_a_seeded_crash_run_crashes_the_same_jobs_at_the_same_steps(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(f"fib {n % 15}\n" for n in range(60)))
    outcomes = []
    for run_number, workers in enumerate((2, 3)):
        results = tmp_path / f"r{run_number}.jsonl"
        run = PoolRun(["--workers", str(workers), "--jobs", str(jobs), "--crash-rate", "0.4",
                       "--seed", "99", "--max-attempts", "0", "--results", str(results)])
        assert run.finish() == 0
        records = read_results(results)
        assert_exactly_once(records, range(1, 61))
        assert_done_right(records)
        outcomes.append({r["job"]: r["attempts"] for r in records})
    assert outcomes[0] == outcomes[1], "same seed, same attempts per job, whatever the pool"
    assert sum(outcomes[0].values()) > 70, "a 0.4 crash rate must crash some attempts"


def test_the_log_can_go_to_a_file(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    run = PoolRun(["--workers", "1", "--log", str(log_file)], stdin=b"fib 5\n")
    assert run.finish() == 0
    assert run.log_text() == ""
    text = log_file.read_text()
    assert "[Dealer] Received result for job 1: 5 from worker PID [" in text
    assert text.splitlines()[-1].startswith("[Main] Summary: 1 jobs, 1 done")
