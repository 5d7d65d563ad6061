"""A run on standard input that stops early says that input was left unread, and exits 1."""

from __future__ import annotations

import signal
from pathlib import Path

from taskpool.observe import events as ev

from harness import PoolRun, kill_quietly


def test_a_pool_that_gives_up_mid_input_exits_1_and_says_input_was_left_unread(
        tmp_path: Path) -> None:
    """Idle workers killed from outside until restart intensity gives up, while standard
    input is still open: the three jobs read are done, the rest was never read."""
    run = PoolRun(["--workers", "2", "--max-restarts", "1"], pipe_stdin=True,
                  events=tmp_path / "events.jsonl")
    for n in range(3):
        run.send_line(f"fib {n + 10}")
    run.wait_for_event(ev.JOB_DONE, count=3)
    for pid in run.worker_pids()[:2]:  # they took jobs: their deaths are not counted
        kill_quietly(pid, signal.SIGKILL)
    run.wait_for_event(ev.WORKER_STARTED, count=4)
    for pid in run.worker_pids()[2:4]:  # replacements that never took a job: counted
        kill_quietly(pid, signal.SIGKILL)
    assert run.finish() == 1
    run.one_event(ev.GAVE_UP)
    assert run.one_event(ev.INPUT_UNREAD)["last_line"] == 3
    summary = run.one_event(ev.SUMMARY)
    assert (summary["jobs"], summary["done"]) == (3, 3)
    run.close_stdin()
