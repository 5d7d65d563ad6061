"""Which job goes to which worker: per-pool backlogs, priorities, prefetch, preemption.

`assign` is called with `PoolState.lock` held by whichever Dealer thread just made work
possible: the send thread (a new job), the recv thread (a result freed a worker, a death
put jobs back) or the recovery thread (a new worker). It hands out all it can and returns
what it did, for the caller to log once the lock is released. Nothing here blocks: a send
goes only to a worker with free credit, so its mailbox has room.

The rules, each of which a user would call right:
- A job runs only on a worker of its own pool, and waits only for one of them: pools have
  separate backlogs, and a busy pool holds up no other.
- Highest priority first, then oldest (lowest job id). A resent job keeps its id, so it
  goes ahead of newer jobs of its priority.
- Prefetch: a worker may hold one job queued behind the one it runs (credit 2), so that it
  never idles while the Dealer answers its result. A prefetched job is not committed: it is
  taken back from the worker's mailbox (`_take_back`) when a job of higher priority arrives
  and no worker is free, and when a worker of its pool falls idle with nothing in the
  backlog. So a queued job never waits behind a lower one, nor behind a running job while
  another worker of its pool is idle.
- Preemption (--preempt, which turns prefetch off): when the top job of a backlog finds no
  free worker and outranks a running job, the worker running the lowest-priority job is
  killed; the job goes back to the backlog unchanged (not an attempt), and the replacement
  worker takes the urgent job. One preemption at a time per pool.
"""

from __future__ import annotations

import heapq
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from taskpool.core.supervision import Cause, Death, sent_again_words
from taskpool.local.state import NUDGE_SIGNAL, PoolSlots, PoolState, WorkerHandle
from taskpool.model.jobs import COMMAND_KINDS, Job
from taskpool.model.pools import PoolLayout
from taskpool.observe import events as ev
from taskpool.observe.log import dealer_log, event, job_event, supervisor_log
from taskpool.wire.queue import JobMessage, is_acked


@dataclass(frozen=True)
class Sent:
    job: Job
    pid: int
    attempt: int
    at: float  # when: the log line comes later, outside the lock
    again: tuple[str, int] | None = None  # why it goes out again (JobState.again)


@dataclass(frozen=True)
class Preempted:
    job: Job  # the job stopped
    pid: int
    urgent: Job  # the job it made room for


@dataclass
class Schedule:
    """What one `assign` did, to be logged after the lock is released."""

    sent: list[Sent] = field(default_factory=list)
    taken_back: list[tuple[int, int, float]] = field(default_factory=list)  # job, pid, when
    preempted: list[Preempted] = field(default_factory=list)
    nudge: bool = False  # a heartbeat clock started earlier than the recovery thread wakes

    def log(self, layout: PoolLayout) -> None:
        """Log what was done, and nudge the recovery thread if it must wake earlier."""
        if self.nudge:
            os.kill(os.getpid(), NUDGE_SIGNAL)
        for job_id, pid, at in self.taken_back:
            dealer_log.debug("Took back job %d from worker PID [%d]: not started", job_id, pid,
                             extra=event(ev.JOB_TAKEN_BACK, at=at, job=job_id, worker=pid))
        for p in self.preempted:
            supervisor_log.info("Preempting job %d (priority %d) on worker PID %d for job %d "
                                "(priority %d)", p.job.job_id, p.job.priority, p.pid,
                                p.urgent.job_id, p.urgent.priority,
                                extra=event(ev.JOB_PREEMPTED, job=p.job.job_id, worker=p.pid,
                                            for_job=p.urgent.job_id))
        for s in self.sent:
            job = s.job
            retry = sent_again_words(s.attempt, s.again)
            fields: dict[str, Any] = {
                "at": s.at, "job": job.job_id, "worker": s.pid, "attempt": s.attempt,
                "kind": job.kind.label,
                # A command's text waits in the spool: the Dealer holds only where.
                "arg": None if job.kind in COMMAND_KINDS else job.arg, "type": job.pool,
                "priority": job.priority}
            if s.again is not None:
                fields.update(again=s.again[0], from_worker=s.again[1])
            if layout.typed:
                priority = f", priority {job.priority}" if job.priority else ""
                label = layout.pool(job.pool).label  # typed pools: the event names it
                job_event(dealer_log, ev.JOB_SENT, "Job %d (%s, %s%s) -> worker %d%s",
                          job.job_id, label, job.describe_typed(), priority, s.pid, retry,
                          pool=label, **fields)
            else:
                job_event(dealer_log, ev.JOB_SENT, "Sent job %d -> %s%s", job.job_id,
                          job.describe(), retry, **fields)


def enqueue(state: PoolState, job_id: int) -> None:
    """Put a job in its pool's backlog. Called with the lock held."""
    job = state.jobs[job_id].job
    state.pools[job.pool].push(job.priority, job_id)


def assign(state: PoolState, number: int, schedule: Schedule | None = None) -> Schedule:
    """Hand out pool `number`'s backlog to its workers, as far as they have room. Called
    with the lock held."""
    schedule = schedule if schedule is not None else Schedule()
    if state.stopping:
        return schedule
    refill_before = state.backlog_wants_refill()
    pool = state.pools[number]
    tried: set[int] = set()  # workers whose queue we found empty: their job has started
    while True:
        if pool.backlog:
            priority, job_id = -pool.backlog[0][0], pool.backlog[0][1]
            job_state = state.jobs[job_id]
            if job_state.recorded:
                heapq.heappop(pool.backlog)
                continue
            worker = state.pick_worker(number)
            if worker is None:
                if _take_back_lower(state, pool, priority, tried, schedule):
                    continue
                if state.preempt:
                    _preempt(state, pool, job_state.job, schedule)
                break
            heapq.heappop(pool.backlog)
            attempt = job_state.failed_attempts + 1
            now = time.monotonic()
            if not worker.outstanding and not is_acked(job_state.job, state.ack_every_job):
                # Idle, the worker takes it at once; no Ack will say so.
                schedule.nudge |= state.expect_heartbeat(worker.pid, now)
            worker.outstanding.append(job_id)
            # Never blocks: this worker has fewer outstanding jobs than its mailbox has places.
            worker.mailbox.send(JobMessage(job_state.job, attempt).encode())
            schedule.sent.append(Sent(job_state.job, worker.pid, attempt, now, job_state.again))
            job_state.again = None
        elif not _steal_for_idle(state, pool, tried, schedule):
            break
    if not refill_before and state.backlog_wants_refill():
        state.backlog_room.notify()  # the send thread may be waiting for it
    return schedule


def _workers(state: PoolState, pool: PoolSlots) -> list[WorkerHandle]:
    return [w for w in state.workers.values() if w.pool == pool.number]


def _take_back_lower(
    state: PoolState, pool: PoolSlots, priority: int, tried: set[int], schedule: Schedule
) -> bool:
    """Take back the unstarted jobs of a full worker that holds one of lower priority than
    `priority`, so that the higher one can take a place. True if any was taken back."""
    if priority == 0:
        return False  # nothing is lower
    candidates = [(min(state.jobs[j].job.priority for j in w.outstanding), w)
                  for w in _workers(state, pool)
                  if len(w.outstanding) >= state.credit and w.pid not in tried]
    candidates.sort(key=lambda c: c[0])
    return any(_take_back(state, pool, w, tried, schedule)
               for lowest, w in candidates if lowest < priority)


def _steal_for_idle(
    state: PoolState, pool: PoolSlots, tried: set[int], schedule: Schedule
) -> bool:
    """With an empty backlog: if a worker of the pool is idle while another holds a job
    queued behind its running one, take that job back (`assign` then gives it to the idle
    worker). True if one was taken back."""
    workers = _workers(state, pool)
    if not any(not w.outstanding for w in workers):
        return False
    return any(_take_back(state, pool, donor, tried, schedule) for donor in workers
               if len(donor.outstanding) > 1 and donor.pid not in tried)


def _take_back(
    state: PoolState, pool: PoolSlots, worker: WorkerHandle, tried: set[int],
    schedule: Schedule,
) -> bool:
    """Take every unstarted job out of `worker`'s mailbox, back into the backlog, from where
    `assign` sends them again in priority order. All of them, not one: the worker takes its
    oldest first, which may be a job it has not started yet and that outranks the one
    behind it. True if any was taken back."""
    tried.add(worker.pid)
    # Until its mailbox is empty: then the worker has taken what was left. (A Shutdown is
    # only sent once stopping, when nothing is assigned: never among these.)
    taken = worker.take_back_waiting()
    for job in taken:
        if job.job_id in worker.outstanding:
            worker.outstanding.remove(job.job_id)
        pool.push(job.priority, job.job_id)
        if job.job_id in state.jobs:
            state.jobs[job.job_id].again = ("moved", worker.pid)
        schedule.taken_back.append((job.job_id, worker.pid, time.monotonic()))
    if taken and not worker.outstanding:
        state.heartbeat_deadlines.pop(worker.pid, None)  # idle now: it owes no beat
    return bool(taken)


def _preempt(state: PoolState, pool: PoolSlots, urgent: Job, schedule: Schedule) -> None:
    """Kill the worker that runs the lowest-priority job below `urgent`'s, if any, unless a
    preemption in this pool is already under way."""
    workers = _workers(state, pool)
    # One at a time: while a victim's death or its replacement is under way (a pool short
    # of a worker, or one reaped and not yet handled), the urgent job has a place coming.
    if (pool.preempting is not None or len(workers) < pool.size
            or any(w.pool == pool.number for w in state.exited.values())):
        return
    victims = [w for w in workers if w.running is not None
               and w.pid not in state.kill_reasons  # already being killed for a reason
               and state.jobs[w.running].job.priority < urgent.priority]
    if not victims:
        return
    victim = min(victims, key=lambda w: state.jobs[w.running or 0].job.priority)
    assert victim.running is not None
    state.kill_reasons[victim.pid] = Death.of(Cause.PREEMPTED, for_job=urgent.job_id)
    state.forget_deadlines(victim.pid)
    os.kill(victim.pid, signal.SIGKILL)  # in `workers`: not reaped, so the pid is ours
    pool.preempting = victim.pid
    schedule.preempted.append(Preempted(state.jobs[victim.running].job, victim.pid, urgent))
