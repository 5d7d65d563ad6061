"""Default kernel limits, normal user: a run has two small queues whatever its workers; a
refused queue is explained."""

from __future__ import annotations

import os
import resource
from pathlib import Path

from taskpool.observe import events as ev

from harness import PoolRun, assert_done_right, assert_exactly_once, read_results

DEFAULT_MSGQUEUE_BYTES = 819200  # the kernel's default RLIMIT_MSGQUEUE, soft and hard
NOBODY = 65534


def _default_queue_budget(limit: int = DEFAULT_MSGQUEUE_BYTES) -> None:
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (limit, limit))


def _as_normal_user() -> int | None:
    """Run as `nobody` when the tests run as root: root may exceed msg_max and queues_max."""
    return NOBODY if os.geteuid() == 0 else None


def test_64_workers_run_as_a_normal_user_under_default_mq_limits(shared_dir: Path) -> None:
    limits = {name: Path(f"/proc/sys/fs/mqueue/{name}").read_text().strip()
              for name in ("msg_max", "msgsize_max")}
    assert limits == {"msg_max": "10", "msgsize_max": "8192"}, "this test means default limits"
    results = shared_dir / "r.jsonl"
    run = PoolRun(["--workers", "64", "--results", str(results)],
                  stdin=b"fib 12\nsleep 0\n" * 100,
                  preexec_fn=_default_queue_budget, user=_as_normal_user(),
                  events=shared_dir / "events.jsonl")
    assert run.finish() == 0, run.log_text()
    assert len(run.worker_pids()) == 64
    records = read_results(results)
    assert_exactly_once(records, range(1, 201))
    assert_done_right(records)


def test_a_used_up_queue_budget_is_explained_in_plain_words(shared_dir: Path) -> None:
    # A budget too small even for the first queue: what a user sees when other programs,
    # or leaked queues of a crashed run of something else, hold the rest.
    run = PoolRun(["--workers", "2"], stdin=b"fib 1\n",
                  preexec_fn=lambda: _default_queue_budget(1000), user=_as_normal_user())
    assert run.finish() == 1
    log = run.log_text()
    assert "Traceback" not in log and "too many open files" not in log.lower()
    assert "taskpool: the kernel refused another message queue" in log
    assert "RLIMIT_MSGQUEUE, 1000 bytes" in log and "ulimit -q" in log


def test_a_dealer_whose_result_queue_is_refused_reports_every_job_not_done(
    shared_dir: Path,
) -> None:
    # Room for main's ready queue of small messages (2,240 bytes), not for the Dealer's
    # result queue as well.
    results = shared_dir / "r.jsonl"
    # More jobs than the ready queue holds: the generator must not be left blocked on it.
    jobs = shared_dir / "jobs.txt"
    jobs.write_text("fib 5\n" * 30)
    run = PoolRun(["--workers", "4", "--jobs", str(jobs), "--results", str(results)],
                  preexec_fn=lambda: _default_queue_budget(3000), user=_as_normal_user(),
                  events=shared_dir / "events.jsonl")
    code = run.finish()
    log = run.log_text()
    assert "Traceback" not in log
    assert "the kernel refused another message queue" in log and "ulimit -q" in log
    assert code == 1
    records = read_results(results)
    assert_exactly_once(records, range(1, 31))
    assert all(r["status"] == "not_done" for r in records), "a pool that cannot start runs nothing"
    assert not run.events_named(ev.JOB_SENT)


def test_a_run_has_two_small_queues_whatever_its_number_of_workers(shared_dir: Path) -> None:
    """4,480 bytes: the result queue (2,240) and a ready queue of small messages (2,240),
    not one of 1,024-byte JobBatches (11,200), and not one byte for any of the 64 workers,
    nor for the replacements of the crashed ones."""
    jobs = shared_dir / "jobs.txt"
    jobs.write_text("fib 12\n" * 200)
    results = shared_dir / "r.jsonl"
    faults = [arg for job in (1, 70, 130) for arg in ("--inject-fault", f"{job}:during_compute")]
    run = PoolRun(["--workers", "64", "--jobs", str(jobs), "--results", str(results), *faults],
                  preexec_fn=lambda: _default_queue_budget(4480), user=_as_normal_user(),
                  events=shared_dir / "events.jsonl")
    assert run.finish() == 0, run.log_text()
    records = read_results(results)
    assert_exactly_once(records, range(1, 201))
    assert_done_right(records)
    assert run.one_event(ev.SUMMARY)["crashes"] == 3
