"""scheduler.assign on real mailboxes, with the test playing the workers: which job ends up
in which worker's mailbox, in what order. No process is forked; no pid is signalled."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest

from taskpool.local.scheduler import assign, enqueue
from taskpool.local.state import JobState, PoolSlots, PoolState, WorkerHandle
from taskpool.model.jobs import Job, JobKind
from taskpool.posix.mailbox import Mailboxes
from taskpool.wire.queue import MAX_MESSAGE_SIZE, JobMessage, decode


@pytest.fixture
def state() -> Iterator[PoolState]:
    yield PoolState(credit=2, mailboxes=Mailboxes(8, 2, MAX_MESSAGE_SIZE),
                    pools={1: PoolSlots(1, 2)})


def add_worker(state: PoolState, pid: int) -> WorkerHandle:
    mailbox = state.mailboxes.allocate()
    assert mailbox is not None
    worker = WorkerHandle(pid, 1, mailbox)
    state.workers[pid] = worker
    return worker


def submit(state: PoolState, job_id: int, priority: int = 0) -> None:
    with state.lock:
        state.jobs[job_id] = JobState(Job(job_id, JobKind.SLEEP, 0.0, priority=priority))
        enqueue(state, job_id)
        assign(state, 1)


def take(worker: WorkerHandle) -> int:
    """What the worker would do: take the next job from its mailbox."""
    data = worker.mailbox.receive()
    message = decode(data)
    assert isinstance(message, JobMessage)
    return message.job.job_id


def backlog(state: PoolState) -> list[int]:
    return [job_id for _, job_id in sorted(state.pools[1].backlog)]


def test_a_higher_job_takes_the_place_of_lower_unstarted_ones_in_priority_order(
    state: PoolState,
) -> None:
    worker = add_worker(state, 101)
    submit(state, 1, priority=9)
    submit(state, 2, priority=0)  # prefetched: queue holds 1, 2; neither started
    submit(state, 3, priority=5)
    # Both unstarted jobs were taken back and sent again in priority order: the 9 stays
    # first, the 5 takes the 0's place.
    assert [take(worker), take(worker)] == [1, 3]
    assert worker.outstanding == [1, 3]
    assert backlog(state) == [2]


def test_a_lower_job_never_displaces_a_higher_one(state: PoolState) -> None:
    worker = add_worker(state, 101)
    submit(state, 1, priority=5)
    submit(state, 2, priority=5)
    submit(state, 3, priority=1)
    assert backlog(state) == [3]
    assert [take(worker), take(worker)] == [1, 2]


def test_an_idle_worker_takes_over_a_job_queued_behind_a_running_one(
    state: PoolState,
) -> None:
    busy = add_worker(state, 101)
    submit(state, 1)
    submit(state, 2)  # both go to the only worker: 1 runs, 2 waits behind it
    assert take(busy) == 1
    idle = add_worker(state, 102)
    with state.lock:
        assign(state, 1)  # what the recovery thread does for a new worker
    assert take(idle) == 2
    assert busy.outstanding == [1] and idle.outstanding == [2]


def test_a_job_the_worker_has_taken_is_never_taken_back(state: PoolState) -> None:
    worker = add_worker(state, 101)
    submit(state, 1, priority=0)
    submit(state, 2, priority=0)
    assert [take(worker), take(worker)] == [1, 2]  # both taken (the first one's result in flight)
    submit(state, 3, priority=9)
    assert worker.outstanding == [1, 2], "nothing unstarted to take back"
    assert backlog(state) == [3]


def test_one_urgent_job_preempts_one_worker_until_its_replacement_is_in(
    state: PoolState,
) -> None:
    # Real processes stand in for the workers, so that the SIGKILL lands somewhere.
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        state.credit, state.preempt = 1, True
        workers = [add_worker(state, p.pid) for p in sleepers]
        submit(state, 1)
        submit(state, 2)
        for worker in workers:
            worker.running = take(worker)  # both ACKed: running
        submit(state, 3, priority=9)
        victim = state.workers[state.pools[1].preempting or 0]
        assert state.kill_reasons[victim.pid].requeue
        killed = [p for p in sleepers if p.pid == victim.pid]
        assert killed[0].wait(timeout=10) == -signal.SIGKILL
        with state.lock:
            assign(state, 1)  # an Ack or a result elsewhere: no second victim
            # The victim is reaped and its death handled; its replacement is not forked yet.
            del state.workers[victim.pid]
            state.pools[1].preempting = None
            assign(state, 1)
        assert list(state.kill_reasons) == [victim.pid], "one urgent job, one preemption"
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


class CountingCondition(threading.Condition):
    def __init__(self, lock: threading.Lock) -> None:
        super().__init__(lock)
        self.notified = 0

    def notify(self, n: int = 1) -> None:
        self.notified += 1
        super().notify(n)


def test_full_backlogs_call_the_send_thread_back_only_once_they_want_a_refill() -> None:
    # The send thread stops reading once the backlogs are full. Woken at every job taken
    # from them, it would read one job per job done, a thread switch each; it is woken
    # only once they have room for a run of jobs (backlog_refill).
    state = PoolState(credit=1, mailboxes=Mailboxes(2, 1, MAX_MESSAGE_SIZE),
                      pools={1: PoolSlots(1, 1)}, backlog_max=4, backlog_refill=2)
    room = CountingCondition(state.lock)  # type: ignore[arg-type]
    state.backlog_room = room
    for job_id in range(1, 5):
        submit(state, job_id)  # no worker yet: all wait
    assert not state.backlog_has_room()
    worker = add_worker(state, 101)
    notified = []
    for _ in range(3):
        with state.lock:
            assign(state, 1)
        notified.append(room.notified)
        job_id = take(worker)  # the worker runs it; its result frees the worker
        worker.outstanding.remove(job_id)
    # Backlogs of 3, then 2 (= max - refill: the send thread is woken), then 1.
    assert notified == [0, 1, 1]



def test_without_acks_a_worker_owes_heartbeats_from_the_job_it_takes_idle_until_it_holds_none(
    state: PoolState,
) -> None:
    """No Ack says when a job starts (protocol.is_acked), so its heartbeat clock starts as
    it is sent to an idle worker, which takes it at once. A job queued behind a running one
    does not restart the clock; taking back every job the worker holds stops it."""
    state.ack_every_job, state.heartbeat = False, 5.0
    worker = add_worker(state, 101)
    submit(state, 1)
    first = state.heartbeat_deadlines[101]
    submit(state, 2)  # queued behind job 1
    assert state.heartbeat_deadlines[101] is first
    # Job 3 outranks both, neither started: both are taken back (the worker holds none:
    # the clock stops), then 3 and 1 are sent to the idle worker (it starts again).
    submit(state, 3, priority=9)
    assert worker.outstanding == [3, 1]
    assert state.heartbeat_deadlines[101] is not first


@pytest.mark.parametrize("every_job, timeout", [(True, None), (False, 9.0)])
def test_an_acked_job_starts_no_heartbeat_clock_when_sent(
    state: PoolState, every_job: bool, timeout: float | None,
) -> None:
    """Its Ack will, when the worker starts it (Dealer._on_ack)."""
    state.ack_every_job, state.heartbeat = every_job, 5.0
    worker = add_worker(state, 101)
    with state.lock:
        state.jobs[1] = JobState(Job(1, JobKind.SLEEP, 0.0, timeout=timeout))
        enqueue(state, 1)
        assign(state, 1)
    assert worker.outstanding == [1]
    assert state.heartbeat_deadlines == {}
