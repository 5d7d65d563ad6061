"""Forking replacements from the threaded Dealer never deadlocks a child.

Hundreds of workers crash and are replaced while the send and recv threads are busy sending,
receiving and logging: if a child inherited a lock held by another thread at the fork (a
logging lock, a stdio buffer lock, the Dealer's state lock), it would hang before its
"Starting up" line (its worker_started event) and the run would never finish; pytest-timeout
turns that into a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from taskpool.observe import events as ev

from harness import PoolRun, assert_done_right, assert_exactly_once, read_results


@pytest.mark.timeout(180)
def test_hundreds_of_replacements_forked_while_threads_are_busy_and_logging(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("sleep 0\nfib 8\n" * 300)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "4", "--jobs", str(jobs), "--results", str(results),
                   "--crash-rate", "0.5", "--seed", "3", "--max-attempts", "0"],
                  events=tmp_path / "events.jsonl")
    assert run.finish(timeout=150) == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 601))
    assert_done_right(records)
    crashes = run.one_event(ev.SUMMARY)["crashes"]
    assert crashes >= 300
    # Every forked replacement got as far as its first event (worker_started).
    assert len(run.worker_pids()) >= 4 + crashes - 1
