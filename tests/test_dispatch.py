"""Typed pools (seed 000's dispatcher), streamed input, scheduling, priorities, preemption.

Each test checks which worker ran which job, and in what order jobs completed, never how
long anything took: durations only make one order overwhelmingly likely (seconds against
milliseconds), with margins a loaded 2-core CI machine keeps.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from taskpool.observe import events as ev

from harness import (
    ROOT,
    PoolRun,
    assert_done_right,
    assert_exactly_once,
    kill_workers_at_random,
    read_results,
    write_job_file,
)

SEED_EXAMPLE = ["1 5", "2 3", "3 7", "4 2", "5 4"]  # seed 000's own example input


def dispatch(args: list[str], **kw: Any) -> PoolRun:
    return PoolRun(args, command_name="dispatch", **kw)


def by_job(results: Path) -> dict[int, dict[str, Any]]:
    return {r["job"]: r for r in read_results(results)}


def done_order(run: PoolRun) -> list[int]:
    """The jobs in the order their workers finished them (each worker's job_finished)."""
    return [e["job"] for e in run.events_named(ev.JOB_FINISHED)]


def test_seed_000_example_runs_each_job_on_a_worker_of_its_type(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = dispatch(["1", "3", "1", "1", "1", "--results", str(results)],
                   stdin="\n".join(SEED_EXAMPLE).encode() + b"\n", events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    types = run.worker_types()
    assert Counter(types.values()) == {"1": 1, "2": 3, "3": 1, "4": 1, "5": 1}
    records = by_job(results)
    assert_exactly_once(list(records.values()), range(1, 6))
    assert_done_right(list(records.values()))
    for job_id, line in enumerate(SEED_EXAMPLE, start=1):
        job_type, duration = line.split()
        record = records[job_id]
        assert record["type"] == int(job_type) and record["priority"] == 0
        assert record["kind"] == "sleep" and record["result"] == float(duration)
        assert types[record["worker"]] == job_type, "a job runs only on a worker of its type"
        [sent] = run.events_named(ev.JOB_SENT, job=job_id)
        assert (sent["role"], sent["type"], sent["arg"], sent["worker"]) == (
            "Dealer", int(job_type), float(duration), record["worker"])
        [finished] = run.events_named(ev.JOB_FINISHED, job=job_id)
        assert (finished["pid"], finished["type"]) == (record["worker"], int(job_type))
    # One name a role (observe/log.py): the Dealer sends typed jobs as itself.
    assert {e["role"] for e in run.all_events()} <= {
        "Main", "TaskGenerator", "Dealer", "Supervisor", "Recovery", "Worker"}


def test_streamed_lines_start_at_once_and_the_run_ends_when_input_closes(
    tmp_path: Path,
) -> None:
    results = tmp_path / "r.jsonl"
    run = dispatch(["1", "2", "--results", str(results)], pipe_stdin=True,
                   events=tmp_path / "e.jsonl")
    for job_id, line in enumerate(["2 0", "1 0.1", "2 0 3", "1 0"], start=1):
        run.send_line(line)
        # The next line is written only once this one's result is in: nothing waits for
        # the input to end.
        run.wait_for_event(ev.JOB_DONE, job=job_id)
    run.close_stdin()
    assert run.finish() == 0
    records = by_job(results)
    assert [records[j]["type"] for j in (1, 2, 3, 4)] == [2, 1, 2, 1]
    assert records[3]["priority"] == 3


def test_lines_that_come_together_start_together_and_none_waits_for_more_input(
    tmp_path: Path,
) -> None:
    """The lines of one read go in one batch, sent before the next read blocks: the job of
    a write that ends in a comment and a blank line is not held for input to come."""
    results = tmp_path / "r.jsonl"
    run = dispatch(["2", "--results", str(results)], pipe_stdin=True,
                   events=tmp_path / "e.jsonl")
    run.send_line("1 0\n1 0.05 7\n1 0\n# more to come\n")
    for job_id in (1, 2, 3):
        run.wait_for_event(ev.JOB_DONE, job=job_id)
    run.send_line("1 0")
    run.wait_for_event(ev.JOB_DONE, job=4)
    run.close_stdin()
    assert run.finish() == 0
    records = by_job(results)
    assert sorted(records) == [1, 2, 3, 4] and records[2]["priority"] == 7


def test_a_zero_duration_is_a_job_not_a_shutdown(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = dispatch(["1", "--results", str(results)], stdin=b"1 0\n1 0\n1 0\n")
    assert run.finish() == 0
    records = by_job(results)
    assert_done_right(list(records.values()))
    assert len({r["worker"] for r in records.values()}) == 1, "no worker was stopped by a 0"


def test_six_jobs_on_three_workers_run_two_each(tmp_path: Path) -> None:
    # With three type-2 workers, six equal type-2 jobs take two rounds (about 1 s), not six.
    results = tmp_path / "r.jsonl"
    jobs = write_job_file(tmp_path, ["2 0.5"] * 6)
    run = dispatch(["1", "3", "--jobs", str(jobs), "--results", str(results)],
                   events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    per_worker = Counter(r["worker"] for r in by_job(results).values())
    assert sorted(per_worker.values()) == [2, 2, 2]
    assert set(per_worker) <= {pid for pid, t in run.worker_types().items() if t == "2"}


def test_a_busy_pool_holds_up_no_other_type(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    jobs = write_job_file(tmp_path, ["1 3", "1 0", "2 0", "2 0", "2 0"])
    run = dispatch(["1", "1", "--jobs", str(jobs), "--results", str(results)])
    assert run.finish() == 0
    order = [r["job"] for r in read_results(results)]
    # The type-2 jobs, queued behind two type-1 jobs, finish while job 1 still runs.
    assert set(order[:3]) == {3, 4, 5}, order
    assert order[3:] == [1, 2]


def test_an_idle_worker_takes_over_a_job_queued_behind_a_long_one(tmp_path: Path) -> None:
    # Job 3 is first prefetched behind job 1 (3 s). When worker B has nothing left, it
    # takes job 3 back from A's queue rather than idle while job 3 waits.
    results = tmp_path / "r.jsonl"
    jobs = write_job_file(tmp_path, ["1 3", "1 0.1", "1 0.1", "1 0.1"])
    run = dispatch(["2", "--jobs", str(jobs), "--results", str(results), "--verbose"],
                   events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    records = by_job(results)
    long_worker = records[1]["worker"]
    assert {records[j]["worker"] for j in (2, 3, 4)} == {
        pid for pid in run.worker_types() if pid != long_worker}
    assert [r["job"] for r in read_results(results)][-1] == 1


def test_a_job_file_runs_highest_priority_first(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    jobs = write_job_file(tmp_path, ["1 0", "1 0 3", "1 0 7", "1 0 3"])
    run = dispatch(["1", "--jobs", str(jobs), "--results", str(results)],
                   events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    assert done_order(run) == [3, 2, 4, 1]
    assert [r["job"] for r in read_results(results)] == [3, 2, 4, 1]


def test_a_queued_high_priority_job_starts_before_queued_lower_ones(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = dispatch(["1", "--results", str(results), "--verbose"], pipe_stdin=True,
                   events=tmp_path / "e.jsonl")
    run.send_line("1 1.5")
    run.wait_for_event(ev.JOB_STARTED, job=1)
    # Queued while job 1 runs: job 2 is prefetched by the worker at once, and must be
    # taken back for jobs 4 and 5.
    for line in ["1 0", "1 0", "1 0 5", "1 0 9"]:
        run.send_line(line)
    run.close_stdin()
    assert run.finish() == 0
    assert done_order(run) == [1, 5, 4, 2, 3]
    assert by_job(results)[5]["priority"] == 9


def test_preempt_stops_a_running_low_priority_job_for_an_urgent_one(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = dispatch(["1", "--preempt", "--results", str(results), "--verbose"],
                   pipe_stdin=True, events=tmp_path / "e.jsonl")
    run.send_line("1 2")
    [started] = run.wait_for_event(ev.JOB_STARTED, job=1)
    victim = started["worker"]
    run.send_line("1 0 9")
    run.close_stdin()
    assert run.finish() == 0
    assert run.events_named(ev.JOB_PREEMPTED, job=1, worker=victim, for_job=2)
    assert run.events_named(ev.JOB_REQUEUED, job=1, worker=victim, reason="preempted")
    records = by_job(results)
    assert [r["job"] for r in read_results(results)] == [2, 1]
    assert records[1]["attempts"] == 1, "a preempted run is not a failed attempt"
    assert records[1]["worker"] != victim and records[1]["status"] == "done"
    summary = run.one_event(ev.SUMMARY)
    assert {k: summary[k] for k in ("jobs", "done", "failed", "not_done", "crashes")} == {
        "jobs": 2, "done": 2, "failed": 0, "not_done": 0, "crashes": 0}


def test_without_preempt_a_running_job_is_never_stopped(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = dispatch(["1", "--results", str(results), "--verbose"], pipe_stdin=True,
                   events=tmp_path / "e.jsonl")
    run.send_line("1 0.5")
    run.wait_for_event(ev.JOB_STARTED, job=1)
    run.send_line("1 0 9")
    run.close_stdin()
    assert run.finish() == 0
    assert not run.events_named(ev.JOB_PREEMPTED)
    assert [r["job"] for r in read_results(results)] == [1, 2]


def test_typed_pools_survive_random_kills_with_exactly_once_results(tmp_path: Path) -> None:
    rng = random.Random(4)
    lines = [f"{rng.randint(1, 3)} {rng.choice([0, 0.01, 0.02])}" for _ in range(300)]
    jobs = write_job_file(tmp_path, lines)
    results = tmp_path / "r.jsonl"
    run = dispatch(["2", "2", "1", "--jobs", str(jobs), "--results", str(results),
                    "--max-attempts", "0"], events=tmp_path / "e.jsonl")
    kills = kill_workers_at_random(run, rng, kills=25, pool_size=5)
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 301))
    assert_done_right(records)
    types = run.worker_types()
    for record, line in zip(sorted(records, key=lambda r: r["job"]), lines):
        assert record["type"] == int(line.split()[0])
        assert types[record["worker"]] == line.split()[0], record
    assert kills >= 5, "the kills must land while the run is going"
    # Each pool was kept at its size: every dead worker was replaced by one of its type.
    assert Counter(types.values())["3"] >= 1


def test_bad_stdin_lines_are_skipped_named_and_exit_2(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = dispatch(["1", "0", "1", "--results", str(results)],
                   stdin=b"1 0\n4 1\n2 1\n1 -1\n3 x\n1 0 high\nfib 3\n3 0\n")
    assert run.finish() == 2
    log = run.log_text()
    for reason in ["<stdin>:2: type 4 is out of range 1..3",
                   "<stdin>:3: type 2 has no workers (its pool was given 0)",
                   "<stdin>:4: duration -1 must be a finite number >= 0",
                   "<stdin>:5: duration 'x' is not a number",
                   "<stdin>:6: priority 'high' is not a whole number",
                   "<stdin>:7: no pool is named for fib jobs"]:
        assert f"taskpool: {reason}" in log
    assert "Traceback" not in log
    assert sorted(r["job"] for r in read_results(results)) == [1, 2]


def _taskpool(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskpool", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, input=stdin)


def test_a_bad_job_file_runs_nothing_and_lists_every_bad_line(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["1 1", "3 1", "2 1 -4", "1 2"])
    proc = _taskpool("dispatch", "2", "1", "--jobs", str(jobs))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"taskpool: {jobs}:2: type 3 is out of range 1..2",
        f"taskpool: {jobs}:3: priority -4 is out of range 0..32767 (higher runs first)",
        f"taskpool: {jobs}: 2 bad line(s); nothing was run",
    ]


def test_bad_pool_counts_are_usage_errors() -> None:
    for args, reason in [
        (["dispatch", "0", "0"], "every pool has 0 workers"),
        (["dispatch", "1", "x"], "'x' is not a whole number"),
        (["run", "--pools", "1,2", "--workers", "3"], "drop --workers"),
        (["run", "--pools", "gpu=2"], "unknown job kind 'gpu'"),
    ]:
        proc = _taskpool(*args)
        assert proc.returncode == 2, proc
        assert reason in proc.stderr and "Traceback" not in proc.stderr


def test_kind_named_pools_take_the_core_job_file(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    jobs = write_job_file(tmp_path, ["fib 20", "sleep 0.1", "fib 15", "2 0"])
    run = PoolRun(["--pools", "fib=1,sleep=2", "--jobs", str(jobs), "--results",
                   str(results)], events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    types = run.worker_types()
    assert Counter(types.values()) == {"fib": 1, "sleep": 2}
    records = by_job(results)
    assert_done_right(list(records.values()))
    assert [records[j]["type"] for j in (1, 2, 3, 4)] == [1, 2, 1, 2]
    assert {types[records[j]["worker"]] for j in (1, 3)} == {"fib"}
    [sent] = run.events_named(ev.JOB_SENT, job=1)
    assert (sent["role"], sent["type"], sent["kind"], sent["arg"]) == ("Dealer", 1, "fib", 20)
