"""The log's wording, in one place: the seed's tone (``[Dealer] Sent job 1 -> fib(30)``,
``[Supervisor] Worker PID N killed by signal 11 (SIGSEGV)``, ``[Recovery] Resent job N after
crash of PID``), the exit table and the summary line.

Every other test reads a run's events (`--events`) and never a log line's wording: a
rewording of a line breaks the tests of this file, and only these. Here each line of a kind
that has an event is checked against that event's fields (the line says what the event
holds), over runs that show every such kind; and the plain text log of the demo, the one a
user sees first, is read as the user reads it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from taskpool.observe import events as ev

from harness import Event, PoolRun, kill_quietly, read_events, write_job_file


def test_the_demo_log_reads_in_the_seed_s_tone() -> None:
    """The demo as a user first runs it: the text log alone, no events file."""
    run = PoolRun(["--demo"])
    assert run.finish() == 0
    log = run.log_text()
    lines = log.splitlines()
    assert re.fullmatch(r"\[Main\] Simulating crashes: rate 0.3, seed \d+ \(repeat with "
                        r"--seed \d+\)", lines[0])
    assert re.search(r"^\[Dealer\] Starting \(PID \d+\) with 4 workers$", log, re.M)
    assert re.search(r"^\[TaskGenerator\] Starting \(PID \d+\), reading 12 jobs$", log, re.M)
    assert len(re.findall(r"^\[Worker \d+\] Starting up$", log, re.M)) >= 4
    assert "[Dealer] Sent job 1 -> fib(30)" in lines
    assert "[Dealer] Sent job 6 -> fib(35)" in lines
    assert "[Dealer] Received result for job 1: 832040 from worker PID [" in log
    crashes = re.findall(r"^\[Supervisor\] Worker PID (\d+) killed by signal 11 \(SIGSEGV\)$",
                         log, re.M)
    assert len(crashes) >= 3, log
    for pid in crashes:  # each names the job and the step it crashed at
        assert re.search(rf"^\[Worker {pid}\] Simulated crash! \(job \d+, (before_ack|"
                         r"during_compute|before_result), attempt \d+\)$", log, re.M), log
    resent = re.findall(r"^\[Recovery\] Resent job (\d+) after crash of (\d+)$", log, re.M)
    assert resent and {pid for _, pid in resent} <= set(crashes)
    # A job sent again says why: its crash (a later attempt), or the queue it left.
    assert re.search(r"^\[Dealer\] Sent job \d+ -> \w+\([\d.]+\) \(attempt 2: resent after "
                     r"the crash of \d+\)$", log, re.M)
    sent: dict[str, int] = {}
    for job, why in re.findall(r"^\[Dealer\] Sent job (\d+) -> \S+( \(.*\))?$", log, re.M):
        sent[job] = sent.get(job, 0) + 1
        assert (sent[job] == 1) == (why == ""), f"job {job}: {why!r}"
    assert "[Dealer] All jobs completed. Shutting down workers..." in lines
    assert lines[-5] == "[Main] All done."
    # The exit table: per pool, then the attempts the done jobs took.
    assert lines[-4].split()[1:] == ["pool", "workers", "done", "failed", "not", "done",
                                     "crashes", "restarts"]
    row = lines[-3].split()
    assert row[1:7] == ["type", "1", "4", "12", "0", "0"] and int(row[7]) == len(crashes)
    histogram = re.fullmatch(r"\[Main\] Attempts per done job: (.*)", lines[-2])
    assert histogram is not None
    counts = dict(pair.split(": ") for pair in histogram.group(1).split(", "))
    assert sum(map(int, counts.values())) == 12 and "2" in counts
    assert re.fullmatch(
        rf"\[Main\] Summary: 12 jobs, 12 done, 0 failed, 0 not done, {len(crashes)} crashes, "
        r"\d+ resends, wall time [\d.]+ s", lines[-1])


def test_the_policy_is_printed_at_start() -> None:
    run = PoolRun(["--workers", "2", "--max-attempts", "5", "--timeout", "30"], stdin=b"fib 3\n")
    assert run.finish() == 0
    assert ("[Supervisor] one_for_one, max_attempts=5, max_restarts=10 in 5s, timeout=30s, "
            "heartbeat=10s, grace=10s, max_tasks_per_child=none, max_memory=none"
            ) in run.log_text().splitlines()[:4]


def test_the_log_can_go_to_a_file(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    run = PoolRun(["--workers", "1", "--log", str(log_file)], stdin=b"fib 5\n")
    assert run.finish() == 0
    assert run.log_text() == ""
    text = log_file.read_text()
    assert "[Dealer] Received result for job 1: 5 from worker PID [" in text
    assert text.splitlines()[-1].startswith("[Main] Summary: 1 jobs, 1 done")


def test_per_job_lines_read_the_same_with_the_text_log_alone_as_through_logging(
    tmp_path: Path,
) -> None:
    # With the text log alone, a per-job line is written without `logging` (log.job_event);
    # with an events file, through it. The two must give the same line.
    from taskpool.observe import log as tplog

    def lines(events: bool, level: int = logging.INFO) -> tuple[str, list[dict[str, Any]]]:
        text, jsonl = tmp_path / f"text-{events}-{level}", tmp_path / f"events-{events}-{level}"
        fd = os.open(text, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        events_fd = os.open(jsonl, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if events else None
        try:
            tplog.setup(fd, level, events_fd)
            for role in ("dealer", "recovery", "worker"):
                tplog.job_event(logging.getLogger(f"taskpool.{role}"), "job_done",
                                "Received result for job %d: %s from worker PID [%d]%s", 7,
                                0.25, 4242, " (attempt 2)", job=7, worker=4242, at=1.5)
        finally:
            tplog.setup(None)
            for descriptor in filter(None, (fd, events_fd)):
                os.close(descriptor)
        return text.read_text(), read_events(jsonl) if events else []

    alone, _ = lines(events=False)
    through_logging, events = lines(events=True)
    assert alone == through_logging
    assert alone.splitlines() == [
        "[Dealer] Received result for job 7: 0.25 from worker PID [4242] (attempt 2)",
        "[Recovery] Received result for job 7: 0.25 from worker PID [4242] (attempt 2)",
        f"[Worker {os.getpid()}] Received result for job 7: 0.25 from worker PID [4242] "
        "(attempt 2)"]
    assert [(e["event"], e["job"], e["worker"], e["t"]) for e in events] == \
        [("job_done", 7, 4242, 1.5)] * 3
    assert lines(events=False, level=logging.WARNING)[0] == ""  # below the log's level


# --- each event's line says its fields -----------------------------------------------------

AGAIN = {"resent": "resent after the crash of {}", "preempted": "preempted on {}",
         "requeued": "taken from dead worker {}'s queue, unstarted",
         "moved": "moved from worker {}'s queue"}


def _retry(e: Event) -> str:
    """` (attempt 2: resent after the crash of 1469)`, ` (again: moved from ...)`."""
    label = f"attempt {e['attempt']}" if e["attempt"] > 1 else "again"
    if "again" not in e:
        return f" ({label})" if e["attempt"] > 1 else ""
    return f" ({label}: {AGAIN[e['again']].format(e['from_worker'])})"


def _sent(e: Event) -> str:
    what = f"{e['kind']}({'' if e['kind'] == 'crash' else e['arg']})"
    if "pool" not in e:  # a plain run's
        return f"[Dealer] Sent job {e['job']} -> {what}{_retry(e)}"
    typed = f"{float(e['arg'])!r}s" if e["kind"] == "sleep" else what
    priority = f", priority {e['priority']}" if e["priority"] else ""
    return (f"[Dealer] Job {e['job']} ({e['pool']}, {typed}{priority}) -> worker "
            f"{e['worker']}{_retry(e)}")


def _worker(e: Event) -> str:
    return f"[Worker {e['pid']}{' ' + e['pool'] if 'pool' in e else ''}]"


def _exited(e: Event) -> str | re.Pattern[str]:
    if e["reason"] == "retired":  # after --max-tasks-per-child jobs
        return re.compile(rf"\[Supervisor\] Worker PID {e['worker']} retired after \d+ jobs")
    if e["reason"].startswith("memory limit"):
        return f"[Supervisor] Worker PID {e['worker']} ran out of its {e['reason']}"
    if e["crash"]:
        return f"[Supervisor] Worker PID {e['worker']} {e['reason']}"
    return f"[Supervisor] Reaped worker {e['worker']}: {e['reason']}"


def _stopping(e: Event) -> str:
    if e["grace"] == 0:
        return f"[Dealer] Stopping now: killing {e['running']} running jobs"
    # main's SIGTERM to the Dealer is no signal to name: main's line before it names the
    # one it was sent.
    return (f"[Dealer] Stopping: letting {e['running']} running jobs finish "
            f"(grace {e['grace']:g} s); {e['not_started']} jobs not started")


def _requeued(e: Event) -> str:
    why = {"unstarted": "it was waiting, unstarted, for ", "preempted": "preempted on "}
    return f"[Recovery] Requeued job {e['job']}: {why[e['reason']]}{e['worker']}"


def _summary(e: Event) -> re.Pattern[str]:
    return re.compile(re.escape(
        f"[Main] Summary: {e['jobs']} jobs, {e['done']} done, {e['failed']} failed, "
        f"{e['not_done']} not done, {e['crashes']} crashes, {e['resends']} resends, wall time "
    ) + r"[\d.]+ s")


def _pool_row(e: Event) -> str:
    return (f"[Main] {'type ' + str(e['type']):<10} {e['workers']:7d} {e['done']:6d} "
            f"{e['failed']:6d} {e['not_done']:8d} {e['crashes']:7d} {e['restarts']:8d}")


def _histogram(e: Event) -> str:
    pairs = ", ".join(f"{n}: {count}" for n, count in e["attempts"].items()) or "none"
    return f"[Main] Attempts per done job: {pairs}"


LINES: dict[str, Callable[[Event], str | re.Pattern[str]]] = {
    ev.DEALER_STARTED: lambda e: re.compile(  # typed pools: and each pool's size
        rf"\[Dealer\] Starting \(PID {e['pid']}\) with {e['workers']} workers( \(.+\))?"),
    ev.WORKER_STARTED: lambda e: f"{_worker(e)} Starting up",
    ev.SIMULATED_CRASH: lambda e: f"{_worker(e)} Simulated crash! (job {e['job']}, "
                                  f"{e['step']}, attempt {e['attempt']})",
    ev.JOB_SENT: _sent,
    ev.JOB_STARTED: lambda e: f"[Dealer] Job {e['job']} started by worker PID [{e['worker']}] "
                              f"(ACK, attempt {e['attempt']})",
    ev.JOB_FINISHED: lambda e: f"{_worker(e)} Done job {e['job']}",
    ev.JOB_DONE: lambda e: f"[Dealer] Received result for job {e['job']}: {e['result']} from "
                           f"worker PID [{e['worker']}]"
                           + (" (sent before it died)" if e.get("sent_before_death") else ""),
    ev.RUN_RESUMED: lambda e: (
        f"[Main] {e['done']} of {e['jobs']} jobs already done in {e['journal']}"
        + (f", {e['failed']} failed" if e["failed"] else "")
        + f"; running the other {e['jobs'] - e['done'] - e['failed']}"),
    ev.JOB_RESENT: lambda e: f"[Recovery] Resent job {e['job']} after crash of {e['worker']}",
    ev.JOB_REQUEUED: _requeued,
    ev.JOB_FAILED: lambda e: f"[Supervisor] Job {e['job']} failed after {e['attempts']} "
                             f"attempts: {e['reason']}",
    ev.JOB_PREEMPTED: lambda e: re.compile(
        rf"\[Supervisor\] Preempting job {e['job']} \(priority \d+\) on worker PID "
        rf"{e['worker']} for job {e['for_job']} \(priority \d+\)"),
    ev.WORKER_EXITED: _exited,
    ev.WORKER_KILLED: lambda e: f"[Supervisor] Worker PID {e['worker']} {e['reason']}: killed it",
    ev.GAVE_UP: lambda e: f"[Supervisor] Giving up: {e['reason']}",
    ev.ALL_JOBS_COMPLETED: lambda e: "[Dealer] All jobs completed. Shutting down workers...",
    ev.INTERRUPTED: lambda e: f"[Main] Interrupted by {e['signal']}: stopping the pool",
    ev.INTERRUPTED_AGAIN: lambda e: (f"[Main] Second {e['signal']}: stopping running jobs now"
                                     if e["rung"] == 2
                                     else f"[Main] {e['signal']} again: killing the pool"),
    ev.STOPPING: _stopping,
    ev.ROLE_LOST: lambda e: f"[Main] {e['lost']} (PID {e['lost_pid']}) {e['how']}: ending the run",
    ev.TABLE_HEADER: lambda e: "[Main] pool       workers   done failed not done crashes restarts",
    ev.POOL_SUMMARY: _pool_row,
    ev.ATTEMPTS_HISTOGRAM: _histogram,
    ev.SUMMARY: _summary,
}


def _says_its_fields(e: Event) -> bool:
    expected = LINES[e["event"]](e)
    if isinstance(expected, re.Pattern):
        return expected.fullmatch(e["text"]) is not None
    return bool(e["text"] == expected)


def _crashes(tmp_path: Path, events: Path) -> PoolRun:
    jobs = write_job_file(tmp_path, ["fib 20", "sleep 0.01"] * 6)
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--crash-rate", "0.4", "--seed", "7",
                   "--max-attempts", "0"], events=events)
    assert run.finish() == 0
    return run


def _poison_timeout_and_retirement(tmp_path: Path, events: Path) -> PoolRun:
    jobs = write_job_file(tmp_path, ["crash", "sleep 60 timeout=0.3", "fib 10", "fib 11"])
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--max-attempts", "2",
                   "--max-tasks-per-child", "1"], events=events)
    assert run.finish() == 1
    return run


def _worker_killed_with_a_job_queued(tmp_path: Path, events: Path) -> PoolRun:
    jobs = write_job_file(tmp_path, ["sleep 1", "fib 10"])
    run = PoolRun(["--workers", "1", "--jobs", str(jobs)], events=events)
    [started] = run.wait_for_event(ev.JOB_STARTED, job=1)
    run.wait_for_event(ev.JOB_SENT, job=2, worker=started["worker"])
    kill_quietly(started["worker"])
    assert run.finish() == 0
    return run


def _two_signals(tmp_path: Path, events: Path) -> PoolRun:
    jobs = write_job_file(tmp_path, ["sleep 60"] * 3)
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--grace", "1000"], events=events)
    run.wait_for_event(ev.JOB_STARTED, count=2)
    os.kill(run.pid, signal.SIGTERM)
    run.wait_for_event(ev.STOPPING)
    os.kill(run.pid, signal.SIGTERM)
    assert run.finish() == 143
    return run


def _dealer_lost(tmp_path: Path, events: Path) -> PoolRun:
    jobs = write_job_file(tmp_path, ["sleep 0.05"] * 20)
    run = PoolRun(["--workers", "2", "--jobs", str(jobs)], events=events)
    run.wait_for_event(ev.JOB_DONE)
    kill_quietly(run.role_pid("Dealer"))
    assert run.finish() == 1
    return run


def _crash_loop(tmp_path: Path, events: Path) -> PoolRun:
    jobs = write_job_file(tmp_path, ["fib 5"] * 3)
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--inject-fault", "at_start"],
                  events=events)
    assert run.finish() == 1
    return run


def _typed_pool_preempted(tmp_path: Path, events: Path) -> PoolRun:
    run = PoolRun(["1", "--preempt"], command_name="dispatch", pipe_stdin=True, events=events)
    run.send_line("1 2")
    run.wait_for_event(ev.JOB_STARTED, job=1)
    run.send_line("1 0 9")
    run.close_stdin()
    assert run.finish() == 0
    return run


def _resumed(tmp_path: Path, events: Path) -> PoolRun:
    journal = str(tmp_path / "run.db")
    first = write_job_file(tmp_path, ["fib 5", "fib 6"])
    assert PoolRun(["--workers", "1", "--jobs", str(first), "--journal", journal]).finish() == 0
    more = tmp_path / "more.txt"
    more.write_text("fib 5\nfib 6\nfib 7\n")
    run = PoolRun(["--workers", "1", "--jobs", str(more), "--journal", journal, "--resume",
                   "--force-resume"], events=events)
    assert run.finish() == 0
    [resumed] = run.events_named(ev.RUN_RESUMED)
    assert (resumed["done"], resumed["failed"], resumed["jobs"]) == (2, 0, 3)
    return run


SCENARIOS: dict[str, tuple[Callable[[Path, Path], PoolRun], set[str]]] = {
    "crashes": (_crashes, {ev.DEALER_STARTED, ev.WORKER_STARTED, ev.SIMULATED_CRASH, ev.JOB_SENT,
                     ev.JOB_STARTED, ev.JOB_DONE, ev.WORKER_EXITED, ev.JOB_RESENT,
                     ev.ALL_JOBS_COMPLETED, ev.TABLE_HEADER, ev.POOL_SUMMARY,
                     ev.ATTEMPTS_HISTOGRAM, ev.SUMMARY}),
    "poison_timeout_and_retirement": (_poison_timeout_and_retirement, {
        ev.JOB_FAILED, ev.WORKER_KILLED, ev.WORKER_EXITED, ev.JOB_RESENT}),
    "worker_killed_with_a_job_queued": (_worker_killed_with_a_job_queued, {
        ev.JOB_RESENT, ev.JOB_REQUEUED, ev.WORKER_EXITED}),
    "two_signals": (_two_signals, {ev.INTERRUPTED, ev.INTERRUPTED_AGAIN, ev.STOPPING}),
    "dealer_lost": (_dealer_lost, {ev.ROLE_LOST}),
    "crash_loop": (_crash_loop, {ev.GAVE_UP}),
    "resumed": (_resumed, {ev.RUN_RESUMED}),
    "typed_pool_preempted": (_typed_pool_preempted, {
        ev.JOB_SENT, ev.JOB_FINISHED, ev.JOB_PREEMPTED, ev.JOB_REQUEUED, ev.WORKER_STARTED}),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_each_event_s_line_says_its_fields(tmp_path: Path, scenario: str) -> None:
    start, shown = SCENARIOS[scenario]
    events = tmp_path / "events.jsonl"
    start(tmp_path, events)
    found = read_events(events)
    assert shown <= {e["event"] for e in found}, "the scenario shows these kinds of line"
    for e in found:
        tag = f"[{e['role']}" + (f" {e['pid']}" if e["role"] == "Worker" else "")
        assert e["text"].startswith(tag), e
        if e["event"] in LINES:
            assert _says_its_fields(e), e
    if scenario == "two_signals":
        assert [e["grace"] for e in found if e["event"] == ev.STOPPING] == [1000, 0]
    if scenario == "crashes":
        resends = [e for e in found if e["event"] == ev.JOB_SENT and e["attempt"] > 1]
        assert resends and all(e["text"].endswith(_retry(e)) and "again" in e
                               for e in resends)
