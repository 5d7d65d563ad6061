"""Fault injection: kill a worker at every step of the protocol, kill workers at random
instants, kill the Dealer, the generator and main. Every job's result is recorded exactly
once with the right value, or the job is reported not done; nothing is left behind."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import posix_ipc
import pytest

from taskpool.model.exits import EXIT_MAIN_LOST
from taskpool.observe import events as ev

from harness import (
    PoolRun,
    assert_done_right,
    assert_exactly_once,
    kill_quietly,
    kill_workers_at_random,
    queues_left,
    read_results,
    wait_for_results,
    write_job_file,
)

STEPS_THAT_LOSE_THE_ATTEMPT = {
    "before_ack": "test_worker_killed_between_receive_and_ack_loses_no_job",
    "during_compute": "test_worker_killed_after_ack_during_compute_loses_no_job",
    "before_result": "test_worker_killed_after_compute_before_sending_result_loses_no_job",
}


@pytest.mark.parametrize("step", list(STEPS_THAT_LOSE_THE_ATTEMPT),
                         ids=list(STEPS_THAT_LOSE_THE_ATTEMPT.values()))
def test_worker_killed_at_a_protocol_step_loses_no_job(tmp_path: Path, step: str) -> None:
    jobs = write_job_file(tmp_path, [f"fib {n}" for n in range(15, 21)])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--inject-fault", f"3:{step}"], events=tmp_path / "events.jsonl")
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 7))
    assert_done_right(records)
    by_job = {r["job"]: r for r in records}
    assert by_job[3]["attempts"] == 2, "the killed attempt counts, the retry completes"
    [killed] = run.events_named(ev.WORKER_EXITED, crash=True)
    assert killed["reason"] == "killed by signal 9 (SIGKILL)"
    [resent] = run.events_named(ev.JOB_RESENT)
    assert (resent["job"], resent["worker"]) == (3, killed["worker"])
    assert by_job[3]["worker"] != killed["worker"]


def test_worker_killed_after_sending_its_result_doubles_nothing(tmp_path: Path) -> None:
    # One worker: job 4 is queued behind job 3, so the run cannot end before the death of
    # the worker is handled, and the handling is what this test checks.
    jobs = write_job_file(tmp_path, ["fib 15", "fib 16", "fib 17", "sleep 0.1", "fib 18"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--results", str(results),
                   "--inject-fault", "3:after_result"], events=tmp_path / "events.jsonl")
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 6))
    assert_done_right(records)
    assert {r["job"]: r for r in records}[3]["attempts"] == 1
    [killed] = run.events_named(ev.WORKER_EXITED, crash=True)
    assert killed["reason"] == "killed by signal 9 (SIGKILL)"
    assert not run.events_named(ev.JOB_RESENT), "its result had arrived: nothing to resend"


def test_jobs_queued_behind_a_killed_job_are_requeued_without_counting_an_attempt(
    tmp_path: Path,
) -> None:
    # One worker holds a running job and a queued one; killing it mid-job gives back both.
    jobs = write_job_file(tmp_path, ["sleep 1", "fib 10", "fib 11", "fib 12"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--results", str(results),
                   "--verbose"], events=tmp_path / "events.jsonl")
    [started] = run.wait_for_event(ev.JOB_STARTED, job=1)
    worker = started["worker"]
    run.wait_for_event(ev.JOB_SENT, job=2, worker=worker)
    kill_quietly(worker)
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 5))
    assert_done_right(records)
    attempts = {r["job"]: r["attempts"] for r in records}
    assert attempts == {1: 2, 2: 1, 3: 1, 4: 1}
    assert [(e["job"], e["worker"]) for e in run.events_named(ev.JOB_RESENT)] == [(1, worker)]
    assert run.events_named(ev.JOB_REQUEUED, job=2, worker=worker, reason="unstarted")
    [_, replacement] = run.worker_pids()
    assert {r["worker"] for r in records} == {replacement}, "the replacement ran every job"


def test_workers_killed_at_random_instants_lose_no_job_and_double_no_result(
    tmp_path: Path,
) -> None:
    rng = random.Random(20261124)
    lines = [rng.choice(["sleep 0.01", "fib 12", "sleep 0", "fib 19"]) for _ in range(400)]
    jobs = write_job_file(tmp_path, lines)
    results = tmp_path / "r.jsonl"
    # Killing fresh workers before they take a job is what a crash loop looks like: raise
    # the bound that stops one, since this test does it on purpose.
    run = PoolRun(["--workers", "3", "--jobs", str(jobs), "--results", str(results),
                   "--max-attempts", "0", "--max-restarts", "1000"],
                  events=tmp_path / "events.jsonl")
    kills = kill_workers_at_random(run, rng, kills=40, pool_size=3)
    assert run.finish() == 0
    records = read_results(results)
    assert_exactly_once(records, range(1, 401))
    assert_done_right(records)
    assert kills >= 10, "the test must actually kill workers mid-run"
    crashes = run.one_event(ev.SUMMARY)["crashes"]
    assert kills - 1 <= crashes <= kills, "a last kill may hit a worker already shutting down"


def _assert_ended_run_accounts_for_every_job(results: Path, total: int) -> list[dict]:  # type: ignore[type-arg]
    records = read_results(results)
    assert_exactly_once(records, range(1, total + 1))
    done = [r for r in records if r["status"] == "done"]
    assert_done_right(done)
    for r in records:
        if r["status"] != "done":
            assert r["status"] == "not_done" and r["result"] is None and r["reason"], r
    return records


def test_dealer_killed_mid_run_keeps_recorded_results_and_reports_the_rest(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 0.05"] * 40)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results)],
                  events=tmp_path / "events.jsonl")
    # The Dealer writes a job_done event before main has the outcome: wait for main's.
    wait_for_results(results, 5)
    dealer = run.role_pid("Dealer")
    kill_quietly(dealer)
    assert run.finish() == 1
    records = _assert_ended_run_accounts_for_every_job(results, 40)
    assert 5 <= sum(r["status"] == "done" for r in records) < 40
    lost = run.one_event(ev.ROLE_LOST)
    assert (lost["lost"], lost["lost_pid"], lost["how"]) == (
        "Dealer", dealer, "killed by signal 9 (SIGKILL)")
    assert all("Dealer was lost" in r["reason"] for r in records if r["status"] == "not_done")


def test_generator_killed_while_reading_stdin_ends_the_run(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--results", str(results)], pipe_stdin=True,
                  events=tmp_path / "events.jsonl")
    for n in range(3):
        run.send_line(f"fib {n + 10}")
        run.wait_for_event(ev.JOB_DONE, job=n + 1)
    generator = run.role_pid("TaskGenerator")
    kill_quietly(generator)
    assert run.finish() == 1
    records = _assert_ended_run_accounts_for_every_job(results, 3)
    assert all(r["status"] == "done" for r in records)
    lost = run.one_event(ev.ROLE_LOST)
    assert (lost["lost"], lost["lost_pid"], lost["how"]) == (
        "TaskGenerator", generator, "killed by signal 9 (SIGKILL)")
    run.close_stdin()


def test_generator_killed_with_jobs_still_to_queue_reports_them_not_done(tmp_path: Path) -> None:
    # The Dealer reads the ready queue as fast as the generator fills it, so the generator
    # is caught mid-way by stopping the Dealer as it starts: the generator then blocks on
    # the full ready queue (ten messages) long before its 100,000th job.
    total = 100_000
    jobs = write_job_file(tmp_path, ["sleep 0"] * total)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results)],
                  events=tmp_path / "events.jsonl")
    dealer = run.role_pid("Dealer")
    os.kill(dealer, signal.SIGSTOP)
    kill_quietly(run.role_pid("TaskGenerator"))
    os.kill(dealer, signal.SIGCONT)
    assert run.finish() == 1
    records = _assert_ended_run_accounts_for_every_job(results, total)
    assert any(r["status"] == "not_done" for r in records)


def test_main_killed_takes_the_whole_pool_with_it(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 0.05"] * 100)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "3", "--jobs", str(jobs), "--results", str(results)],
                  events=tmp_path / "events.jsonl")
    run.wait_for_event(ev.JOB_DONE, job=3)
    run.wait_for_event(ev.WORKER_STARTED, count=3)
    kill_quietly(run.pid, signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    # The leftovers check (conftest) awaits every process of the run and fails on any left.
    # main wrote what it had recorded when it died (the Dealer logs a result as it sends
    # it to main, so the file may lag its job_done events by a line or two).
    records = read_results(results)
    ids = [r["job"] for r in records]
    assert len(ids) == len(set(ids))
    assert_done_right(records)


def test_main_killed_while_results_flow_the_dealer_reaps_its_workers_itself(
    tmp_path: Path,
) -> None:
    """The Dealer learns of main's death two ways, in either order: its parent-death signal,
    and a write of outcomes to main's pipe that fails. Either way it kills and reaps its
    workers itself and exits 1: none is left to whatever process adopts it (here the test
    process, a subreaper; in a container, maybe a PID 1 that never reaps). Before, a failed
    write exited at once, 3, and left them (7-13 runs in 30 in a kill storm)."""
    jobs = write_job_file(tmp_path, ["sleep 0"] * 20_000)
    for attempt in range(3):
        run = PoolRun(["--workers", "2", "--jobs", str(jobs),
                       "--results", str(tmp_path / f"r{attempt}.jsonl")],
                      events=tmp_path / f"events{attempt}.jsonl")
        dealer = run.role_pid("Dealer")
        run.wait_for_event(ev.JOB_DONE, job=300)  # the recv thread writes to main
        workers = run.worker_pids()
        kill_quietly(run.pid)
        assert run.finish() == -signal.SIGKILL
        _, status = os.waitpid(dealer, 0)  # ours now: adopted by the test process
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_MAIN_LOST
        for worker in workers:
            with pytest.raises(ChildProcessError):  # reaped by the Dealer, not adopted
                os.waitpid(worker, os.WNOHANG)


def test_every_kill_of_the_dealer_at_a_random_instant_ends_cleanly(tmp_path: Path) -> None:
    rng = random.Random(7)
    jobs = write_job_file(tmp_path, ["sleep 0.01", "fib 14"] * 30)
    for attempt in range(5):
        results = tmp_path / f"r{attempt}.jsonl"
        run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                       "--crash-rate", "0.2", "--seed", str(attempt), "--max-attempts", "0"],
                      events=tmp_path / f"events{attempt}.jsonl")
        dealer = run.role_pid("Dealer")
        run.wait_for_event(ev.JOB_DONE, job=rng.randint(1, 40))
        kill_quietly(dealer)
        code = run.finish()
        assert code in (0, 1)
        _assert_ended_run_accounts_for_every_job(results, 60)


def _plant_queue_name(pid: int) -> str:
    """A name as our creators make it, left as if its creator died inside the window
    between mq_open and mq_unlink."""
    name = f"taskpool-{pid}-worker-{os.urandom(8).hex()}"
    posix_ipc.MessageQueue(f"/{name}", flags=posix_ipc.O_CREX, mode=0o600,
                           max_messages=1, max_message_size=64).close()
    return name


def test_a_dealer_killed_inside_a_queue_creation_leaves_no_name(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sleep 0.05"] * 40)
    run = PoolRun(["--workers", "2", "--jobs", str(jobs)], events=tmp_path / "events.jsonl")
    dealer = run.role_pid("Dealer")
    planted = _plant_queue_name(dealer)
    kill_quietly(dealer)
    assert run.finish() == 1
    assert planted not in queues_left()


def test_names_whose_creator_is_dead_are_swept_and_others_kept(tmp_path: Path) -> None:
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    dead_creator = _plant_queue_name(child)
    live_creator = _plant_queue_name(os.getpid())
    try:
        jobs = write_job_file(tmp_path, ["fib 5"])
        assert PoolRun(["--workers", "1", "--jobs", str(jobs)]).finish() == 0
        left = queues_left()
        assert dead_creator not in left
        assert live_creator in left
    finally:
        for name in (dead_creator, live_creator):
            try:
                posix_ipc.unlink_message_queue(f"/{name}")
            except posix_ipc.ExistentialError:
                pass
