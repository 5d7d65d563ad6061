"""The log reads as the story of the run, told by its events' fields: a job sent again says
why and which worker it left, a simulated crash names its job and step, a result that
reached us from a worker already reaped says it left before the death. (The lines' wording
is tests/test_log_format.py's.)"""

from __future__ import annotations

from pathlib import Path

from taskpool.observe import events as ev

from harness import Event, PoolRun, assert_exactly_once, kill_quietly, read_results, write_job_file


def _sends_by_job(run: PoolRun) -> dict[int, list[Event]]:
    sends: dict[int, list[Event]] = {}
    for e in run.events_named(ev.JOB_SENT):
        sends.setdefault(e["job"], []).append(e)
    return sends


def _assert_each_send_again_says_why(run: PoolRun) -> set[str]:
    """Every send of a job after its first says why, and names the worker it was sent to
    before; the reasons seen."""
    reasons = set()
    for job, sends in _sends_by_job(run).items():
        assert "again" not in sends[0], sends[0]
        for before, again in zip(sends, sends[1:]):
            assert again["again"] in {"resent", "requeued", "moved", "preempted"}, again
            assert again["from_worker"] == before["worker"], (job, sends)
            reasons.add(again["again"])
            # A resend is a later attempt; the others go again as the same attempt.
            assert (again["attempt"] > before["attempt"]) == (again["again"] == "resent")
    return reasons


def test_every_job_sent_again_says_why_and_which_worker_it_left(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 20", "sleep 0.01"] * 8)
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--crash-rate", "0.4", "--seed", "7",
                   "--max-attempts", "0"], events=tmp_path / "crashes.jsonl")
    assert run.finish() == 0
    assert "resent" in _assert_each_send_again_says_why(run)
    # A simulated crash names the attempt it ends: the job, its attempt and the step.
    crashes = run.events_named(ev.SIMULATED_CRASH)
    assert crashes
    for crash in crashes:
        assert crash["step"] in {"before_ack", "during_compute", "before_result"}
        assert run.events_named(ev.JOB_SENT, job=crash["job"], worker=crash["pid"],
                                attempt=crash["attempt"])


def test_a_job_waiting_in_a_dead_worker_s_queue_is_sent_again_as_requeued(
    tmp_path: Path,
) -> None:
    jobs = write_job_file(tmp_path, ["sleep 1", "fib 10"])
    run = PoolRun(["--workers", "1", "--jobs", str(jobs)], events=tmp_path / "e.jsonl")
    [started] = run.wait_for_event(ev.JOB_STARTED, job=1)
    run.wait_for_event(ev.JOB_SENT, job=2, worker=started["worker"])
    kill_quietly(started["worker"])
    assert run.finish() == 0
    assert _assert_each_send_again_says_why(run) == {"resent", "requeued"}
    [again] = _sends_by_job(run)[2][1:]
    assert (again["again"], again["from_worker"]) == ("requeued", started["worker"])


def test_a_result_from_a_worker_already_reaped_says_it_was_sent_before_the_death(
    tmp_path: Path,
) -> None:
    # Each injected worker kills itself right after sending its result: the recovery thread
    # may reap it before the recv thread reads that result, or after. Either way the result
    # counts once; when the worker was reaped first, the result says it left before.
    jobs = write_job_file(tmp_path, ["fib 5"] * 12)
    results = tmp_path / "r.jsonl"
    faults = [arg for job in range(1, 12, 2) for arg in ("--inject-fault", f"{job}:after_result")]
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results), *faults],
                  events=tmp_path / "e.jsonl")
    assert run.finish() == 0
    assert_exactly_once(read_results(results), range(1, 13))
    # (The last of them may die as the pool stops: reaped, but not counted a crash.)
    dead = {e["worker"] for e in run.events_named(ev.WORKER_EXITED)
            if e["reason"] == "killed by signal 9 (SIGKILL)"}
    assert len(dead) == 6
    for done in run.events_named(ev.JOB_DONE):
        if done.get("sent_before_death"):
            assert done["worker"] in dead, done
