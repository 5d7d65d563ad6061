"""End-to-end runs: right values, the results file's contract. (The log's tone:
test_log_format.py.)"""

from __future__ import annotations

from pathlib import Path

from taskpool.observe import events as ev

from harness import PoolRun, assert_done_right, assert_exactly_once, read_results


def test_the_demo_recovers_from_crashes_with_every_value_right(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--demo", "--results", str(results)], events=tmp_path / "events.jsonl")
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 13))
    assert_done_right(records)
    crashes = [e["worker"] for e in run.events_named(ev.WORKER_EXITED, crash=True)]
    assert len(crashes) >= 3, run.log_text()
    assert {e["reason"] for e in run.events_named(ev.WORKER_EXITED, crash=True)} == {
        "killed by signal 11 (SIGSEGV)"}
    for pid in crashes:
        assert [e["role"] for e in run.events_named(ev.SIMULATED_CRASH, pid=pid)] == ["Worker"]
    assert run.events_named(ev.JOB_RESENT)
    # Each crash forks a replacement, except one that comes when the pool is stopping.
    assert len(run.worker_pids()) >= 4 + len(crashes) - 1
    assert any(r["attempts"] > 1 for r in records)
    assert run.events_named(ev.JOB_SENT, job=6, kind="fib", arg=35, attempt=1)
    assert run.one_event(ev.ALL_JOBS_COMPLETED)["jobs"] == 12
    # The exit table: per pool, then the attempts the done jobs took.
    pool = run.one_event(ev.POOL_SUMMARY)
    assert {k: pool[k] for k in ("type", "workers", "done", "failed", "not_done", "crashes")} \
        == {"type": 1, "workers": 4, "done": 12, "failed": 0, "not_done": 0,
            "crashes": len(crashes)}
    histogram = run.one_event(ev.ATTEMPTS_HISTOGRAM)["attempts"]
    assert sum(histogram.values()) == 12 and "2" in histogram
    summary = run.one_event(ev.SUMMARY)
    assert {k: summary[k] for k in ("jobs", "done", "failed", "not_done")} == {
        "jobs": 12, "done": 12, "failed": 0, "not_done": 0}
    assert summary["crashes"] == len(crashes)


def test_results_lines_carry_the_contract_fields(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--results", str(results)], stdin=b"fib 30\nsleep 0.01\n",
                  events=tmp_path / "events.jsonl")
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
    run = PoolRun(["--workers", "2", "--results", str(results)], stdin=b"# nothing\n",
                  events=tmp_path / "events.jsonl")
    assert run.finish() == 0
    assert results.read_text() == ""
    assert run.one_event(ev.SUMMARY)["jobs"] == 0


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
