"""A limit that stops the pool is named for what it is, with the setting that raises it."""

from __future__ import annotations

import os
import resource
from pathlib import Path

from harness import PoolRun, read_results, write_job_file


def _few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))


def test_running_out_of_descriptors_is_blamed_on_ulimit_n_not_the_queue_budget() -> None:
    run = PoolRun(["--workers", "64"], stdin=b"sleep 0\n" * 64, preexec_fn=_few_descriptors)
    assert run.finish() == 1
    log = run.log_text()
    assert "ran out of file descriptors (`ulimit -n` is 40)" in log
    assert "RLIMIT_MSGQUEUE" not in log and "Traceback" not in log


def _tiny_queue_budget() -> None:
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (1000, 1000))


def test_a_pool_that_cannot_start_reports_every_job_not_done(shared_dir: Path) -> None:
    """main's own queue refused (a budget too small for the first queue): the run still
    writes a record for every job of its file, with the reason."""
    jobs = write_job_file(shared_dir, ["fib 1", "sleep 0", "fib 2"])
    results = shared_dir / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results)],
                  preexec_fn=_tiny_queue_budget,
                  user=65534 if os.geteuid() == 0 else None)  # root passes queue limits
    assert run.finish() == 1
    assert "Traceback" not in run.log_text()
    records = read_results(results)
    assert [(r["job"], r["status"]) for r in records] == [
        (1, "not_done"), (2, "not_done"), (3, "not_done")]
    assert all("the pool could not start" in r["reason"] for r in records)
