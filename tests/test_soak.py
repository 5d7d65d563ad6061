"""Long fault-injection runs, for `make soak` (not part of `make test`).

Thousands of jobs with hundreds of simulated and external kills, and every role killed at
random instants, many times over. Each run is checked for exactly-once results with the
right values, and (by the conftest fixture) for leftovers.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from taskpool.observe import events as ev

from harness import (
    PoolRun,
    WorkerKiller,
    assert_done_right,
    assert_exactly_once,
    kill_quietly,
    kill_workers_at_random,
    read_results,
)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]


def test_thousands_of_jobs_with_hundreds_of_crashes_and_kills(tmp_path: Path) -> None:
    """The jobs come on standard input, a few between two kills, so that the run lasts as
    long as the kills take, however loaded the machine."""
    rng = random.Random(11)
    total, between_kills = 4000, 25
    lines = [rng.choice(["sleep 0.003", "fib 15", "sleep 0", "fib 18"]) for _ in range(total)]
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "4", "--results", str(results),
                   "--crash-rate", "0.08", "--seed", "5", "--max-attempts", "0",
                   "--max-restarts", "100000"], pipe_stdin=True, events=tmp_path / "events.jsonl")
    killer = WorkerKiller(run, rng, pool_size=4)
    for first in range(0, total, between_kills):
        run.send_line("\n".join(lines[first:first + between_kills]))
        killer.kill_one()
    run.close_stdin()
    assert run.finish(timeout=600) == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, total + 1))
    assert_done_right(records)
    summary = run.one_event(ev.SUMMARY)
    kills, crashes = len(killer.killed), summary["crashes"]
    assert kills >= 100 and crashes >= 300, summary
    print(f"\nsoak: {total} jobs, {kills} external kills, {crashes} crashes in all: {summary}")


@pytest.mark.parametrize("preempt", [False, True])
def test_typed_pools_with_priorities_under_crashes_and_kills(tmp_path: Path,
                                                             preempt: bool) -> None:
    rng = random.Random(f"typed{preempt}")
    total = 3000
    lines = [f"{rng.randint(1, 3)} {rng.choice([0, 0.002, 0.01])} {rng.randint(0, 9)}"
             for _ in range(total)]
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("\n".join(lines) + "\n")
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--pools", "2,2,1", "--jobs", str(jobs), "--results", str(results),
                   "--crash-rate", "0.05", "--seed", "3", "--max-attempts", "0",
                   "--max-restarts", "100000", *(["--preempt"] if preempt else [])],
                  events=tmp_path / "events.jsonl")
    kills = kill_workers_at_random(run, rng, kills=150, pool_size=5)
    assert run.finish(timeout=600) == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, total + 1))
    assert_done_right(records)
    types = run.worker_types()
    for record in records:
        expected_type = lines[record["job"] - 1].split()[0]
        assert record["type"] == int(expected_type)
        assert types[record["worker"]] == expected_type, record
    assert kills >= 50
    print(f"\nsoak typed (preempt={preempt}): {total} jobs, {kills} kills: "
          f"{run.one_event(ev.SUMMARY)}")


@pytest.mark.parametrize("role", ["Dealer", "TaskGenerator", "main", "worker"])
def test_each_role_killed_at_random_instants(tmp_path: Path, role: str) -> None:
    rng = random.Random(role)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("sleep 0.005\nfib 14\n" * 150)
    for round_number in range(15):
        results = tmp_path / f"r{round_number}.jsonl"
        run = PoolRun(["--workers", "3", "--jobs", str(jobs), "--results", str(results),
                       "--crash-rate", "0.05", "--seed", str(round_number),
                       "--max-attempts", "0"], events=tmp_path / f"events{round_number}.jsonl")
        run.wait_for_event(ev.JOB_DONE, job=rng.randint(1, 250))
        if role == "main":
            victim = run.pid
        elif role == "worker":
            victim = rng.choice(run.worker_pids())
        else:
            victim = run.role_pid(role)
        kill_quietly(victim, signal.SIGKILL)
        code = run.finish()
        records = read_results(results)
        ids = [r["job"] for r in records]
        assert len(ids) == len(set(ids)), "a result recorded twice"
        assert_done_right([r for r in records if r["status"] == "done"])
        if role == "main":
            assert code == -signal.SIGKILL
        elif role == "worker":
            assert code == 0
            assert_exactly_once(records, range(1, 301))
        else:
            assert code in (0, 1)  # 0 if the role was already on its way out
            assert_exactly_once(records, range(1, 301))
