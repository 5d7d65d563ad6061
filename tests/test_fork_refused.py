"""A fork() of a replacement worker refused by the kernel (the user's process limit, reached
by their other processes) leaves the run going smaller, not stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from taskpool.observe import events as ev

from harness import (
    PoolRun,
    as_user,
    assert_done_right,
    kill_quietly,
    read_results,
    write_job_file,
)

NOBODY = 65534  # root is exempt from RLIMIT_NPROC: the pool runs as a normal user


def _limit_processes(pid: int, soft: int | None) -> None:
    """Set `pid`'s RLIMIT_NPROC soft limit (None: back to its hard limit), as its own user
    may: from a process of that user."""
    code = ("import resource, sys; pid, soft = int(sys.argv[1]), sys.argv[2]; "
            "_, hard = resource.prlimit(pid, resource.RLIMIT_NPROC); "
            "resource.prlimit(pid, resource.RLIMIT_NPROC, "
            "(hard if soft == 'max' else int(soft), hard))")
    command = [sys.executable, "-c", code, str(pid), "max" if soft is None else str(soft)]
    if os.geteuid() == 0:
        command = as_user(NOBODY, command)
    subprocess.run(command, check=True, timeout=30)


def test_a_refused_fork_leaves_the_pool_running_smaller(shared_dir: Path) -> None:
    jobs = write_job_file(shared_dir, ["sleep 0.05"] * 40)
    results = shared_dir / "r.jsonl"
    events = shared_dir / "events.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results)],
                  events=events, user=NOBODY if os.geteuid() == 0 else None)
    run.wait_for_event(ev.JOB_DONE, count=2)
    dealer = run.role_pid("Dealer")
    _limit_processes(dealer, 1)  # this user has more processes than that: no fork now
    kill_quietly(run.worker_pids()[0], signal.SIGKILL)
    refused = run.wait_for_event(ev.FORK_REFUSED)[0]
    assert (refused["live"], refused["size"]) == (1, 2)
    assert "ulimit -u" in refused["reason"]
    _limit_processes(dealer, None)
    assert run.finish() == 0
    records = read_results(results)
    assert sorted(r["job"] for r in records) == list(range(1, 41))
    assert_done_right(records)
