"""The send thread: new jobs, from the ready queue into their pool's backlog.

It blocks on the ready queue's receive, on `state.backlog_room` (the backlogs are full,
until they want a refill), and on the result queue's send (EndOfJobs only, which the recv
thread always drains). It never waits for a free worker: it puts a job in its backlog and
hands out what it can under the lock (scheduler.assign), so it always reads on.
"""

from __future__ import annotations

import posix_ipc

from taskpool.local.scheduler import Schedule, assign, enqueue
from taskpool.local.state import JobState, PoolState
from taskpool.model.jobs import Job
from taskpool.model.pools import PoolLayout
from taskpool.observe.log import dealer_log as log
from taskpool.wire import decoded_or_dropped
from taskpool.wire.queue import EndOfJobs, JobBatch, JobMessage, Message, Stop, decode


class Sender:
    """Owns: taking jobs from the ready queue into their pool's backlog. The ready queue
    gives the highest message priority (= job priority) first."""

    def __init__(self, state: PoolState, ready_queue: posix_ipc.MessageQueue,
                 result_queue: posix_ipc.MessageQueue, layout: PoolLayout) -> None:
        self.state = state
        self.ready_queue = ready_queue
        self.result_queue = result_queue
        self.layout = layout

    def run(self) -> None:
        while not self.state.stopping:
            message = self._next_message()
            if isinstance(message, Stop):
                return
            if isinstance(message, EndOfJobs):
                # Ordered after every job the generator sent (it has the lowest priority,
                # and came last); the recv thread owns the count of what is recorded, so
                # it decides when all is done.
                self.result_queue.send(message.encode())
            elif isinstance(message, (JobMessage, JobBatch)):
                jobs = (message.job,) if isinstance(message, JobMessage) else message.jobs
                if self._admit(jobs):
                    self._wait_for_room()

    def _next_message(self) -> Message | None:
        data, _ = self.ready_queue.receive()
        return decoded_or_dropped(decode, data, log, "message from the generator")

    def _admit(self, jobs: tuple[Job, ...]) -> bool:
        """Put `jobs` in their backlogs and hand out what can be; True if the backlogs are
        full now."""
        state = self.state
        dropped = []
        pools = set()
        schedule = Schedule()
        with state.lock:
            for job in jobs:
                if job.job_id in state.jobs:
                    dropped.append(f"Dropped job {job.job_id}: its id was already taken")
                elif job.pool not in state.pools:
                    dropped.append(f"Dropped job {job.job_id}: no pool of type {job.pool}")
                else:
                    state.jobs[job.job_id] = JobState(job)
                    enqueue(state, job.job_id)
                    pools.add(job.pool)
            for pool in sorted(pools):
                assign(state, pool, schedule)
            full = not state.backlog_has_room()
        for reason in dropped:
            log.error("%s", reason)
        schedule.log(self.layout)
        return full

    def _wait_for_room(self) -> None:
        """Bounded memory: once the backlogs are full, read no further until they want a
        refill (room for a run of jobs, not one), or the pool is stopping."""
        state = self.state
        with state.lock:
            while not state.backlog_wants_refill() and not state.stopping:
                state.backlog_room.wait()
