"""Recovery: what the recv thread does when a worker's death reaches it.

    WorkerExited          posted by the recovery thread (supervisor.py) once it reaped the
        │                 worker: after every message the worker sent
        v
    death_of()            why it died, as a Death (core/supervision.py)
    Recovery._take_back   the jobs it held, and which of them were still in its mailbox
    after_death()         for each: RESEND | FAIL | REQUEUE | SPLIT | NOT_DONE
    Recovery._resend      back in the backlog, and handed out again: all under the lock
    Recovery._log         once the lock is released, one line for each job
    RestartIntensity      a worker that never took a job: too many, too fast, and we give up

No job is lost, whenever a worker dies:
- a job is recorded in its worker's `outstanding` list, under the lock, in the same critical
  section that sends it to that worker's own mailbox (and removed in the one that takes it
  back, if it does). From then on the Dealer knows exactly which worker holds it, whether
  the worker has read it yet or not; so the seed's window between a worker's receive and
  its ACK does not exist here;
- when a worker dies, the recv thread (after every message the worker sent) drains the dead
  worker's mailbox: what is still there was never started; what is outstanding and not there
  was taken (at most one job: a worker takes the next job only after sending the result of
  the last). All of them are resent; only the taken one counts an attempt.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field

from taskpool.core.supervision import (
    Cause,
    Death,
    Decision,
    RestartIntensity,
    Verdict,
    after_death,
)
from taskpool.local.records import RecordWriter, Tally
from taskpool.local.scheduler import Schedule, assign, enqueue
from taskpool.local.state import NUDGE_SIGNAL, JobState, PoolState, WorkerHandle
from taskpool.local.stopping import Stopper
from taskpool.model.exits import (
    EXIT_COMMAND_TIMED_OUT,
    EXIT_INITIALIZER_FAILED,
    EXIT_MEMORY_LIMIT,
    EXIT_RETIRED,
    command_signal,
)
from taskpool.model.jobs import COMMAND_KINDS, Job, JobKind
from taskpool.model.policy import SupervisionPolicy
from taskpool.model.pools import PoolLayout
from taskpool.observe import events as ev
from taskpool.observe.log import event, recovery_log, supervisor_log
from taskpool.posix.spool import discard_attempt
from taskpool.wire.calls import CallBatch
from taskpool.wire.queue import WorkerExited

# Ids of the jobs made by splitting a batch of calls: above any id a caller gives.
SPLIT_ID_BASE = 1 << 62


def death_of(exited: WorkerExited, killed_for: Death | None,
             policy: SupervisionPolicy, running: Job | None = None) -> Death:
    """Why the worker died: the reason we killed it for, if we did, else what its wait
    status says (our own exit statuses by name; `running`, the job it had started, for
    a command it ended at its timeout)."""
    status = exited.wait_status
    if killed_for is not None:
        # A preempted worker that died of something else first (a crash job, say) is
        # charged as any crash.
        by_us = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        return Death.crashed(status) if killed_for.requeue and not by_us else killed_for
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_INITIALIZER_FAILED:
        return Death.of(Cause.INITIALIZER_FAILED)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if code == EXIT_MEMORY_LIMIT:
        return Death.of(Cause.MEMORY_LIMIT, megabytes=policy.max_memory_mb)
    if code == EXIT_COMMAND_TIMED_OUT:
        seconds = (running.timeout if running is not None else None) or policy.timeout or 0
        return Death.of(Cause.TIMED_OUT, job=running.job_id if running else "?",
                        seconds=seconds)
    sig = command_signal(code)
    return Death.crashed(status) if sig is None else Death.command_killed(sig)


def _retired(wait_status: int) -> bool:
    return os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == EXIT_RETIRED


def _resent_count(aftermath: Aftermath) -> int:
    """The calls (or jobs) of a dead worker that go again."""
    again = aftermath.of(Verdict.RESEND, Verdict.REQUEUE, Verdict.SPLIT)
    return sum(len(h.singles) or _calls(h.job_state.job) for h in again)


def _calls(job: Job) -> int:
    """Calls in a job: an Executor's batch counts them in its arg; any other job is one."""
    return int(job.arg) if job.kind is JobKind.CALL else 1


@dataclass(frozen=True)
class Held:
    """A job the dead worker held, and what becomes of it."""

    job_state: JobState
    started: bool  # taken by the worker (else it was still waiting in its queue)
    charged: bool  # this death counted an attempt against it
    decision: Decision
    singles: list[int] = field(default_factory=list)  # SPLIT: one job per call

    @property
    def job_id(self) -> int:
        return self.job_state.job.job_id


# The order of the log lines of one death: resent, split, then requeued (unstarted before
# preempted), each kind in the order the worker was sent them.
def _log_order(held: Held) -> int:
    if held.decision.verdict is Verdict.REQUEUE:
        return 3 if held.started else 2
    return 0 if held.decision.verdict is Verdict.RESEND else 1


@dataclass
class Aftermath:
    """What one death did, to record and log once the lock is released."""

    pid: int
    death: Death
    at: float  # when the jobs were sent again (time.monotonic()): the lines come later
    stopping: bool
    never_took_a_job: bool  # the restart intensity counts such deaths
    held: list[Held] = field(default_factory=list)
    schedule: Schedule = field(default_factory=Schedule)

    def of(self, *verdicts: Verdict) -> list[Held]:
        return [h for h in self.held if h.decision.verdict in verdicts]

    @property
    def charged_any(self) -> bool:
        return any(h.charged for h in self.held)


@dataclass
class Recovery:
    """The recv thread's part in a worker's death: what to resend, fail or report not done.
    Owned by the recv thread (no lock of its own); what it shares is PoolState, under its
    lock, and the Tally and the writer, which are the recv thread's too."""

    state: PoolState
    policy: SupervisionPolicy
    layout: PoolLayout
    writer: RecordWriter
    tally: Tally
    stopper: Stopper
    run_dir: str | None = None  # where the commands' attempts spool their output
    intensity: RestartIntensity = field(init=False)
    next_split_id: int = SPLIT_ID_BASE  # the id of the next call split from a batch

    def __post_init__(self) -> None:
        self.intensity = RestartIntensity.of(self.policy)

    def on_worker_exited(self, exited: WorkerExited) -> None:
        """The worker is dead and all its messages were handled: resend what it held, fail
        a job that has used up its attempts, and give up on a pool whose workers die
        before they take any job."""
        # The resends happen here, before the jobs are sent again under the lock below;
        # the log lines come later, so they carry this time.
        at = time.monotonic()
        with self.state.lock:
            worker = self.state.exited.pop(exited.pid, None)
            if worker is None:
                return
            running = self.state.jobs.get(worker.running) if worker.running else None
            death = death_of(exited, self.state.kill_reasons.pop(exited.pid, None),
                             self.policy, running.job if running is not None else None)
            aftermath = self._settle(worker, death, at)
        self._discard_output(aftermath)
        if not aftermath.stopping and not _retired(exited.wait_status):
            # Before the failures: an Executor's caller sees the death of a call's last
            # attempt counted by the time its future fails.
            self.writer.worker_lost(exited.pid, death, _resent_count(aftermath))
        for held in aftermath.of(Verdict.FAIL):
            self._record_failure(held, aftermath)
        self._log(aftermath)
        if (not aftermath.stopping and aftermath.never_took_a_job
                and not aftermath.charged_any and not death.requeue):
            self._count_idle_death(death)

    def _settle(self, worker: WorkerHandle, death: Death, at: float) -> Aftermath:
        """Decide for every job the worker held, and send again what goes again. Called
        with the lock held."""
        unstarted = self._take_back(worker)
        # Not acked, a job it took is one it held and that was not in its queue.
        never_took_a_job = not worker.took_a_job and all(
            job_id in unstarted for job_id in worker.outstanding)
        aftermath = Aftermath(worker.pid, death, at, self.state.stopping, never_took_a_job)
        for job_id in worker.outstanding:
            job_state = self.state.jobs[job_id]
            if not job_state.recorded:
                aftermath.held.append(self._decide(job_state, death, job_id not in unstarted))
        if not aftermath.stopping:
            self._resend(aftermath, worker.pool)
        return aftermath

    def _take_back(self, worker: WorkerHandle) -> set[int]:
        """Take back the jobs still waiting in the dead worker's mailbox (never started),
        and free what it had: its deadlines, its pool's preemption, its mailbox. Called with
        the lock held."""
        state = self.state
        pool = state.pools[worker.pool]
        if pool.preempting == worker.pid:
            pool.preempting = None
        state.forget_deadlines(worker.pid)
        unstarted = {job.job_id for job in worker.take_back_waiting()}
        state.mailboxes.release(worker.mailbox)  # empty now: another worker's
        if state.short_of_workers and not state.stopping:
            os.kill(os.getpid(), NUDGE_SIGNAL)  # the recovery thread waits for a mailbox
        return unstarted

    def _decide(self, job_state: JobState, death: Death, started: bool) -> Held:
        """What becomes of one job the dead worker held (core/supervision.py's rules), and
        its state updated to match. Called with the lock held."""
        decision = after_death(death, job_state.failed_attempts, self.policy,
                               started=started, calls=_calls(job_state.job),
                               stopping=self.state.stopping)
        charged = decision.failed_attempts > job_state.failed_attempts
        job_state.failed_attempts = decision.failed_attempts
        singles: list[int] = []
        if decision.verdict is Verdict.SPLIT:
            singles = self._split(job_state)
        elif decision.verdict is Verdict.FAIL:
            job_state.recorded = True
        return Held(job_state, started, charged, decision, singles)

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
        self.tally.split_extra += len(ids) - 1
        return ids

    def _resend(self, aftermath: Aftermath, pool: int) -> None:
        """Put back in the backlog every job that goes again, and hand out what can be.
        Called with the lock held, while not stopping."""
        resent = aftermath.of(Verdict.RESEND)
        for held in aftermath.of(Verdict.RESEND, Verdict.REQUEUE):
            why = "resent" if held.decision.verdict is Verdict.RESEND else (
                "preempted" if held.started else "requeued")
            held.job_state.again = (why, aftermath.pid)
            enqueue(self.state, held.job_id)
        for held in aftermath.of(Verdict.SPLIT):
            for single in held.singles:
                enqueue(self.state, single)
        self.state.resends += len(resent)
        assign(self.state, pool, aftermath.schedule)

    def _discard_output(self, aftermath: Aftermath) -> None:
        """The output of the command the dead worker ran is never delivered: removed now,
        not with the run's directory at its end (a job that crashes often would fill it)."""
        if self.run_dir is None:
            return
        for held in aftermath.held:
            if held.started and held.job_state.job.kind in COMMAND_KINDS:
                discard_attempt(self.run_dir, held.job_id, aftermath.pid)

    def _record_failure(self, held: Held, aftermath: Aftermath) -> None:
        pid, death, attempts = aftermath.pid, aftermath.death, held.decision.failed_attempts
        self.tally.recorded += 1
        self.tally.failed += 1
        self.writer.failed(held.job_state.job, pid, death, held.decision)
        supervisor_log.info("Job %d failed after %d attempts: %s", held.job_id, attempts,
                            death.reason,
                            extra=event(ev.JOB_FAILED, job=held.job_id, worker=pid,
                                        attempts=attempts, reason=death.reason))

    def _log(self, aftermath: Aftermath) -> None:
        """What was decided, once the lock is released."""
        if aftermath.stopping:
            self._log_not_done(aftermath)
            return
        for held in sorted(aftermath.of(Verdict.RESEND, Verdict.SPLIT, Verdict.REQUEUE),
                           key=_log_order):
            self._log_sent_again(held, aftermath)
        aftermath.schedule.log(self.layout)

    @staticmethod
    def _log_not_done(aftermath: Aftermath) -> None:
        """While stopping, nothing is sent again: name the jobs this death cost an attempt
        (the others are reported not done without a word here)."""
        pid, reason = aftermath.pid, aftermath.death.reason
        crashed = [h.job_id for h in aftermath.of(Verdict.NOT_DONE) if h.charged]
        if crashed:
            supervisor_log.info("Worker PID %d %s while stopping: job(s) %s not done",
                                pid, reason, ", ".join(map(str, crashed)),
                                extra=event(ev.JOBS_NOT_DONE, jobs=crashed, worker=pid,
                                            reason=reason))

    @staticmethod
    def _log_sent_again(held: Held, aftermath: Aftermath) -> None:
        job_id, pid, at = held.job_id, aftermath.pid, aftermath.at
        reason = aftermath.death.reason
        if held.decision.verdict is Verdict.RESEND:
            recovery_log.info("Resent job %d after crash of %d", job_id, pid,
                              extra=event(ev.JOB_RESENT, at=at, job=job_id, worker=pid,
                                          reason=reason))
        elif held.decision.verdict is Verdict.SPLIT:
            singles = held.singles
            recovery_log.info("Resent job %d after crash of %d: its %d calls one by one, as "
                              "jobs %d-%d", job_id, pid, len(singles), singles[0], singles[-1],
                              extra=event(ev.JOB_SPLIT, at=at, job=job_id, worker=pid,
                                          reason=reason, jobs=singles))
        elif held.started:
            recovery_log.info("Requeued job %d: preempted on %d", job_id, pid,
                              extra=event(ev.JOB_REQUEUED, at=at, job=job_id, worker=pid,
                                          reason="preempted"))
        else:
            recovery_log.info("Requeued job %d: it was waiting, unstarted, for %d", job_id, pid,
                              extra=event(ev.JOB_REQUEUED, at=at, job=job_id, worker=pid,
                                          reason="unstarted"))

    def _count_idle_death(self, death: Death) -> None:
        """Restart intensity: too many workers dead before they ever took a job, too fast,
        means a pool that cannot work (a crash loop at start-up): stop it rather than fork
        forever. A worker that died during a job, or idle after doing some, is not
        counted: jobs are bounded by --max-attempts instead."""
        if self.intensity.note_idle_death(time.monotonic()):
            self.stopper.give_up(self.intensity.give_up_reason(death))
