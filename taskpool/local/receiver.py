"""The recv thread: every message of the result queue, in order, and what follows from it.

It reads what the workers send (Ack, Heartbeat, Result and its parts, or a Result whose
payload was handed over out of the queue: posix/handoff.py), what the recovery
thread posts (WorkerExited, Terminate) and the send thread's EndOfJobs. It owns the job
records, the all-done decision, and, through Recovery (recovery.py), what to resend after
a death. It is the sink: it never waits for another thread of ours (its sends to workers'
queues are non-blocking by construction), so every other blocked thread or worker is
eventually released by it. It blocks only on the result queue's receive and on the record
pipe's write to main.

No result is doubled: a job is recorded once, by job id, here; a late duplicate is logged
and dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass, field

import posix_ipc

from taskpool.core.commands import TERM_GRACE
from taskpool.core.supervision import (
    Cause,
    Death,
    Decision,
    Verdict,
    after_failure,
    failure_of,
    halt_due,
)
from taskpool.local.records import RecordWriter, Tally
from taskpool.local.recovery import Recovery
from taskpool.local.scheduler import Schedule, assign, enqueue
from taskpool.local.state import Deadline, JobState, PoolState, WorkerHandle
from taskpool.local.stopping import Stopper
from taskpool.model.jobs import COMMAND_KINDS, PROCESS_KINDS
from taskpool.model.policy import SupervisionPolicy
from taskpool.model.pools import PoolLayout
from taskpool.observe import events as ev
from taskpool.observe.log import dealer_log as log
from taskpool.observe.log import event, job_event
from taskpool.posix.handoff import PayloadHandoff
from taskpool.wire import ProtocolError, decoded_or_dropped
from taskpool.wire.commands import Ending
from taskpool.wire.queue import (
    Ack,
    EndOfJobs,
    Heartbeat,
    Message,
    Result,
    ResultHandedOver,
    ResultPart,
    Terminate,
    WorkerExited,
    decode,
    is_acked,
)

# How long after a command's timeout and TERM_GRACE the Dealer kills its worker, if the
# worker has not ended the command itself: the worker's own wake-up is late only on a
# machine under heavy load.
COMMAND_SLACK = 1.0


def _ending_of(result: Result) -> tuple[Ending | None, Death | None]:
    """How a job of real work ended, and the failure it was if it failed; (None, None) for
    any other job."""
    if result.kind not in COMMAND_KINDS:
        return None, None
    try:
        ending = Ending.decode(result.payload)
    except ProtocolError as e:
        log.error("A malformed ending of job %d: %s", result.job_id, e)
        ending = Ending(0.0, error=f"its worker sent a malformed outcome ({e})")
    return ending, failure_of(result.kind, ending)


@dataclass
class Receiver:
    """Owns: the job records, the all-done decision, and what to resend after a death.
    Ends when the pool is stopping and every worker's exit has been seen."""

    state: PoolState
    result_queue: posix_ipc.MessageQueue
    writer: RecordWriter
    tally: Tally
    recovery: Recovery
    stopper: Stopper
    policy: SupervisionPolicy
    layout: PoolLayout
    # The jobs this run sends, when known before they are read (a job file): the base of
    # --halt fail=P%. None: the jobs read so far.
    jobs_total: int | None = None
    # Where the workers hand over payloads too large for a message (an Executor's pool:
    # posix/handoff.py); None: they come in parts.
    handoff: PayloadHandoff | None = None
    # A result too large for one message, so far, by (worker pid, job id). Ours alone.
    result_parts: dict[tuple[int, int], list[bytes]] = field(default_factory=dict)
    failures_seen: int = 0  # the failures --halt has judged so far

    def run(self) -> None:
        state = self.state
        while True:
            message = self._next_message()
            if message is None:
                continue
            self._handle(message)
            if not state.stopping and self.tally.all_recorded():
                log.info("All jobs completed. Shutting down workers...",
                         extra=event(ev.ALL_JOBS_COMPLETED, jobs=self.tally.recorded))
                self.stopper.stop_pool(kill=False)
            elif not state.stopping and self.tally.failed > self.failures_seen:
                self._judge_failures()
            if state.stopping and self._all_workers_gone():
                self.writer.flush()  # not under the lock: see Dealer._reader_lost
                return

    def _judge_failures(self) -> None:
        """A job failed since the last look: halt the run if --halt says so."""
        self.failures_seen = self.tally.failed
        jobs = self.jobs_total or self.tally.expected_total
        if jobs is None:
            with self.state.lock:
                jobs = len(self.state.jobs)
        halt = halt_due(self.policy.halt, self.tally.failed, jobs)
        if halt is not None:
            self.stopper.halt(halt)

    def _next_message(self) -> Message | None:
        try:
            data, _ = self.result_queue.receive(timeout=0)
        except posix_ipc.BusyError:
            self.writer.flush()  # before blocking: main gets what is recorded so far
            data, _ = self.result_queue.receive()
        return decoded_or_dropped(decode, data, log, "message from a worker")

    def _handle(self, message: Message) -> None:
        if isinstance(message, Result):
            self._on_result(self._joined(message))
        elif isinstance(message, ResultHandedOver):
            result = self._taken(message)
            if result is not None:
                self._on_result(result)
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
            self.tally.expected_total = message.total
        elif isinstance(message, Terminate):
            self.stopper.terminate(message.signum)

    def _all_workers_gone(self) -> bool:
        with self.state.lock:
            return not self.state.workers and not self.state.exited

    def _on_ack(self, ack: Ack) -> None:
        """The job has started: from now on its timeout and the heartbeat run."""
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
                timeout = job_state.job.timeout or self.policy.timeout
                if timeout is not None:
                    # A command's worker ends it itself at its timeout, and exits: ours is
                    # the backstop, once its TERM_GRACE is over too.
                    slack = (TERM_GRACE + COMMAND_SLACK
                             if job_state.job.kind in PROCESS_KINDS else 0.0)
                    schedule.nudge |= state.set_deadline(state.job_deadlines, ack.pid, Deadline(
                        now + timeout + slack,
                        Death.of(Cause.TIMED_OUT, job=ack.job_id, seconds=timeout)))
                schedule.nudge |= state.expect_heartbeat(ack.pid, now)
        schedule.log(self.layout)
        # The assignment is already known; an Ack only says the job started.
        job_event(log, ev.JOB_STARTED, "Job %d started by worker PID [%d] (ACK, attempt %d)",
                  ack.job_id, ack.pid, ack.attempt, level=logging.DEBUG,
                  job=ack.job_id, worker=ack.pid, attempt=ack.attempt)

    def _on_heartbeat(self, heartbeat: Heartbeat) -> None:
        with self.state.lock:
            # Only while the worker runs a job: a late beat after its Result is ignored.
            if heartbeat.pid in self.state.heartbeat_deadlines:
                self.state.expect_heartbeat(heartbeat.pid, time.monotonic())

    def _on_result(self, result: Result) -> None:
        state = self.state
        schedule = Schedule()  # its log() also nudges the recovery thread, if asked to
        ending, failure = _ending_of(result)
        decision = None
        with state.lock:
            worker = self._free_worker(result, schedule)
            job_state = state.jobs.get(result.job_id)
            duplicate = job_state is not None and job_state.recorded
            # Reaped, its death maybe logged already: the result left it before it died.
            from_the_dead = result.pid in state.exited
            if job_state is not None and not duplicate:
                decision = self._settle(job_state, failure)
            if worker is not None and result.pid in state.workers:
                assign(state, worker.pool, schedule)  # it lives: hand it more
        schedule.log(self.layout)
        if job_state is None:
            log.error("Dropped a result for unknown job %d", result.job_id)
            return
        if duplicate:
            log.info("Dropped duplicate result for job %d from worker PID [%d]",
                     result.job_id, result.pid,
                     extra=event(ev.DUPLICATE_DROPPED, job=result.job_id, worker=result.pid))
            return
        if ending is not None:
            self._on_ended(job_state, result, ending, failure, decision)
            return
        self.tally.recorded += 1
        self.writer.done(job_state.job, result)
        if from_the_dead:
            job_event(log, ev.JOB_DONE, "Received result for job %d: %s from worker PID [%d] "
                      "(sent before it died)", result.job_id, result.value, result.pid,
                      job=result.job_id, worker=result.pid, attempt=result.attempt,
                      result=result.value, sent_before_death=True)
            return
        job_event(log, ev.JOB_DONE, "Received result for job %d: %s from worker PID [%d]",
                  result.job_id, result.value, result.pid,
                  job=result.job_id, worker=result.pid, attempt=result.attempt,
                  result=result.value)

    def _settle(self, job_state: JobState, failure: Death | None) -> Decision | None:
        """A result's job is recorded; or, if it ran and failed and the policy runs it again
        (retry_failed), back in its backlog. Called with the lock held."""
        if failure is None:
            job_state.recorded = True
            return None
        decision = after_failure(failure, job_state.failed_runs, self.policy,
                                 stopping=self.state.stopping)
        job_state.failed_runs = decision.failed_attempts
        if decision.verdict is Verdict.RESEND:
            enqueue(self.state, job_state.job.job_id)
            self.state.resends += 1
        else:
            job_state.recorded = True
        return decision

    def _on_ended(self, job_state: JobState, result: Result, ending: Ending,
                  failure: Death | None, decision: Decision | None) -> None:
        """A job of real work ran to its end: record it done or failed, or say it runs
        again."""
        job_id = result.job_id
        if decision is not None and decision.verdict is Verdict.RESEND:
            assert failure is not None
            log.info("Job %d %s: running it again (%d of %d)", job_id, failure.reason,
                     decision.failed_attempts, self.policy.retry_failed,
                     extra=event(ev.JOB_RESENT, job=job_id, worker=result.pid,
                                 reason=failure.reason))
            return
        self.tally.recorded += 1
        if failure is not None:
            self.tally.failed += 1
        self.writer.ended(job_state.job, result, ending, failure)
        if failure is None:
            job_event(log, ev.JOB_DONE, "Received result for job %d: %s from worker PID [%d]",
                      job_id, ending.exit_status if ending.result is None else ending.result,
                      result.pid, job=job_id, worker=result.pid, attempt=result.attempt,
                      result=ending.result, exit_status=ending.exit_status)
            return
        log.info("Job %d failed: %s", job_id, failure.reason,
                 extra=event(ev.JOB_FAILED, job=job_id, worker=result.pid,
                             attempts=result.attempt, reason=failure.reason,
                             exit_status=ending.exit_status))

    def _free_worker(self, result: Result, schedule: Schedule) -> WorkerHandle | None:
        """The worker that sent `result` is done with that job: forget its deadlines, and
        start the heartbeat clock of its next job. Called with the lock held."""
        state = self.state
        state.forget_deadlines(result.pid)
        worker = state.handle_of(result.pid)
        if worker is None:
            return None
        worker.running = None
        worker.took_a_job = True
        if result.job_id in worker.outstanding:
            worker.outstanding.remove(result.job_id)
        if (worker.outstanding and state.workers.get(result.pid) is worker
                and not is_acked(state.jobs[worker.outstanding[0]].job, state.ack_every_job)):
            # It takes its next job now (it sent this Result first); no Ack will say so.
            schedule.nudge |= state.expect_heartbeat(result.pid, time.monotonic())
        return worker

    def _on_worker_exited(self, exited: WorkerExited) -> None:
        for key in [key for key in self.result_parts if key[0] == exited.pid]:
            del self.result_parts[key]  # the rest of that result will never come
        if self.handoff is not None:
            self.handoff.forget(exited.pid)  # what it handed over and never announced
        self.recovery.on_worker_exited(exited)

    def _taken(self, message: ResultHandedOver) -> Result | None:
        """The Result whose payload was handed over before `message`; None if it cannot be
        read. Then, as if the worker had died before sending it: the worker is ended (the
        attempt's death, RESULT_LOST), and the job runs again."""
        payload = None
        if self.handoff is not None:
            payload = self.handoff.take((message.pid, message.job_id, message.attempt),
                                        message.size)
        if payload is not None:
            return message.with_payload(payload)
        death = Death.of(Cause.RESULT_LOST, size=message.size)
        log.error("Worker PID [%d] %s (job %d): ending it, so that the job runs again",
                  message.pid, death.reason, message.job_id)
        state = self.state
        with state.lock:
            if message.pid in state.workers:  # not reaped: the pid is still ours
                state.forget_deadlines(message.pid)
                state.kill_reasons[message.pid] = death
                os.kill(message.pid, signal.SIGKILL)
        return None

    def _joined(self, result: Result) -> Result:
        parts = self.result_parts.pop((result.pid, result.job_id), None)
        if parts is None:
            return result
        return dataclasses.replace(result, payload=b"".join(parts) + result.payload)
