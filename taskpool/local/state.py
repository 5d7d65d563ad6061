"""The Dealer's shared state, and the one lock that guards it.

Three threads of the Dealer touch this state (see dealer.py for their roles):

- the send thread (sender.py) puts new jobs in their pool's backlog;
- the recv thread (receiver.py) records results, and on a worker's death (recovery.py) puts
  what it held back in the backlog; it also stops the pool (stopping.py);
- the recovery thread (supervisor.py) registers forked workers, and moves reaped ones from
  `workers` to `exited` in the same critical section as its waitpid(), so that no other
  thread can see (and signal) a pid that is already reaped and may be reused.

Whichever of them adds a job to a backlog or frees a worker also hands out what it can
(`scheduler.assign`), in the same critical section: so no thread ever waits for a worker.

Every field below is read and written under `PoolState.lock`, with one exception named
where it is. Nothing blocks while holding the lock: a send to a worker's mailbox never
blocks (a worker never has more `outstanding` jobs than its mailbox has places), and the
recovery thread's fork() is quick.
"""

from __future__ import annotations

import heapq
import signal
import threading
from dataclasses import dataclass, field

from taskpool.core.supervision import Cause, Death
from taskpool.model.jobs import Job
from taskpool.posix.mailbox import Mailbox, Mailboxes
from taskpool.wire import ProtocolError
from taskpool.wire.queue import JobMessage, decode

# "Look at the deadlines again": to the recovery thread, from whoever set one earlier than
# the one it sleeps until.
NUDGE_SIGNAL = signal.SIGUSR1

# Jobs the Dealer holds in its backlogs at most, all pools together. Beyond it the send
# thread stops reading the ready queue, so the generator (and a producer piping into
# taskpool) waits: memory stays bounded whatever the input. Priorities order the jobs read
# so far; a job file is sorted by priority before it is sent.
BACKLOG_MAX = 10_000
# Once the backlogs are full, the send thread reads on only when they have this much room
# again, and then reads a run of jobs: not one job for each job done, which was a thread
# switch per job, an eighth of the Dealer's time on a long job file.
BACKLOG_REFILL = 1_000


@dataclass
class WorkerHandle:
    pid: int
    pool: int  # its job type
    # This worker's own mailbox (posix/mailbox.py). The worker takes its jobs from it; the
    # Dealer only takes back from it jobs not yet started (atomically: each job is either
    # taken by the worker or taken back, never both).
    mailbox: Mailbox
    # Job ids sent to this worker and not yet answered by a Result, in the order sent. The
    # worker takes them in this order (its mailbox is FIFO), one at a time.
    outstanding: list[int] = field(default_factory=list)
    took_a_job: bool = False  # ever: a worker that never did is what a crash loop makes
    running: int | None = None  # the job it ACKed and has not answered yet (if acked)

    def take_back_waiting(self) -> list[Job]:
        """Take every job still waiting in this worker's mailbox, unstarted, oldest first.
        Called with the lock held; never blocks."""
        waiting: list[Job] = []
        for data in self.mailbox.take_back_all():
            try:
                message = decode(data)
            except ProtocolError:
                continue
            if isinstance(message, JobMessage):
                waiting.append(message.job)
        return waiting


@dataclass
class PoolSlots:
    """One typed pool: its size and its backlog of jobs waiting for one of its workers."""

    number: int
    size: int
    # A heap of (-priority, job id): the highest priority first, then the oldest job.
    backlog: list[tuple[int, int]] = field(default_factory=list)
    preempting: int | None = None  # a worker killed to make room, until its death is seen
    forked: int = 0  # workers started, replacements included
    crashes: int = 0  # workers that died while the pool was running (not retired, preempted)

    def push(self, priority: int, job_id: int) -> None:
        heapq.heappush(self.backlog, (-priority, job_id))


@dataclass
class JobState:
    job: Job
    # Workers that took this job and died before its result reached us. The next send
    # carries attempt = failed_attempts + 1.
    failed_attempts: int = 0
    recorded: bool = False
    # Why it waits in a backlog to go out again, and the worker it left: ("resent", pid)
    # after that worker's crash, ("requeued", pid) from a dead worker's queue, unstarted,
    # ("preempted", pid), ("moved", pid) taken back from a live worker's queue. Its next
    # "Sent" line says so (core/supervision.AGAIN_WORDS); None for a first send.
    again: tuple[str, int] | None = None
    # Runs of it that ended failed (a non-zero exit, a call that raised): run again only
    # while the policy's retry_failed allows (core/supervision.py: after_failure).
    failed_runs: int = 0


@dataclass(frozen=True)
class Deadline:
    """When the recovery thread must kill a worker, and the death it will give as the
    reason: its Cause says whether the job is charged an attempt (core/supervision.py)."""

    at: float  # time.monotonic()
    death: Death


@dataclass
class PoolState:
    credit: int  # jobs a worker may hold at once: one running, the rest queued
    # Every worker's mailbox: allocated by the recovery thread as it forks a worker,
    # released by the recv thread once it has drained a dead worker's.
    mailboxes: Mailboxes
    lock: threading.Lock = field(default_factory=threading.Lock)
    workers: dict[int, WorkerHandle] = field(default_factory=dict)  # live: not yet reaped
    # Reaped, and their WorkerExited not yet handled by the recv thread. While a pid is here,
    # every message from that pid comes from the dead worker (a new worker with the same
    # pid is forked after WorkerExited was posted, so its messages come after it).
    exited: dict[int, WorkerHandle] = field(default_factory=dict)
    jobs: dict[int, JobState] = field(default_factory=dict)
    pools: dict[int, PoolSlots] = field(default_factory=dict)
    preempt: bool = False  # --preempt: an urgent job may stop a running lower one
    # Set once by the recv thread (all done, or terminated); never cleared. The send
    # thread also reads it without the lock at the top of its loop: a stale False costs
    # one more iteration, never a wrong send, since sends re-check it under the lock.
    stopping: bool = False
    # Set by the recovery thread when every mailbox is in use (dead workers' mailboxes not
    # yet drained: a crash loop outrunning the recv thread). The recv thread nudges it when
    # it releases one.
    short_of_workers: bool = False
    # Set by the recv thread (on Ack, Result, Heartbeat, Terminate) and by any thread that
    # sends a job not acked to an idle worker (scheduler.assign); enforced by the recovery
    # thread, which sleeps in sigtimedwait() until the earliest one. `wake_at` is when it
    # will wake next: whoever sets an earlier deadline nudges it.
    job_deadlines: dict[int, Deadline] = field(default_factory=dict)  # pid: --timeout
    heartbeat_deadlines: dict[int, Deadline] = field(default_factory=dict)  # pid
    grace_deadline: Deadline | None = None
    # When the recovery thread tries again to fork the workers a refused fork() (EAGAIN,
    # ENOMEM) left the pool short of; set and read by that thread alone.
    fork_retry_at: float | None = None
    wake_at: float = float("inf")
    # Why we killed a worker (timeout, no heartbeat, stopped, grace over, stopped with the
    # pool, preempted), for the recv thread to give as the death of the attempt. Set by
    # whoever sends the SIGKILL, in the same critical section; popped by the recv thread.
    kill_reasons: dict[int, Death] = field(default_factory=dict)
    resends: int = 0
    # Workers Ack every job (see protocol.is_acked); else only those that need it.
    ack_every_job: bool = True
    # Seconds a worker running a job may go without a Heartbeat (None: not watched). The
    # clock starts with the job's Ack; for a job not acked, as the worker takes it: when it
    # is sent to an idle worker, or the worker's Result for the job before it comes.
    heartbeat: float | None = None
    backlog_max: int = BACKLOG_MAX
    backlog_refill: int = BACKLOG_REFILL

    def __post_init__(self) -> None:
        # The send thread waits here once the backlogs are full (see BACKLOG_MAX), until
        # they want a refill; `scheduler.assign` notifies it then, and so does stopping.
        self.backlog_room = threading.Condition(self.lock)

    def backlog_size(self) -> int:
        return sum(len(pool.backlog) for pool in self.pools.values())

    def backlog_has_room(self) -> bool:
        return self.backlog_size() < self.backlog_max

    def backlog_wants_refill(self) -> bool:
        """The send thread, stopped by full backlogs, may read on."""
        return self.backlog_size() <= self.backlog_max - self.backlog_refill

    def pick_worker(self, pool: int) -> WorkerHandle | None:
        """The live worker of `pool` with the fewest outstanding jobs, if any has free
        credit. Idle workers first, so a queued job never waits behind a running one while
        another worker idles."""
        best: WorkerHandle | None = None
        for worker in self.workers.values():
            if worker.pool == pool and len(worker.outstanding) < self.credit:
                if best is None or len(worker.outstanding) < len(best.outstanding):
                    best = worker
                    if not best.outstanding:
                        break
        return best

    def next_deadline(self) -> float:
        deadlines = [d.at for d in self.job_deadlines.values()]
        deadlines += [d.at for d in self.heartbeat_deadlines.values()]
        if self.grace_deadline is not None:
            deadlines.append(self.grace_deadline.at)
        if self.fork_retry_at is not None:
            deadlines.append(self.fork_retry_at)
        return min(deadlines, default=float("inf"))

    def set_deadline(self, table: dict[int, Deadline], pid: int, deadline: Deadline) -> bool:
        """Record a deadline; True if the recovery thread must be nudged to meet it."""
        table[pid] = deadline
        return deadline.at < self.wake_at

    def expect_heartbeat(self, pid: int, now: float) -> bool:
        """Start or restart `pid`'s heartbeat clock; True if the recovery thread must be
        nudged to meet it."""
        if self.heartbeat is None:
            return False
        return self.set_deadline(self.heartbeat_deadlines, pid, Deadline(
            now + self.heartbeat, Death.of(Cause.NO_HEARTBEAT, seconds=self.heartbeat)))

    def forget_deadlines(self, pid: int) -> None:
        self.job_deadlines.pop(pid, None)
        self.heartbeat_deadlines.pop(pid, None)

    def handle_of(self, pid: int) -> WorkerHandle | None:
        """The worker that sent a message: a reaped one first (see `exited`)."""
        return self.exited.get(pid) or self.workers.get(pid)
