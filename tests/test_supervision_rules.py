"""The supervision rules, as tables: no process is started here."""

from __future__ import annotations

import signal

import pytest

from taskpool.core.supervision import (
    Cause,
    Death,
    RestartIntensity,
    StartBackoff,
    Verdict,
    after_death,
    after_failure,
    halt_due,
)
from taskpool.model.policy import HaltPolicy, SupervisionPolicy

KILLED = signal.SIGKILL  # a raw wait status of a death by SIGKILL is the signal number

DEATHS = {
    "crashed": Death.crashed(signal.SIGSEGV),
    "exited": Death.crashed(3 << 8),
    "timed_out": Death.of(Cause.TIMED_OUT, job=7, seconds=1.5),
    "no_heartbeat": Death.of(Cause.NO_HEARTBEAT, seconds=10),
    "stopped": Death.of(Cause.STOPPED, signal=signal.SIGSTOP, name="SIGSTOP"),
    "memory_limit": Death.of(Cause.MEMORY_LIMIT, megabytes=200),
    "initializer_failed": Death.of(Cause.INITIALIZER_FAILED),
    "raised": Death.of(Cause.RAISED, error_type="ValueError", error=ValueError("bad")),
    "worker_lost": Death.of(Cause.WORKER_LOST, address="tcp://127.0.0.1:4001"),
    "preempted": Death.of(Cause.PREEMPTED, for_job=9),
    "grace_over": Death.of(Cause.GRACE_OVER, grace=10),
    "stopped_with_pool": Death.of(Cause.STOPPED_WITH_POOL),
    "result_lost": Death.of(Cause.RESULT_LOST, size=5_000_000),
}


@pytest.mark.parametrize(("death", "reason"), [
    ("crashed", "killed by signal 11 (SIGSEGV)"),
    ("exited", "exited with status 3"),
    ("timed_out", "ran job 7 past its timeout of 1.5 s"),
    ("no_heartbeat", "sent no heartbeat for 10 s"),
    ("stopped", "was stopped by signal 19 (SIGSTOP)"),
    ("memory_limit", "memory limit (200 MB)"),
    ("initializer_failed", "exited: its initializer raised (the traceback is in the log)"),
    ("raised", "raised ValueError: bad"),
    ("worker_lost", "its worker tcp://127.0.0.1:4001 was lost"),
    ("preempted", "was preempted for job 9"),
    ("grace_over", "was still running when the 10 s grace period ended"),
    ("stopped_with_pool", "was stopped with the pool"),
    ("result_lost", "sent a result of 5000000 bytes that could not be read"),
])
def test_each_death_says_why_in_the_words_the_log_and_results_use(death: str,
                                                                 reason: str) -> None:
    assert DEATHS[death].reason == reason


@pytest.mark.parametrize(("death", "call_reason"), [
    # An Executor's caller knows its calls, not the job ids the Dealer gave them.
    ("timed_out", "ran the call past its timeout of 1.5 s"),
    ("crashed", "killed by signal 11 (SIGSEGV)"),
    ("exited", "exited with status 3"),
    ("no_heartbeat", "sent no heartbeat for 10 s"),
    ("memory_limit", "memory limit (200 MB)"),
    ("initializer_failed", "exited: its initializer raised (the traceback is in the log)"),
])
def test_a_death_told_to_an_executor_caller_speaks_of_the_call(death: str,
                                                               call_reason: str) -> None:
    assert DEATHS[death].call_reason == call_reason


CHARGED = {"crashed", "exited", "timed_out", "no_heartbeat", "stopped", "memory_limit",
           "initializer_failed", "raised", "worker_lost", "result_lost"}


@pytest.mark.parametrize("death", sorted(DEATHS))
def test_a_death_charges_an_attempt_only_when_the_job_may_be_to_blame(death: str) -> None:
    assert DEATHS[death].charges_attempt == (death in CHARGED)
    assert DEATHS[death].requeue == (death == "preempted")


THREE = SupervisionPolicy(max_attempts=3)
UNLIMITED = SupervisionPolicy(max_attempts=0)


@pytest.mark.parametrize(("death", "failed_before", "policy", "options", "verdict", "failed"), [
    # A charged death: resent until the attempts run out, then failed.
    ("crashed", 0, THREE, {}, Verdict.RESEND, 1),
    ("crashed", 1, THREE, {}, Verdict.RESEND, 2),
    ("crashed", 2, THREE, {}, Verdict.FAIL, 3),
    ("timed_out", 2, THREE, {}, Verdict.FAIL, 3),
    ("crashed", 99, UNLIMITED, {}, Verdict.RESEND, 100),
    # Not taken yet (waiting in the dead worker's queue, or a result lost): never charged.
    ("crashed", 2, THREE, {"started": False}, Verdict.REQUEUE, 2),
    ("crashed", 0, THREE, {"started": False, "stopping": True}, Verdict.NOT_DONE, 0),
    # Our doing: a preemption goes back uncharged; grace and a stopped pool end it.
    ("preempted", 2, THREE, {}, Verdict.REQUEUE, 2),
    ("preempted", 0, THREE, {"stopping": True}, Verdict.NOT_DONE, 0),
    ("grace_over", 0, THREE, {}, Verdict.NOT_DONE, 0),
    ("stopped_with_pool", 1, THREE, {}, Verdict.NOT_DONE, 1),
    # A batch of calls cannot tell which call killed it: each goes again alone.
    ("crashed", 0, THREE, {"calls": 5}, Verdict.SPLIT, 0),
    ("grace_over", 0, THREE, {"calls": 5}, Verdict.NOT_DONE, 0),
    # While stopping, a charged death is still counted (and may fail the job)...
    ("crashed", 0, THREE, {"stopping": True}, Verdict.NOT_DONE, 1),
    ("crashed", 2, THREE, {"stopping": True}, Verdict.FAIL, 3),
])
def test_after_a_death_the_job_is_resent_failed_requeued_or_not_done(
        death: str, failed_before: int, policy: SupervisionPolicy, options: dict[str, object],
        verdict: Verdict, failed: int) -> None:
    decision = after_death(DEATHS[death], failed_before, policy, **options)  # type: ignore[arg-type]
    assert (decision.verdict, decision.failed_attempts) == (verdict, failed)


def test_a_failure_records_the_last_death_and_the_attempts_used() -> None:
    decision = after_death(DEATHS["timed_out"], 2, THREE)
    assert decision.failure_reason(DEATHS["timed_out"]) == \
        "ran job 7 past its timeout of 1.5 s on 3 attempts"


@pytest.mark.parametrize(("death", "failed_before", "options", "verdict", "next_attempt"), [
    ("crashed", 1, {}, Verdict.RESEND, 3),  # its second attempt failed: the third
    ("crashed", 1, {"started": False}, Verdict.REQUEUE, 2),  # its second, not run: again
    ("preempted", 0, {}, Verdict.REQUEUE, 1),
])
def test_a_job_sent_again_goes_as_the_attempt_after_its_failed_ones(
        death: str, failed_before: int, options: dict[str, object], verdict: Verdict,
        next_attempt: int) -> None:
    decision = after_death(DEATHS[death], failed_before, THREE, **options)  # type: ignore[arg-type]
    assert (decision.verdict, decision.next_attempt) == (verdict, next_attempt)


def test_restart_intensity_gives_up_past_max_restarts_within_the_window() -> None:
    intensity = RestartIntensity(max_restarts=2, window=5.0)
    assert not intensity.note_idle_death(100.0)
    assert not intensity.note_idle_death(101.0)
    assert intensity.note_idle_death(102.0)
    assert intensity.give_up_reason(DEATHS["exited"]) == (
        "3 workers died without taking a job within 5 s (max_restarts=2); the last exited "
        "with status 3")


def test_restart_intensity_forgets_deaths_older_than_the_window() -> None:
    intensity = RestartIntensity(max_restarts=2, window=5.0)
    for now in (100.0, 101.0, 106.5, 107.0):
        assert not intensity.note_idle_death(now)
    assert len(intensity.deaths) == 2


def test_every_cause_has_a_rule() -> None:
    assert all(isinstance(cause.rule.charges_attempt, bool) for cause in Cause)


def test_a_refused_start_is_tried_again_later_and_later_until_it_works() -> None:
    backoff = StartBackoff(first=0.1, longest=0.5, give_up_after=30)
    assert [backoff.refused(now) for now in (0, 1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff.worked() and (backoff.delay, backoff.failing_since) == (0.0, None)
    assert not backoff.worked()  # no run of refusals to end
    assert backoff.refused(10) == 0.1  # a new run of them starts from the first delay


@pytest.mark.parametrize(("stranded", "since", "now", "gives_up"), [
    (False, 0.0, 100.0, False),  # the pool runs smaller: never gives up
    (True, 0.0, 29.9, False),
    (True, 0.0, 30.0, True),  # no worker for 30 s: its jobs could never run
])
def test_a_pool_gives_up_only_with_no_worker_for_a_while(
        stranded: bool, since: float, now: float, gives_up: bool) -> None:
    backoff = StartBackoff(give_up_after=30)
    backoff.refused(since)
    assert backoff.gives_up(now, stranded) == gives_up


# --- jobs of real work: a command's crash, and failures that are no crash ------------------

COMMAND_KILLED = Death.of(Cause.COMMAND_KILLED, signal=9, name="SIGKILL")
EXITED_NONZERO = Death.of(Cause.EXITED_NONZERO, status=3)
CALL_RAISED = Death.of(Cause.CALL_RAISED, error="ValueError: bad size")


def test_a_command_killed_by_a_signal_is_a_crash_charged_an_attempt() -> None:
    assert COMMAND_KILLED.reason == "its command was killed by signal 9 (SIGKILL)"
    policy = SupervisionPolicy(max_attempts=2)
    assert after_death(COMMAND_KILLED, 0, policy).verdict is Verdict.RESEND
    assert after_death(COMMAND_KILLED, 1, policy).verdict is Verdict.FAIL


@pytest.mark.parametrize(("failure", "reason"), [
    (EXITED_NONZERO, "exit status 3"), (CALL_RAISED, "ValueError: bad size")])
@pytest.mark.parametrize(("retry_failed", "runs_before", "stopping", "verdict"), [
    (0, 0, False, Verdict.FAIL),  # the default: failed at once, never run again
    (2, 0, False, Verdict.RESEND),
    (2, 1, False, Verdict.RESEND),
    (2, 2, False, Verdict.FAIL),  # its retries used up
    (2, 0, True, Verdict.FAIL),  # nothing runs again while the pool stops
])
def test_a_job_that_ran_and_failed_runs_again_only_on_request(
        failure: Death, reason: str, retry_failed: int, runs_before: int, stopping: bool,
        verdict: Verdict) -> None:
    assert failure.cause.rule.failed and not failure.charges_attempt
    assert failure.reason == reason
    decision = after_failure(failure, runs_before, SupervisionPolicy(retry_failed=retry_failed),
                             stopping=stopping)
    assert (decision.verdict, decision.failed_attempts) == (verdict, runs_before + 1)


@pytest.mark.parametrize(("text", "failed", "jobs", "halts"), [
    ("never", 100, 100, False),
    ("now,fail=1", 0, 10, False),
    ("now,fail=1", 1, 10, True),
    ("soon,fail=3", 2, 10, False),
    ("soon,fail=3", 3, 10, True),
    ("now,fail=50%", 1, 4, False),
    ("now,fail=50%", 2, 4, True),
    ("soon,fail=10%", 1, 25, False),  # 10% of 25 is 2.5: three failures halt
    ("soon,fail=10%", 3, 25, True),
    ("now,fail=1%", 1, 3, True),  # at least one failure, however few the jobs
])
def test_halt_is_due_after_n_or_p_percent_failures(
    text: str, failed: int, jobs: int, halts: bool,
) -> None:
    halt = halt_due(HaltPolicy.parse(text), failed, jobs)
    assert (halt is not None) == halts
    if halt is not None:
        assert (halt.failed, halt.jobs) == (failed, jobs)


@pytest.mark.parametrize(("text", "when", "kills"), [
    ("soon,fail=2", "soon", False), ("now,fail=2", "now", True), ("never", "never", False)])
def test_halt_policy_reads_gnu_parallels_form(text: str, when: str, kills: bool) -> None:
    policy = HaltPolicy.parse(text)
    assert (policy.when, policy.kills_running, policy.describe()) == (when, kills, text)
