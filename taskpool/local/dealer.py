"""The Dealer: hands jobs to workers, records results, recovers from worker deaths.

Threads, and what each may block on::

    send thread      ready queue receive; state.backlog_room wait (backlogs full, until
                     they want a refill);
                     result queue send (EndOfJobs only)
    recv thread      result queue receive; record pipe write to main
    recovery thread  sigwait(); result queue send (see recovery.py)

No thread waits for a free worker: jobs wait in their pool's backlog, and whichever thread
frees a worker or adds a job hands out work under the lock (see scheduler.py). So a job of
a busy pool never holds up the jobs of another, and the send thread always reads on.

The send and recv threads are separate, as in the seed, so that the Dealer never blocks on
sending while workers block on a full result queue. The recv thread is the sink: it never
waits for another thread of ours (its sends to the ready queue are non-blocking tries), so
every other blocked thread or worker is eventually released by it.

No job is lost, whenever a worker dies:
- a job is recorded in its worker's `outstanding` list, under the lock, in the same critical
  section that sends it to that worker's own queue (and removed in the one that takes it
  back, if it does). From then on the Dealer knows exactly which worker holds it, whether
  the worker has read it yet or not; so the seed's window between a worker's receive and
  its ACK does not exist here;
- when a worker dies, the recv thread (after every message the worker sent) drains the dead
  worker's queue: what is still there was never started; what is outstanding and not there
  was taken (at most one job: a worker takes the next job only after sending the result of
  the last). All of them are resent; only the taken one counts an attempt.
No result is doubled: a job is recorded once, by job id, in the recv thread; a late
duplicate is logged and dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, NoReturn

import posix_ipc

from taskpool.local.scheduler import Schedule, assign, enqueue
from taskpool.local.state import (
    NUDGE_SIGNAL,
    Deadline,
    JobState,
    PoolSlots,
    PoolState,
    WorkerHandle,
)
from taskpool.local.supervisor import (
    MAIN_LOST_SIGNAL,
    SUPERVISOR_SIGNALS,
    Supervisor,
    WorkerSetup,
    silence_fork_warning,
)
from taskpool.model.exits import (
    EXIT_ALL_DONE,
    EXIT_INITIALIZER_FAILED,
    EXIT_MEMORY_LIMIT,
    EXIT_STOPPED_EARLY,
    EXIT_THREAD_FAILED,
)
from taskpool.model.faults import CrashPlan
from taskpool.model.jobs import PRIORITY_MAX, Job, JobKind
from taskpool.model.outcome import DealerStats, JobRecord, Status
from taskpool.model.policy import SupervisionPolicy
from taskpool.model.pools import PoolLayout
from taskpool.observe import events as ev
from taskpool.observe import log as tplog
from taskpool.observe.log import event, job_event
from taskpool.posix import mqueue, proc
from taskpool.wire import ProtocolError
from taskpool.wire.calls import CallBatch
from taskpool.wire.queue import (
    MAX_MESSAGE_SIZE,
    Ack,
    EndOfJobs,
    Heartbeat,
    JobBatch,
    JobMessage,
    Result,
    ResultPart,
    Shutdown,
    Stop,
    Terminate,
    WorkerExited,
    decode,
    is_acked,
)
from taskpool.wire.records import encode_done, encode_record

log = logging.getLogger("taskpool.dealer")
recovery_log = logging.getLogger("taskpool.recovery")
supervisor_log = logging.getLogger("taskpool.supervisor")

# Ids of the jobs made by splitting a batch of calls: above any id a caller gives.
SPLIT_ID_BASE = 1 << 62


@dataclass(frozen=True)
class DealerConfig:
    layout: PoolLayout
    plan: CrashPlan
    policy: SupervisionPolicy = SupervisionPolicy()
    preempt: bool = False
    # Queue message sizes: the CLI's messages are small structs; an Executor's carry calls.
    request_message_size: int = MAX_MESSAGE_SIZE
    result_message_size: int = MAX_MESSAGE_SIZE
    initializer: bytes | None = None  # the Executor's pickled (initializer, initargs)

    @property
    def credit(self) -> int:
        """Jobs a worker may hold: one running and one prefetched, or only the running one
        with --preempt (an urgent job must never wait behind a prefetched one)."""
        return 1 if self.preempt else mqueue.WORKER_QUEUE_DEPTH


class RecordWriter:
    """Where the recv thread's outcomes go: JSON lines on main's record pipe. An Executor's
    Dealer writes frames instead (executor_host.FrameWriter). Owned by the recv thread, but
    for the stats, written by the main thread after the others have ended.

    Outcomes are held until `flush`, which the recv thread calls before it blocks (nothing
    more to read for now), and which `write` calls itself once FLUSH_BYTES are held. So
    under load one write, and one wake-up of the reader, carries many outcomes; it was one
    of each per job, two thirds of main's time. An outcome never waits on more work: only
    on the messages already in the result queue, or a failure of a Dealer thread. A lock
    guards what is held, so that the thread that fails (the send thread, say) can flush
    what the recv thread holds before the Dealer exits (`Dealer._guarded`)."""

    # Held at most: PIPE_BUF, so that a write of records stays atomic, and a Dealer
    # killed outright loses at most this much of the outcomes it has (~27 jobs': main
    # reports them not done, and --resume runs them again).
    FLUSH_BYTES = 4096

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # What to do when a write finds our reader gone: the Dealer sets it (_reader_lost).
        self.reader_lost: Callable[[], NoReturn] = _exit_stopped_early
        self.lock = threading.Lock()
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    def done(self, job: Job, result: Result) -> None:
        self.write(encode_done(job, result))

    def failed(self, job: Job, pid: int, attempts: int, reason: str) -> None:
        self.write(encode_record(JobRecord.of(job, Status.FAILED, worker=pid,
                                              attempts=attempts, reason=reason)))

    def stats(self, stats: DealerStats) -> None:
        self.write(encode_record(stats))

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.pending_bytes + len(data) > self.FLUSH_BYTES:
                self._flush()
            self.pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes >= self.FLUSH_BYTES:
                self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        try:
            proc.write_all(self.fd, data)
        except BrokenPipeError:
            self.reader_lost()


def _exit_stopped_early() -> NoReturn:
    mqueue.exit_between_creations(EXIT_STOPPED_EARLY)


class Dealer:
    def __init__(
        self, config: DealerConfig, ready_queue: posix_ipc.MessageQueue, writer: RecordWriter
    ) -> None:
        self.config = config
        self.ready_queue = ready_queue
        self.writer = writer
        self.result_queue = mqueue.create_queue("result", mqueue.RESULT_QUEUE_DEPTH,
                                             config.result_message_size)
        # Acks are asked for where they are used (protocol.is_acked): the job_started
        # event is a DEBUG one.
        ack_every_job = (config.preempt or config.policy.timeout is not None
                         or log.isEnabledFor(logging.DEBUG))
        self.state = PoolState(
            credit=config.credit, preempt=config.preempt,
            pools={p.number: PoolSlots(p.number, p.size) for p in config.layout.pools},
            ack_every_job=ack_every_job, heartbeat=config.policy.heartbeat)
        # Owned by the recv thread alone: no lock.
        self.expected_total: int | None = None
        self.recorded = 0
        # Jobs made by splitting a crashed batch, beyond the one each replaced.
        self.split_extra = 0
        self.next_split_id = SPLIT_ID_BASE
        # A result too large for one message, so far, by (worker pid, job id).
        self.result_parts: dict[tuple[int, int], list[bytes]] = {}
        self.terminated = False
        self.stop_reason: str | None = None
        self.idle_deaths: deque[float] = deque()  # when workers died without taking a job
        self.supervisor = Supervisor(
            self.state,
            WorkerSetup(self.result_queue, config.plan, config.policy, config.layout,
                        config.initializer, config.request_message_size, ack_every_job),
        )
        writer.reader_lost = self._reader_lost

    def run(self) -> int:
        layout = self.config.layout
        pools = f" ({layout.describe()})" if layout.typed else ""
        log.info("Starting (PID %d) with %d workers%s", os.getpid(), layout.total_workers, pools,
                 extra=event(ev.DEALER_STARTED, workers=layout.total_workers,
                             pools={p.number: p.size for p in layout.pools}))
        supervisor_log.info("%s", self.config.policy.describe())
        threads = [
            self.supervisor,
            threading.Thread(target=self._guarded(self._recv_loop), name="recv", daemon=True),
        ]
        for thread in threads:
            thread.start()
        # No job is sent before the whole pool is up: a pool that cannot start its workers
        # (the queue budget, say) runs nothing rather than a part of the pool.
        self.supervisor.pool_started.wait()
        if self.supervisor.failure is None:
            threads.append(
                threading.Thread(target=self._guarded(self._send_loop), name="send", daemon=True))
            threads[-1].start()
        for thread in threads:
            thread.join()
        for queue in self.state.spare_queues:
            queue.close()
        if self.supervisor.failure is not None and self.stop_reason is None:
            self.stop_reason = f"the pool could not start its workers: {self.supervisor.failure}"
        with self.state.lock:
            pool_stats = [{"type": p.number, "workers": p.size, "crashes": p.crashes,
                      "restarts": max(0, p.forked - p.size)}
                     for p in self.state.pools.values()]
        stats = DealerStats(crashes=sum(p["crashes"] for p in pool_stats),
                            resends=self.state.resends,
                            stop_reason=self.stop_reason, pools=pool_stats)
        self.writer.stats(stats)
        self.writer.flush()
        self.result_queue.close()
        self.ready_queue.close()
        log.info("Shutting down.", extra=event(ev.DEALER_STOPPED))
        if self.terminated or self.supervisor.failure is not None:
            return EXIT_STOPPED_EARLY
        return EXIT_ALL_DONE

    def _reader_lost(self) -> NoReturn:
        """A write to main (or to the Executor's caller) failed: it is gone. End as on main's
        parent-death signal, which may come before or after this: the recovery thread kills
        and reaps the workers, then exits the process. Exiting here instead would leave the
        workers to their death signal, and their exit statuses to whatever process adopts
        them, which may never reap (a container's PID 1 that is no init, say). Called by
        any thread but the recovery thread, with no lock of PoolState held (that thread
        takes it to kill the workers)."""
        os.kill(os.getpid(), MAIN_LOST_SIGNAL)
        self.supervisor.join()  # not reached if it takes the signal: it exits the process
        # It had ended already, and killed and reaped the workers as it did.
        mqueue.exit_between_creations(EXIT_STOPPED_EARLY)

    def _guarded(self, loop: Callable[[], None]) -> Callable[[], None]:
        """A bug in the send or recv thread must end the run loudly, not leave the other
        threads waiting for it. Let it crash: the Dealer exits, main reports it lost (keeping
        every recorded result: the outcomes the recv thread holds are written first, whichever
        thread failed), and PR_SET_PDEATHSIG takes the workers with it."""

        def run() -> None:
            try:
                loop()
            except BaseException:
                log.exception("The %s thread failed", threading.current_thread().name)
                try:
                    self.writer.flush()
                finally:
                    mqueue.exit_between_creations(EXIT_THREAD_FAILED)

        return run

    # --- send thread -----------------------------------------------------------------

    def _send_loop(self) -> None:
        """Owns: taking jobs from the ready queue into their pool's backlog. The ready
        queue gives the highest message priority (= job priority) first."""
        state = self.state
        while not state.stopping:
            data, _ = self.ready_queue.receive()
            try:
                message = decode(data)
            except ProtocolError as e:
                log.error("Dropped a malformed message from the generator: %s", e)
                continue
            if isinstance(message, Stop):
                return
            if isinstance(message, EndOfJobs):
                # Ordered after every job the generator sent (it has the lowest priority,
                # and came last); the recv thread owns the count of what is recorded, so
                # it decides when all is done.
                self.result_queue.send(message.encode())
                continue
            if isinstance(message, JobMessage):
                jobs: tuple[Job, ...] = (message.job,)
            elif isinstance(message, JobBatch):
                jobs = message.jobs
            else:
                continue
            dropped = []
            with state.lock:
                pools = set()
                for job in jobs:
                    if job.job_id in state.jobs:
                        dropped.append(f"Dropped job {job.job_id}: its id was already taken")
                    elif job.pool not in state.pools:
                        dropped.append(f"Dropped job {job.job_id}: no pool of type {job.pool}")
                    else:
                        state.jobs[job.job_id] = JobState(job)
                        enqueue(state, job.job_id)
                        pools.add(job.pool)
                schedule = Schedule()
                for pool in sorted(pools):
                    assign(state, pool, schedule)
                full = not state.backlog_has_room()
            for reason in dropped:
                log.error("%s", reason)
            schedule.log(self.config.layout)
            if full:
                # Bounded memory: once the backlogs are full, read no further until they
                # want a refill (room for a run of jobs, not one).
                with state.lock:
                    while not state.backlog_wants_refill() and not state.stopping:
                        state.backlog_room.wait()

    # --- recv thread -----------------------------------------------------------------

    def _recv_loop(self) -> None:
        """Owns: the job records, the all-done decision, and what to resend after a death.
        Ends when the pool is stopping and every worker's exit has been seen."""
        state = self.state
        while True:
            try:
                data, _ = self.result_queue.receive(timeout=0)
            except posix_ipc.BusyError:
                self.writer.flush()  # before blocking: main gets what is recorded so far
                data, _ = self.result_queue.receive()
            try:
                message = decode(data)
            except ProtocolError as e:
                log.error("Dropped a malformed message from a worker: %s", e)
                continue
            if isinstance(message, Result):
                self._on_result(self._joined(message))
            elif isinstance(message, ResultPart):
                self.result_parts.setdefault((message.pid, message.job_id), []).append(
                    message.piece)
            elif isinstance(message, Ack):
                self._on_ack(message)
            elif isinstance(message, Heartbeat):
                self._on_heartbeat(message)
            elif isinstance(message, WorkerExited):
                self._on_worker_exited(message)
            elif isinstance(message, EndOfJobs):
                self.expected_total = message.total
            elif isinstance(message, Terminate):
                self._terminate(message.signum)
            if not state.stopping and self.expected_total is not None \
                    and self.recorded == self.expected_total + self.split_extra:
                log.info("All jobs completed. Shutting down workers...",
                         extra=event(ev.ALL_JOBS_COMPLETED, jobs=self.recorded))
                self._stop_pool(kill=False)
            if state.stopping:
                with state.lock:
                    all_gone = not state.workers and not state.exited
                if all_gone:
                    self.writer.flush()  # not under the lock: see _reader_lost
                    return

    def _on_ack(self, ack: Ack) -> None:
        """The job has started: from now on its timeout and the heartbeat run."""
        policy = self.config.policy
        state = self.state
        now = time.monotonic()
        schedule = Schedule()  # its log() also nudges the recovery thread, if asked to
        with state.lock:
            job_state = state.jobs.get(ack.job_id)
            worker = state.handle_of(ack.pid)
            if worker is not None:
                worker.took_a_job = True
                worker.running = ack.job_id
                if state.preempt and state.pools[worker.pool].backlog:
                    assign(state, worker.pool, schedule)  # it may now be preempted
            if ack.pid in state.workers and job_state is not None:
                timeout = job_state.job.timeout or policy.timeout
                if timeout is not None:
                    reason = f"ran job {ack.job_id} past its timeout of {timeout:g} s"
                    schedule.nudge |= state.set_deadline(
                        state.job_deadlines, ack.pid, Deadline(now + timeout, reason))
                schedule.nudge |= state.expect_heartbeat(ack.pid, now)
        schedule.log(self.config.layout)
        # The assignment is already known; an Ack only says the job started.
        if log.isEnabledFor(logging.DEBUG):  # once per job: skip building a dropped event
            log.debug("Job %d started by worker PID [%d] (ACK, attempt %d)",
                      ack.job_id, ack.pid, ack.attempt,
                      extra=event(ev.JOB_STARTED, job=ack.job_id, worker=ack.pid,
                                  attempt=ack.attempt))

    def _on_heartbeat(self, heartbeat: Heartbeat) -> None:
        with self.state.lock:
            # Only while the worker runs a job: a late beat after its Result is ignored.
            if heartbeat.pid in self.state.heartbeat_deadlines:
                self.state.expect_heartbeat(heartbeat.pid, time.monotonic())

    def _on_result(self, result: Result) -> None:
        state = self.state
        schedule = Schedule()  # its log() also nudges the recovery thread, if asked to
        with state.lock:
            state.forget_deadlines(result.pid)
            worker = state.handle_of(result.pid)
            if worker is not None:
                worker.running = None
                worker.took_a_job = True
                if result.job_id in worker.outstanding:
                    worker.outstanding.remove(result.job_id)
                if (worker.outstanding and state.workers.get(result.pid) is worker
                        and not is_acked(state.jobs[worker.outstanding[0]].job,
                                         state.ack_every_job)):
                    # It takes its next job now (it sent this Result first); no Ack will
                    # say so.
                    schedule.nudge |= state.expect_heartbeat(result.pid, time.monotonic())
            job_state = state.jobs.get(result.job_id)
            duplicate = job_state is not None and job_state.recorded
            if job_state is not None:
                job_state.recorded = True
            if worker is not None and result.pid in state.workers:
                assign(state, worker.pool, schedule)
        schedule.log(self.config.layout)
        if job_state is None:
            log.error("Dropped a result for unknown job %d", result.job_id)
            return
        if duplicate:
            log.info("Dropped duplicate result for job %d from worker PID [%d]",
                     result.job_id, result.pid,
                     extra=event(ev.DUPLICATE_DROPPED, job=result.job_id, worker=result.pid))
            return
        self.recorded += 1
        self.writer.done(job_state.job, result)
        job_event(log, ev.JOB_DONE, "Received result for job %d: %s from worker PID [%d]",
                  result.job_id, result.value, result.pid,
                  job=result.job_id, worker=result.pid, attempt=result.attempt,
                  result=result.value)

    def _on_worker_exited(self, exited: WorkerExited) -> None:
        """The worker is dead and all its messages were handled: resend what it held, fail
        a job that has used up its attempts, and give up on a pool whose workers die
        before they take any job."""
        for key in [key for key in self.result_parts if key[0] == exited.pid]:
            del self.result_parts[key]  # the rest of that result will never come
        state = self.state
        policy = self.config.policy
        crashed: list[int] = []  # taken by the worker: this attempt failed; sent again
        failed: list[JobState] = []  # taken, and out of attempts
        requeued: list[int] = []  # still in its queue: never started
        preempted: list[int] = []  # taken, and stopped to make room: sent again, no attempt
        split: dict[int, list[int]] = {}  # a taken batch of calls: each sent again alone
        reason, charged, requeue = self._death_reason(exited)
        schedule = Schedule()
        # The resends happen here, before the jobs are sent again under the lock below;
        # the log lines come later, so they carry this time.
        handled_at = time.monotonic()
        with state.lock:
            worker = state.exited.pop(exited.pid, None)
            if worker is None:
                return
            pool = state.pools[worker.pool]
            if pool.preempting == exited.pid:
                pool.preempting = None
            state.forget_deadlines(exited.pid)
            never_started = self._drain(worker)
            # Not acked, a job it took is one it held and that was not in its queue.
            never_took_a_job = not worker.took_a_job and all(
                job_id in never_started for job_id in worker.outstanding)
            if state.short_of_workers and not state.stopping:
                state.spare_queues.append(worker.request_queue)  # empty now: reusable
                os.kill(os.getpid(), NUDGE_SIGNAL)
            else:
                worker.request_queue.close()
                state.queues_closed += 1
            for job_id in worker.outstanding:
                job_state = state.jobs[job_id]
                if job_state.recorded:
                    continue
                if job_id in never_started:
                    requeued.append(job_id)
                    continue
                if requeue:
                    preempted.append(job_id)
                    continue
                if not charged:
                    continue  # stopped by us, not by its own fault: reported not done
                if job_state.job.kind is JobKind.CALL and int(job_state.job.arg) > 1:
                    split[job_id] = self._split(job_state)
                    continue
                job_state.failed_attempts += 1
                job_state.last_failure = reason
                if policy.max_attempts and job_state.failed_attempts >= policy.max_attempts:
                    job_state.recorded = True
                    failed.append(job_state)
                else:
                    crashed.append(job_id)
            if not state.stopping:
                singles = [single for ids in split.values() for single in ids]
                for job_id in crashed + requeued + preempted + singles:
                    enqueue(state, job_id)
                state.resends += len(crashed)
                assign(state, worker.pool, schedule)
        for job_state in failed:
            self._record_failure(job_state, exited.pid)
        if state.stopping:
            if crashed:
                supervisor_log.info("Worker PID %d %s while stopping: job(s) %s not done",
                                    exited.pid, reason, ", ".join(map(str, crashed)),
                                    extra=event(ev.JOBS_NOT_DONE, jobs=crashed,
                                                worker=exited.pid, reason=reason))
            return
        for job_id in crashed:
            recovery_log.info("Resent job %d after crash of %d", job_id, exited.pid,
                              extra=event(ev.JOB_RESENT, at=handled_at, job=job_id,
                                          worker=exited.pid, reason=reason))
        for job_id, singles in split.items():
            recovery_log.info("Resent job %d after crash of %d: its %d calls one by one, as "
                              "jobs %d-%d", job_id, exited.pid, len(singles), singles[0],
                              singles[-1],
                              extra=event(ev.JOB_SPLIT, at=handled_at, job=job_id,
                                          worker=exited.pid, reason=reason, jobs=singles))
        for job_id in requeued:
            recovery_log.info("Requeued job %d: it was waiting, unstarted, for %d",
                              job_id, exited.pid,
                              extra=event(ev.JOB_REQUEUED, at=handled_at, job=job_id,
                                          worker=exited.pid, reason="unstarted"))
        for job_id in preempted:
            recovery_log.info("Requeued job %d: preempted on %d", job_id, exited.pid,
                              extra=event(ev.JOB_REQUEUED, at=handled_at, job=job_id,
                                          worker=exited.pid, reason="preempted"))
        schedule.log(self.config.layout)
        if never_took_a_job and not crashed and not failed and not requeue:
            self._count_idle_death(reason)

    def _split(self, job_state: JobState) -> list[int]:
        """A batch of calls whose worker died in it becomes one job per call, sent again
        without an attempt charged: which call killed the worker is not known, and the
        others must not pay for it. Only a single call's death counts an attempt, so a
        poison call fails alone after --max-attempts. Called with the lock held."""
        job = job_state.job
        ids = []
        for single in CallBatch.decode(job.payload).split():
            ids.append(self.next_split_id)
            self.state.jobs[self.next_split_id] = JobState(dataclasses.replace(
                job, job_id=self.next_split_id, arg=1, payload=single.encode()))
            self.next_split_id += 1
        job_state.recorded = True  # accounted for by its calls' jobs
        self.split_extra += len(ids) - 1
        return ids

    def _death_reason(self, exited: WorkerExited) -> tuple[str, bool, bool]:
        """Why the worker died, whether that charges the job it held an attempt, and
        whether the job goes back to the backlog without one (a preemption)."""
        with self.state.lock:
            killed_for = self.state.kill_reasons.pop(exited.pid, None)
        if killed_for is not None:
            # A preempted worker that died of something else first (a crash job, say) is
            # charged as any crash.
            status = exited.wait_status
            by_us = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            if killed_for.requeue and not by_us:
                return proc.describe_wait_status(status), True, False
            return killed_for.reason, killed_for.charges_attempt, killed_for.requeue
        status = exited.wait_status
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_INITIALIZER_FAILED:
            return "exited: its initializer raised (the traceback is in the log)", True, False
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_MEMORY_LIMIT:
            return f"memory limit ({self.config.policy.max_memory_mb} MB)", True, False
        return proc.describe_wait_status(status), True, False

    def _record_failure(self, job_state: JobState, pid: int) -> None:
        job = job_state.job
        attempts = job_state.failed_attempts
        self.recorded += 1
        self.writer.failed(job, pid, attempts, f"{job_state.last_failure} on {attempts} attempts")
        supervisor_log.info("Job %d failed after %d attempts: %s", job.job_id, attempts,
                            job_state.last_failure,
                            extra=event(ev.JOB_FAILED, job=job.job_id, worker=pid,
                                        attempts=attempts, reason=job_state.last_failure))

    def _count_idle_death(self, reason: str) -> None:
        """Restart intensity: too many workers dead before they ever took a job, too fast,
        means a pool that cannot work (a crash loop at start-up): stop it rather than fork
        forever. A worker that died during a job, or idle after doing some, is not
        counted: jobs are bounded by --max-attempts instead."""
        policy = self.config.policy
        now = time.monotonic()
        self.idle_deaths.append(now)
        while self.idle_deaths and self.idle_deaths[0] < now - policy.restart_window:
            self.idle_deaths.popleft()
        if len(self.idle_deaths) > policy.max_restarts and not self.state.stopping:
            self.stop_reason = (
                f"{len(self.idle_deaths)} workers died without taking a job within "
                f"{policy.restart_window:g} s (max_restarts={policy.max_restarts}); the "
                f"last {reason}")
            supervisor_log.error("Giving up: %s", self.stop_reason,
                                 extra=event(ev.GAVE_UP, reason=self.stop_reason))
            self.terminated = True
            self._stop_pool(kill=True)

    @staticmethod
    def _drain(worker: WorkerHandle) -> set[int]:
        """Take back the jobs still waiting in a dead worker's queue."""
        waiting: set[int] = set()
        while True:
            try:
                data, _ = worker.request_queue.receive(timeout=0)
            except posix_ipc.BusyError:
                return waiting
            try:
                message = decode(data)
            except ProtocolError:
                continue
            if isinstance(message, JobMessage):
                waiting.add(message.job.job_id)

    def _terminate(self, signum: int) -> None:
        """SIGTERM (from main, on Ctrl-C or SIGTERM): take back the jobs not started, let
        the running ones finish within the grace period, then kill what is left. A second
        SIGTERM, or a supervisor that cannot go on (signum 0), kills at once."""
        state = self.state
        if signum == 0 or self.terminated:
            self.terminated = True
            self.stop_reason = self.stop_reason or (
                None if signum else "the pool could not keep its workers")
            with state.lock:
                running = sum(1 for w in state.workers.values() if w.outstanding)
            log.info("Stopping now: killing %d running jobs", running,
                     extra=event(ev.STOPPING, running=running, grace=0))
            self._stop_pool(kill=True)
            return
        if state.stopping:
            return  # all jobs are done and the workers are already shutting down
        self.terminated = True
        grace = self.config.policy.grace
        with state.lock:
            state.stopping = True
            for worker in state.workers.values():
                taken_back = self._drain(worker)
                worker.outstanding = [j for j in worker.outstanding if j not in taken_back]
                if not worker.outstanding:
                    state.heartbeat_deadlines.pop(worker.pid, None)  # idle: owes no beat
                # The queue is empty now: never blocks. The worker reads it after its job.
                worker.request_queue.send(Shutdown().encode(), timeout=0)
            running = sum(1 for w in state.workers.values() if w.outstanding)
            not_started = sum(1 for s in state.jobs.values() if not s.recorded) - running
            state.grace_deadline = Deadline(time.monotonic() + grace,
                                            f"was still running when the {grace:g} s grace "
                                            "period ended", charges_attempt=False)
            state.backlog_room.notify_all()
        log.info("Stopping on signal %d: letting %d running jobs finish (grace %g s); "
                 "%d jobs not started", signum, running, grace, not_started,
                 extra=event(ev.STOPPING, running=running, grace=grace,
                             not_started=not_started))
        self._stop_send_thread()
        os.kill(os.getpid(), NUDGE_SIGNAL)  # to set its timer for the grace deadline

    def _stop_pool(self, kill: bool) -> None:
        """Set stopping, and end every worker: a Shutdown message when all jobs are done,
        SIGKILL when terminated (a Shutdown would wait behind queued jobs)."""
        state = self.state
        with state.lock:
            state.stopping = True
            for worker in state.workers.values():
                # Not reaped yet (reaping moves a worker out of `workers` under this lock),
                # so the pid is still this worker's.
                if kill:
                    state.kill_reasons[worker.pid] = Deadline(
                        time.monotonic(), "was stopped with the pool", charges_attempt=False)
                    os.kill(worker.pid, signal.SIGKILL)
                else:
                    try:
                        # With all jobs done, every worker's queue is empty: never blocks.
                        worker.request_queue.send(Shutdown().encode(), timeout=0)
                    except posix_ipc.BusyError:
                        os.kill(worker.pid, signal.SIGKILL)
            state.backlog_room.notify_all()
        self._stop_send_thread()
        # The recovery thread may be waiting with no worker left to wake it.
        os.kill(os.getpid(), NUDGE_SIGNAL)

    def _stop_send_thread(self) -> None:
        """Stop, to the send thread: at the top priority, so that it comes before any job.
        If the ready queue is full, the send thread is not blocked in receive: it sees
        `stopping` at the top of its loop, after its next message."""
        try:
            self.ready_queue.send(Stop().encode(), timeout=0, priority=PRIORITY_MAX)
        except posix_ipc.BusyError:
            pass

    def _joined(self, result: Result) -> Result:
        parts = self.result_parts.pop((result.pid, result.job_id), None)
        if parts is None:
            return result
        return dataclasses.replace(result, payload=b"".join(parts) + result.payload)


def run_dealer(
    config: DealerConfig,
    ready_queue: posix_ipc.MessageQueue,
    record_fd: int,
    main_pid: int,
) -> NoReturn:
    """The Dealer process, forked by main. Leaves only through os._exit(), by way of
    `mqueue.exit_between_creations`."""
    code = EXIT_STOPPED_EARLY
    try:
        proc.set_parent_death_signal(main_pid, MAIN_LOST_SIGNAL)
        silence_fork_warning()
        # Blocked before any thread starts, so that all inherit the mask: the recovery
        # thread alone takes these signals, with sigwait().
        proc.reset_signals_in_child(blocked=SUPERVISOR_SIGNALS)
        # A handler for SIGCHLD, so that the kernel queues it for sigwait() rather than
        # discarding it as default-ignored. It never runs: SIGCHLD stays blocked.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        proc.redirect_stdin_to_devnull()
        proc.close_fds_except({0, 1, 2, ready_queue.mqd, record_fd} | tplog.descriptors())
        code = Dealer(config, ready_queue, RecordWriter(record_fd)).run()
    except mqueue.QueueLimitError as e:
        log.error("Cannot start: %s", e)
    except BaseException:
        log.exception("Dealer failed")
    finally:
        mqueue.exit_between_creations(code)
