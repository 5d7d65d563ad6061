"""Supervision: what a worker's death means for the job it held, for every engine.

    an engine sees an attempt end without a result
        │  (local: a reaped worker; Dask: a lost worker, a task that raised; Executor: a call)
        v
    Death            why, as data: its Cause carries whether it charges the job an attempt
        │            and whether the job goes back to its backlog; `reason` is its text
        v
    after_death()    the pure decision under the policy:
                     RESEND | FAIL (out of attempts) | REQUEUE (uncharged) | NOT_DONE
    RestartIntensity workers dying before they take any job, too fast: give up (OTP style)

Nothing here blocks, forks or logs: the local Dealer, the Dask engine and the Executor's host
call these, and their tests are tables (tests/test_supervision_rules.py).
"""

from __future__ import annotations

import enum
import signal
from collections import deque
from dataclasses import dataclass, field

from taskpool.model.policy import SupervisionPolicy
from taskpool.posix.proc import describe_wait_status


@dataclass(frozen=True)
class Rule:
    """What a cause of death does to the job the worker held."""

    charges_attempt: bool  # the job may be to blame: counted against --max-attempts
    requeue: bool = False  # back to its backlog, uncharged (a preemption)


class Cause(enum.Enum):
    """Why an attempt ended without a result. The rule of each is the policy, as data:
    a death the job may have caused charges it; one that is our doing does not."""

    CRASHED = Rule(charges_attempt=True)  # exited or killed by a signal, on its own
    TIMED_OUT = Rule(charges_attempt=True)  # --timeout / timeout=
    NO_HEARTBEAT = Rule(charges_attempt=True)  # hung: no heartbeat for --heartbeat s
    STOPPED = Rule(charges_attempt=True)  # SIGSTOPped (a hung worker): killed
    MEMORY_LIMIT = Rule(charges_attempt=True)  # --max-memory
    INITIALIZER_FAILED = Rule(charges_attempt=True)  # the Executor's initializer raised
    RAISED = Rule(charges_attempt=True)  # Dask: the task raised instead of returning
    WORKER_LOST = Rule(charges_attempt=True)  # Dask: the worker left the cluster
    PREEMPTED = Rule(charges_attempt=False, requeue=True)  # made room for a higher job
    GRACE_OVER = Rule(charges_attempt=False)  # still running when --grace ended
    STOPPED_WITH_POOL = Rule(charges_attempt=False)  # a second Ctrl-C, a pool that gave up

    @property
    def rule(self) -> Rule:
        rule: Rule = self.value
        return rule


@dataclass(frozen=True)
class Death:
    """One attempt's end without a result: its cause, and the text that says why.

    Made by the constructors below, which own every reason's wording: an engine never
    builds or edits a reason string."""

    cause: Cause
    reason: str
    # The reason as an Executor's caller reads it, where it differs: the caller knows its
    # calls, not the job ids the Dealer gave them. Empty: the same as `reason`.
    call_wording: str = ""

    @property
    def call_reason(self) -> str:
        return self.call_wording or self.reason

    @property
    def charges_attempt(self) -> bool:
        return self.cause.rule.charges_attempt

    @property
    def requeue(self) -> bool:
        return self.cause.rule.requeue

    @classmethod
    def crashed(cls, wait_status: int) -> Death:
        return cls(Cause.CRASHED, describe_wait_status(wait_status))

    @classmethod
    def exited(cls, how: str) -> Death:
        """A crash told in words already (`exited with status 3`, from Dask's nanny)."""
        return cls(Cause.CRASHED, how)

    @classmethod
    def timed_out(cls, job_id: int, seconds: float) -> Death:
        return cls(Cause.TIMED_OUT, f"ran job {job_id} past its timeout of {seconds:g} s",
                   f"ran the call past its timeout of {seconds:g} s")

    @classmethod
    def no_heartbeat(cls, seconds: float) -> Death:
        return cls(Cause.NO_HEARTBEAT, f"sent no heartbeat for {seconds:g} s")

    @classmethod
    def stopped(cls, sig: int) -> Death:
        return cls(Cause.STOPPED, f"was stopped by signal {sig} ({signal.Signals(sig).name})")

    @classmethod
    def memory_limit(cls, megabytes: int | None) -> Death:
        return cls(Cause.MEMORY_LIMIT, f"memory limit ({megabytes} MB)")

    @classmethod
    def initializer_failed(cls) -> Death:
        return cls(Cause.INITIALIZER_FAILED,
                   "exited: its initializer raised (the traceback is in the log)")

    @classmethod
    def raised(cls, error: BaseException) -> Death:
        return cls(Cause.RAISED, f"raised {type(error).__name__}: {error}")

    @classmethod
    def worker_lost(cls, address: str) -> Death:
        return cls(Cause.WORKER_LOST, f"its worker {address} was lost")

    @classmethod
    def preempted(cls, for_job: int) -> Death:
        return cls(Cause.PREEMPTED, f"was preempted for job {for_job}")

    @classmethod
    def grace_over(cls, grace: float) -> Death:
        return cls(Cause.GRACE_OVER,
                   f"was still running when the {grace:g} s grace period ended")

    @classmethod
    def stopped_with_pool(cls) -> Death:
        return cls(Cause.STOPPED_WITH_POOL, "was stopped with the pool")


class Verdict(enum.Enum):
    RESEND = "resend"  # charged an attempt, and sent again
    FAIL = "fail"  # charged its last attempt: recorded failed
    REQUEUE = "requeue"  # sent again uncharged: never started, preempted, result lost
    SPLIT = "split"  # a batch of calls: each call sent again alone, uncharged
    NOT_DONE = "not_done"  # stopped by us, or the pool is stopping: reported not done


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    failed_attempts: int  # the job's failed attempts, this one included if charged

    def failure_reason(self, death: Death) -> str:
        """The reason a FAIL records: ``ran job 3 past its timeout of 1 s on 3 attempts``."""
        return f"{death.reason} on {self.failed_attempts} attempts"

    @property
    def next_attempt(self) -> int:
        """The attempt number a RESEND or REQUEUE sends the job as: the one after its
        failed attempts (a requeued job goes again as the attempt it had not finished)."""
        return self.failed_attempts + 1


def after_death(death: Death, failed_before: int, policy: SupervisionPolicy, *,
                started: bool = True, calls: int = 1, stopping: bool = False) -> Decision:
    """What becomes of the job a dead worker held.

    `failed_before`: the job's failed attempts before this one; `started`: the worker had
    taken it (else it only waited in that worker's queue, or its result was lost after it
    completed); `calls`: an Executor batch's calls (one worker death cannot tell which of
    them killed it); `stopping`: the pool is stopping, and sends nothing again."""
    if not started:
        return Decision(Verdict.NOT_DONE if stopping else Verdict.REQUEUE, failed_before)
    if death.requeue:
        return Decision(Verdict.NOT_DONE if stopping else Verdict.REQUEUE, failed_before)
    if not death.charges_attempt:
        return Decision(Verdict.NOT_DONE, failed_before)
    if calls > 1:
        return Decision(Verdict.SPLIT, failed_before)
    failed = failed_before + 1
    if policy.max_attempts and failed >= policy.max_attempts:
        return Decision(Verdict.FAIL, failed)
    return Decision(Verdict.NOT_DONE if stopping else Verdict.RESEND, failed)


@dataclass
class RestartIntensity:
    """OTP's restart intensity, for workers that die before they ever take a job: more than
    `max_restarts` such deaths within `window` seconds means a pool that cannot work (a
    crash loop at start-up), and the supervisor gives up rather than fork forever. Deaths
    during a job are not counted here: --max-attempts bounds those per job."""

    max_restarts: int
    window: float
    deaths: deque[float] = field(default_factory=deque)  # when, time.monotonic()

    @classmethod
    def of(cls, policy: SupervisionPolicy) -> RestartIntensity:
        return cls(policy.max_restarts, policy.restart_window)

    def note_idle_death(self, now: float) -> bool:
        """Count a death at `now`; True if the pool must give up."""
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.window:
            self.deaths.popleft()
        return len(self.deaths) > self.max_restarts

    def give_up_reason(self, last: Death) -> str:
        return (f"{len(self.deaths)} workers died without taking a job within "
                f"{self.window:g} s (max_restarts={self.max_restarts}); the last "
                f"{last.reason}")
