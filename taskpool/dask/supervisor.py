"""The Dask engine's supervision: what a try that erred, a worker's death or a --timeout
means for the job, decided by the rules every engine shares (core/supervision.py:
`after_death()`) and carried out here.

It logs as the local engine's roles do for the same duties: [Supervisor] for worker deaths,
timeouts and jobs failed for good, [Recovery] for jobs sent again. Like all of the engine's
state, it belongs to the engine's main thread (engine.py), which calls it from its loop.
"""

# distributed is typed only in part: its Future methods are untyped calls (as for engine.py,
# in pyproject.toml).
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Literal

from taskpool.core.commands import TERM_GRACE
from taskpool.core.recorder import Recorder
from taskpool.core.supervision import (
    Again,
    Cause,
    Death,
    Decision,
    Verdict,
    after_death,
    after_failure,
    failure_of,
)
from taskpool.dask.state import Counts, Tries, Try
from taskpool.model.jobs import Job, JobKind
from taskpool.model.outcome import JobRecord, Status
from taskpool.model.policy import SupervisionPolicy
from taskpool.observe import events as ev
from taskpool.observe.log import event, recovery_log, supervisor_log
from taskpool.posix.spool import discard_attempt
from taskpool.wire.commands import Ending

DEATH_REPORT_WAIT = 2.0  # seconds a worker's death waits for its exit status (the nanny's)
# How long after a command's timeout and TERM_GRACE main kills its worker, if the worker
# has not ended the command itself (late only under heavy load): as the local Dealer.
COMMAND_SLACK = 1.0


class Supervisor:
    """Judges the tries that end without a result, and counts the crashes and resends.

    `submit(job, attempt, again)` sends a job again, saying why (`again`: the reason and
    the worker it left, as core/supervision.AGAIN_WORDS words it); `cancel(tries)` cancels
    tries on the cluster.
    Once `stop()` is called (the first SIGINT/SIGTERM), nothing is sent again: a try that
    errs is reported not done."""

    def __init__(self, tries: Tries, policy: SupervisionPolicy, recorder: Recorder,
                 submit: Callable[[Job, int, Again], None],
                 cancel: Callable[[list[Try]], None]) -> None:
        self.tries = tries
        self.own_cluster = tries.own_cluster
        self.policy = policy
        self.recorder = recorder
        self.submit = submit
        self.cancel = cancel
        self.counts = Counts()
        self.stopping = False
        self.deaths: dict[int, str] = {}  # worker pid: how it exited (our own cluster)
        self.dead_addresses: set[str] = set()
        # Deaths of our own cluster's workers waiting for the nanny's report (see on_error)
        self.parked: list[tuple[float, Try, Any]] = []
        self.failed_runs: dict[int, int] = {}  # job id: its failed runs (--retry-failed)

    def log_policy(self) -> None:
        policy = self.policy
        attempts = "unlimited" if policy.max_attempts == 0 else str(policy.max_attempts)
        failures = "0" if self.own_cluster else "the cluster's"
        timeout = "none" if policy.timeout is None else f"{policy.timeout:g}s"
        how = "worker killed" if self.own_cluster else "task abandoned, runs on"
        halt = f", halt={policy.halt.describe()}" if policy.halt.halts else ""
        supervisor_log.info("dask engine, max_attempts=%s (counted here; scheduler "
                            "allowed-failures=%s), timeout=%s (%s), grace=%gs%s", attempts,
                            failures, timeout, how, policy.grace, halt)

    def stop(self) -> None:
        self.stopping = True
        self._unpark()  # judged now, as not done

    # --- a try erred -------------------------------------------------------------------

    def on_error(self, failed: Try) -> None:
        """A try erred: its worker died (KilledWorker) or the job raised. On our own
        cluster, a death is judged once the nanny has said how the process ended (it
        comes at about the same time, by another path), or after DEATH_REPORT_WAIT."""
        from distributed.scheduler import KilledWorker

        error = failed.future.exception()
        if isinstance(error, KilledWorker) and self.tries.ran_on(
                failed, error.last_worker.address, error.last_worker.pid):
            # Now: nothing of a job outlives its worker. Only the command of the try it was
            # running: another try's has ended, and its group's id may be another's by now.
            self.kill_command(failed)
        if isinstance(error, KilledWorker) and self.own_cluster \
                and not self.stopping and error.last_worker.pid not in self.deaths:
            self.parked.append((time.monotonic() + DEATH_REPORT_WAIT, failed, error))
            return
        self._judge(failed, error)

    def check_parked(self, now: float) -> None:
        if self.parked:
            self._unpark(now)

    def seconds_to_parked(self, now: float) -> list[float]:
        return [deadline - now for deadline, _, _ in self.parked]

    def _unpark(self, now: float | None = None) -> None:
        """Judge the parked deaths whose report came, or whose wait is over (all of them
        if `now` is None), in the order they came."""
        still = []
        for parked in self.parked:
            deadline, failed, error = parked
            if now is None or deadline <= now or error.last_worker.pid in self.deaths:
                self._judge(failed, error)
            else:
                still.append(parked)
        self.parked = still

    def _judge(self, failed: Try, error: BaseException) -> None:
        from distributed.scheduler import KilledWorker

        if self.stopping:
            self.tries.forget(failed)
            return  # stopping: the job is reported not done
        if isinstance(error, KilledWorker):
            self._judge_worker_death(failed, error.last_worker.address, error.last_worker.pid)
            return
        self.tries.forget(failed)
        death = Death.of(Cause.RAISED, error_type=type(error).__name__, error=error)
        self._carry_out(self._decide(failed, death), failed, death, failed.pid,
                        failed.address or "an unknown worker")

    def _judge_worker_death(self, failed: Try, address: str, pid: int) -> None:
        # The worker is dead: what it was running stays known, to judge the others.
        self.tries.forget(failed, off_worker=False)
        self._on_worker_lost(address)
        if failed.timed_out:
            death = self._timed_out(failed)
        elif pid in self.deaths:
            death = Death.of(Cause.CRASHED, how=self.deaths[pid])
        else:
            death = Death.of(Cause.WORKER_LOST, address=address)
        decision = self._decide(failed, death, started=self.tries.ran_on(failed, address, pid))
        self._carry_out(decision, failed, death, pid, address)

    def _decide(self, failed: Try, death: Death, started: bool = True) -> Decision:
        """after_death() for `failed`: `started` says it ran on the worker that died (else
        it only waited in its queue, or had completed and its result was lost). Never
        NOT_DONE: nothing is judged once stopping."""
        return after_death(death, self.tries.failed_before(failed), self.policy,
                           started=started)

    def _carry_out(self, decision: Decision, failed: Try, death: Death, pid: int | None,
                   address: str) -> None:
        job = failed.job
        # The worker: its PID and address; a given cluster's worker whose PID no start of
        # ours told (it died at its first job) by its address alone.
        worker = f"{pid} ({address})" if pid is not None else address
        if decision.verdict is Verdict.FAIL:
            self._fail(job, decision, death, pid)
        elif decision.verdict is Verdict.REQUEUE:
            if failed.starts == 0:
                why, text = "unstarted", "it was waiting, unstarted, for %s"
            else:
                why, text = "result_lost", ("it had completed, but its result was lost "
                                            "with a worker; it was not running on %s")
            recovery_log.info("Requeued job %d: " + text, job.job_id, worker,
                              extra=event(ev.JOB_REQUEUED, job=job.job_id, worker=pid,
                                          reason=why, address=address))
            self.submit(job, decision.next_attempt,
                        ("requeued" if why == "unstarted" else why, pid or address))
        else:
            recovery_log.info("Resent job %d after crash of %s: %s", job.job_id, worker,
                              death.reason,
                              extra=event(ev.JOB_RESENT, job=job.job_id, worker=pid,
                                          address=address, reason=death.reason))
            self._resend(job, decision, pid or address)

    def _fail(self, job: Job, decision: Decision, death: Death, pid: int | None) -> None:
        attempts = decision.failed_attempts
        self.recorder.record(JobRecord.of(job, Status.FAILED, worker=pid, attempts=attempts,
                                          reason=decision.failure_reason(death)))
        supervisor_log.info("Job %d failed after %d attempts: %s", job.job_id, attempts,
                            death.reason, extra=event(ev.JOB_FAILED, job=job.job_id,
                                                      worker=pid, attempts=attempts,
                                                      reason=death.reason))

    def _resend(self, job: Job, decision: Decision, worker: int | str | None) -> None:
        self.counts.resends += 1
        self.submit(job, decision.next_attempt, ("resent", worker))

    def on_cancelled_by_cluster(self, lost: Try) -> None:
        """The cluster cancelled a try (not we): it is sent again, uncharged."""
        recovery_log.info("Job %d was cancelled by the cluster: sending it again",
                          lost.job.job_id, extra=event(ev.JOB_REQUEUED, job=lost.job.job_id,
                                                       reason="cancelled"))
        self.submit(lost.job, lost.attempt, ("cancelled", None))

    # --- jobs of real work -------------------------------------------------------------

    def on_command_killed(self, killed: Try, signum: int | None, pid: int, address: str,
                          run_dir: str) -> None:
        """A try's command was killed by a signal (not ours), or past its timeout by its
        worker: a crash of the attempt, charged and resent (or failed, out of attempts), as
        in the local engine; its output is never delivered. Its worker lives on."""
        discard_attempt(run_dir, killed.job.job_id, pid)
        if self.stopping:
            return  # reported not done
        if signum is None:
            death = self._timed_out(killed)
        else:
            death = Death.command_killed(signum)
        self._carry_out(self._decide(killed, death), killed, death, pid, address)

    def failed_run(self, ended: Try, kind: JobKind, ending: Ending, pid: int,
                   run_dir: str) -> Death | None | Literal[False]:
        """A try of real work ran to its end: None if it succeeded, else the failure it is
        recorded with; False if it failed and --retry-failed runs it again (sent now, its
        output never delivered)."""
        failure = failure_of(kind, ending)
        if failure is None:
            return None
        job = ended.job
        decision = after_failure(failure, self.failed_runs.get(job.job_id, 0), self.policy,
                                 stopping=self.stopping)
        self.failed_runs[job.job_id] = decision.failed_attempts
        if decision.verdict is not Verdict.RESEND:
            return failure
        discard_attempt(run_dir, job.job_id, pid)
        recovery_log.info("Job %d %s: running it again (%d of %d)", job.job_id,
                          failure.reason, decision.failed_attempts, self.policy.retry_failed,
                          extra=event(ev.JOB_RESENT, job=job.job_id, worker=pid,
                                      reason=failure.reason))
        self.counts.resends += 1
        # It keeps its attempt number, as locally: a crash is bounded by --max-attempts alone.
        self.submit(job, self.tries.attempts_used(ended), ("retried", pid))
        return False

    def kill_command(self, ended: Try) -> None:
        """The process group of a try's command, killed: its worker died (or is killed),
        or the cluster closed while it ran. The group's id cannot have been reused while
        any process of the group lives."""
        if ended.command_pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(ended.command_pgid, signal.SIGKILL)
            ended.command_pgid = None

    # --- workers' deaths ---------------------------------------------------------------

    def _on_worker_lost(self, address: str, running: list[Try] | None = None,
                        pool: int | None = None) -> None:
        """A given cluster's worker that the scheduler removed while it held our tasks
        (`running`: those it was running), counted once as a crash. Our own cluster's
        deaths are counted from the nanny (with their exit status) instead."""
        if address in self.dead_addresses:
            return
        self.dead_addresses.add(address)
        if self.own_cluster:
            return
        self.counts.crashes += 1
        if pool is not None:
            self.counts.per_pool[pool] += 1
        pid = self.tries.pid_at(address)
        jobs = sorted(t.job.job_id for t in running or [])
        supervisor_log.info(
            "Worker %s%s lost: %s", f"PID {pid} at " if pid is not None else "", address,
            f"it was running job {', '.join(map(str, jobs))}" if jobs else
            "it was running no job of ours", extra=event(
                ev.WORKER_EXITED, worker=pid, type=pool, address=address, reason="lost",
                crash=True, jobs=jobs))

    def on_worker_removed(self, address: str, keys: list[str], expected: bool, pool: int,
                          threads: int) -> None:
        """A given cluster's scheduler removed a worker that held the tries of `keys`
        (some may be another client's). One that left on purpose (`expected`: retired,
        closed) hands its tasks back, and Dask runs them elsewhere under the same keys. One
        that was lost is a crash: the tries it was running are charged an attempt, those
        in its queue are sent again uncharged, all under new keys (their old ones err with
        KilledWorker, now or at Dask's next death of theirs: nothing to judge then)."""
        held = [t for t in map(self.tries.get, keys) if t is not None]
        if expected:
            supervisor_log.info("Worker %s left the cluster", address,
                                extra=event(ev.WORKER_EXITED, worker=self.tries.pid_at(address),
                                            address=address, reason="left", crash=False))
            return
        running = self.tries.running_on(address, held, threads)
        self._on_worker_lost(address, running, pool)
        if self.tries.dask_retries:
            self.cancel(held)  # Dask would run them again by itself
        pid = self.tries.pid_at(address)
        for failed in held:
            self.tries.forget(failed, off_worker=False)
            if self.stopping:
                continue  # reported not done
            death = self._timed_out(failed) if failed.timed_out else \
                Death.of(Cause.WORKER_LOST, address=address)
            decision = self._decide(failed, death, started=failed in running)
            self._carry_out(decision, failed, death, pid, address)

    def on_worker_exited(self, pid: int, how: str) -> None:
        """Our own cluster's nanny said how a worker process ended."""
        self.deaths[pid] = how
        if self.stopping:
            return
        if self.parked:
            self._unpark(time.monotonic())
        pool = self.tries.pid_pools.get(pid)
        self.counts.crashes += 1
        if pool is not None:
            self.counts.per_pool[pool] += 1
        supervisor_log.info("Worker PID %d %s", pid, how,
                            extra=event(ev.WORKER_EXITED, worker=pid, type=pool, reason=how,
                                        crash=True))

    # --- timeouts --------------------------------------------------------------------------

    def timeout_of(self, job: Job) -> float | None:
        return job.timeout or self.policy.timeout

    def deadline_of(self, job: Job) -> float | None:
        """When, from its start, main ends a try past its timeout. A command's worker ends
        the command itself (SIGTERM, then SIGKILL after TERM_GRACE) and lives: main kills
        the worker only if that has not happened COMMAND_SLACK later, as the local Dealer."""
        timeout = self.timeout_of(job)
        if timeout is None or job.kind not in (JobKind.SH, JobKind.EXEC):
            return timeout
        return timeout + TERM_GRACE + COMMAND_SLACK

    def _timed_out(self, overdue: Try) -> Death:
        timeout = self.timeout_of(overdue.job)
        assert timeout is not None  # it had a deadline
        return Death.of(Cause.TIMED_OUT, job=overdue.job.job_id, seconds=timeout)

    def on_timeout(self, overdue: Try) -> None:
        """Dask cannot stop one task: on our own cluster its worker process is killed (the
        nanny starts another, the death charges the attempt, as in the local engine); on a
        given cluster the try is abandoned, left to run to its end, and charged."""
        overdue.timed_out = True
        death = self._timed_out(overdue)
        if self.own_cluster and overdue.pid is not None:
            supervisor_log.info("Worker PID %d %s: killed it", overdue.pid, death.reason,
                                extra=event(ev.WORKER_KILLED, worker=overdue.pid,
                                            reason="timeout", job=overdue.job.job_id))
            _kill(overdue.pid)
            self.kill_command(overdue)
            return
        supervisor_log.info("Job %d ran past its timeout of %g s on %s: abandoned it (Dask "
                            "cannot stop one task)", overdue.job.job_id,
                            self.timeout_of(overdue.job), overdue.address,
                            extra=event(ev.JOB_ABANDONED, job=overdue.job.job_id,
                                        worker=overdue.pid, reason="timeout"))
        self.tries.forget(overdue)
        self.cancel([overdue])
        decision = self._decide(overdue, death)
        if decision.verdict is Verdict.FAIL:
            self._fail(overdue.job, decision, death, overdue.pid)
        else:
            self._resend(overdue.job, decision, overdue.pid or overdue.address)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
