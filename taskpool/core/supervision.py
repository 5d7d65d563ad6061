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
    halt_due()       --halt: enough jobs failed that the run stops (GNU parallel's form)

    a job of real work ran to its end and failed (its command exited non-zero, its call
    raised): no death, the worker lives on
        v
    Death.of(Cause.EXITED_NONZERO | CALL_RAISED ...)   a Rule with `failed=True`
    after_failure()  FAIL, or RESEND while the policy's `retry_failed` allows another run

Nothing here blocks, forks or logs: the local Dealer, the Dask engine and the Executor's host
call these, and their tests are tables (tests/test_supervision_rules.py).
"""

from __future__ import annotations

import enum
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Union

from taskpool.model.jobs import JobKind
from taskpool.model.policy import HaltPolicy, SupervisionPolicy
from taskpool.posix.proc import describe_wait_status
from taskpool.wire.commands import Ending


@dataclass(frozen=True)
class Rule:
    """What a cause of death does to the job the worker held, and how it is said."""

    charges_attempt: bool  # the job may be to blame: counted against --max-attempts
    says: str  # the reason's words, str.format()ted with the Death's fields
    requeue: bool = False  # back to its backlog, uncharged (a preemption)
    # The words for an Executor's caller, where they differ: it knows its calls, not the
    # job ids the Dealer gave them.
    says_of_a_call: str = ""
    # The job ran to its end and failed (a command's non-zero exit, a call that raised):
    # recorded `failed` at once, never resent for a crash; run again only on request
    # (`SupervisionPolicy.retry_failed`, see after_failure).
    failed: bool = False


class Cause(enum.Enum):
    """Why an attempt ended without a result. The rule of each is the policy, as data:
    a death the job may have caused charges it; one that is our doing does not."""

    # exited or killed by a signal, on its own: `how` is describe_wait_status()'s
    CRASHED = Rule(True, "{how}")
    TIMED_OUT = Rule(True, "ran job {job} past its timeout of {seconds:g} s",
                     says_of_a_call="ran the call past its timeout of {seconds:g} s")
    NO_HEARTBEAT = Rule(True, "sent no heartbeat for {seconds:g} s")  # hung
    STOPPED = Rule(True, "was stopped by signal {signal} ({name})")  # SIGSTOPped: hung
    MEMORY_LIMIT = Rule(True, "memory limit ({megabytes} MB)")  # --max-memory
    INITIALIZER_FAILED = Rule(True, "exited: its initializer raised (the traceback is in "
                                    "the log)")  # the Executor's initializer
    RAISED = Rule(True, "raised {error_type}: {error}")  # Dask: the task raised
    WORKER_LOST = Rule(True, "its worker {address} was lost")  # Dask: left the cluster
    PREEMPTED = Rule(False, "was preempted for job {for_job}", requeue=True)
    GRACE_OVER = Rule(False, "was still running when the {grace:g} s grace period ended")
    STOPPED_WITH_POOL = Rule(False, "was stopped with the pool")  # 2nd Ctrl-C, gave up
    # A result's payload handed over out of the queue (posix/handoff.py) that the Dealer
    # could not read (out of descriptors, say): the worker is ended, so that the attempt
    # runs again. Charged, so that a Dealer that can never read one stops trying.
    RESULT_LOST = Rule(True, "sent a result of {size} bytes that could not be read")
    # A job of real work (sh, exec, call): the worker lives; see after_failure.
    COMMAND_KILLED = Rule(True, "its command was killed by signal {signal} ({name})")
    EXITED_NONZERO = Rule(False, "exit status {status}", failed=True)
    CALL_RAISED = Rule(False, "{error}", failed=True)  # "ValueError: bad size"

    @property
    def rule(self) -> Rule:
        rule: Rule = self.value
        return rule


@dataclass(frozen=True)
class Death:
    """One attempt's end without a result: its cause, and the text that says why.

    Made by `Death.of(cause, **fields)`, which words the reason from the cause's rule: an
    engine never builds or edits a reason string."""

    cause: Cause
    reason: str
    call_wording: str = ""  # the reason for an Executor's caller; empty: `reason`

    @classmethod
    def of(cls, cause: Cause, **fields: object) -> Death:
        rule = cause.rule
        return cls(cause, rule.says.format(**fields),
                   rule.says_of_a_call.format(**fields) if rule.says_of_a_call else "")

    @classmethod
    def crashed(cls, wait_status: int) -> Death:
        """A worker that died on its own, from its raw wait status."""
        return cls.of(Cause.CRASHED, how=describe_wait_status(wait_status))

    @classmethod
    def command_killed(cls, signum: int) -> Death:
        """A job's command killed by signal `signum`, not by us: a crash of the attempt."""
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return cls.of(Cause.COMMAND_KILLED, signal=signum, name=name)

    @property
    def call_reason(self) -> str:
        return self.call_wording or self.reason

    @property
    def charges_attempt(self) -> bool:
        return self.cause.rule.charges_attempt

    @property
    def requeue(self) -> bool:
        return self.cause.rule.requeue


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


def after_failure(failure: Death, runs_before: int, policy: SupervisionPolicy, *,
                  stopping: bool = False) -> Decision:
    """What becomes of a job that ran to its end and failed (`failure.cause.rule.failed`):
    a command's non-zero exit, a call that raised. FAIL, recorded with the reason alone
    ("exit status 3"); RESEND while it has had fewer than `policy.retry_failed` runs
    again (`runs_before`: the failed runs before this one, which `failed_attempts` counts
    as charged). Nothing is run again while the pool is stopping."""
    runs = runs_before + 1
    if runs <= policy.retry_failed and not stopping:
        return Decision(Verdict.RESEND, runs)
    return Decision(Verdict.FAIL, runs)


def failure_of(kind: JobKind, ending: Ending) -> Death | None:
    """The failure a job of real work that ran to its end was, if it failed: a call that
    raised (or could not be imported), a command that could not start or exited non-zero.
    Every engine words it so."""
    if ending.succeeded:
        return None
    if kind is JobKind.FUNCTION or ending.exit_status is None:
        return Death.of(Cause.CALL_RAISED, error=ending.error)
    return Death.of(Cause.EXITED_NONZERO, status=ending.exit_status)


@dataclass(frozen=True)
class Halt:
    """--halt's condition met: `failed` jobs of the run's `jobs` failed. Its reason is what
    the log, the `halted` event and every job it leaves not done say."""

    policy: HaltPolicy
    failed: int
    jobs: int

    @property
    def reason(self) -> str:
        jobs = "job" if self.failed == 1 else "jobs"
        return (f"halted after {self.failed} failed {jobs} (--halt {self.policy.describe()}"
                + (f", of {self.jobs} jobs)" if self.policy.percent is not None else ")"))


def halt_due(policy: HaltPolicy, failed: int, jobs: int) -> Halt | None:
    """Whether `failed` failed jobs halt the run, under --halt; `jobs`: the run's jobs, the
    base of a percentage (a job file's jobs that this run runs; on standard input, the
    jobs read so far). Every engine asks this after each failure it records."""
    if not policy.halts or failed == 0 or failed < policy.threshold(jobs):
        return None
    return Halt(policy, failed, jobs)


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


@dataclass
class StartBackoff:
    """When to try again to start a worker the system refused (a fork() refused: the
    user's process limit, no memory): after `first` seconds, then twice as long each time up
    to `longest`; reset by a start that works. A pool left with no worker at all gives up
    once starts have failed for `give_up_after` seconds: its jobs could never run."""

    first: float = 0.1
    longest: float = 5.0
    give_up_after: float = 30.0
    delay: float = 0.0  # before the next try; 0: the last start worked
    failing_since: float | None = None  # when the first refusal of this run of them came

    def refused(self, now: float) -> float:
        """A start refused at `now`: the seconds to wait before the next try."""
        self.delay = min(max(2 * self.delay, self.first), self.longest)
        if self.failing_since is None:
            self.failing_since = now
        return self.delay

    def gives_up(self, now: float, stranded: bool) -> bool:
        """Whether to stop trying: a pool has no worker (`stranded`) and has had none
        started for give_up_after seconds."""
        return (stranded and self.failing_since is not None
                and now - self.failing_since >= self.give_up_after)

    def worked(self) -> bool:
        """A start worked; True if it ends a run of refusals."""
        ended = self.delay > 0.0
        self.delay, self.failing_since = 0.0, None
        return ended


# Why a job goes out again, as its "Sent" line says it, by the reason an engine gives
# (local: JobState.again) and the worker it left (a pid, or a Dask worker's address).
AGAIN_WORDS = {
    "resent": "resent after the crash of {worker}",
    "requeued": "taken from dead worker {worker}'s queue, unstarted",
    "preempted": "preempted on {worker}",
    "moved": "moved from worker {worker}'s queue",
    "result_lost": "its result was lost with worker {worker}",  # Dask
    "cancelled": "cancelled by the cluster",  # Dask
    "retried": "it failed on {worker}, and --retry-failed runs it again",  # Dask
}


# Why a job is sent again, and the worker it left (None: none in particular); None for a
# first send.
Again = Optional[tuple[str, Union[int, str, None]]]


def sent_again_words(attempt: int, again: Again) -> str:
    """` (attempt 2: resent after the crash of 1469)`, ` (again: moved from worker 1471's
    queue)`; empty for a job's first send."""
    label = f"attempt {attempt}" if attempt > 1 else "again"
    if again is None:
        return f" ({label})" if attempt > 1 else ""
    return f" ({label}: {AGAIN_WORDS[again[0]].format(worker=again[1])})"
