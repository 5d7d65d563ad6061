"""No busy waiting: an idle pool does not run.

While one worker sleeps in a long job and no input arrives, every thread of every process of
the run must stay blocked in the kernel. A polling loop, however slow, would show up as
voluntary context switches; a blocked thread makes none. The 2.5-second window is the
measurement, not a synchronisation: the test waits on events for everything else.
"""

from __future__ import annotations

import os
from pathlib import Path

from taskpool.observe import events as ev

from harness import PoolRun, group_members


def _context_switches(pgid: int) -> dict[tuple[int, int], int]:
    """Voluntary + involuntary switches of every thread of every process of the run."""
    counts = {}
    for pid in group_members(pgid):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            counts[(pid, int(tid))] = (int(fields["voluntary_ctxt_switches"])
                                       + int(fields["nonvoluntary_ctxt_switches"]))
    return counts


def test_an_idle_pool_blocks_every_thread_in_the_kernel(tmp_path: Path) -> None:
    run = PoolRun(["--workers", "3"], pipe_stdin=True, events=tmp_path / "events.jsonl")
    run.send_line("fib 5")
    run.wait_for_event(ev.JOB_DONE, job=1)
    run.send_line("sleep 2.5")
    run.wait_for_event(ev.JOB_SENT, job=2, kind="sleep", arg=2.5)
    before = _context_switches(run.pid)
    run.wait_for_event(ev.JOB_DONE, job=2)  # the window: ~2.5 s with nothing to do
    after = _context_switches(run.pid)
    run.close_stdin()
    assert run.finish() == 0
    busy = {thread: after[thread] - count for thread, count in before.items()
            if thread in after and after[thread] - count > 8}
    # Waking for job 2's result costs a handful of switches in the threads that carry it;
    # a thread that polls polling even four times a second would show here.
    assert not busy, f"threads that woke up while idle (pid, tid): switches: {busy}"
    assert len(before) >= 3 + 3 + 2, "main, generator, Dealer's 4 threads, 3 workers"


def test_short_jobs_one_after_another_do_not_wake_the_heartbeat_thread_each() -> None:
    # Each job here holds the GIL from its start to its end, as a no-op job does, and the
    # loop releases it between jobs, as the worker's queue receive does: the heartbeat
    # thread, woken by the first job, must stay on its timer across the rest, not wake to
    # find each job already done and be woken again by the next.
    import threading
    import time

    from taskpool.local.worker import HeartbeatThread

    class CountingCondition(threading.Condition):
        waits = 0

        def wait(self, timeout: float | None = None) -> bool:
            CountingCondition.waits += 1
            return super().wait(timeout)

    class NoQueue:
        def send(self, message: bytes) -> None:
            raise AssertionError("no beat is due within the test")

    heartbeat = HeartbeatThread(NoQueue(), 60.0)  # type: ignore[arg-type]
    heartbeat.busy = CountingCondition()
    heartbeat.start()
    for _ in range(300):
        heartbeat.job_started()
        sum(range(2000))  # the job: holds the GIL
        heartbeat.job_finished()
        time.sleep(0.0002)  # between jobs, the GIL is released, as in a queue receive
    # Its first untimed wait, and the timed one the first job started. Before the fix it
    # slept untimed again after most jobs: ~300 waits.
    assert CountingCondition.waits <= 3
