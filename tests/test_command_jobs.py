"""Jobs of real work end to end: sh, exec and call lines run as a user runs them, watched
through the events and the results; a command's processes are found by their process
group in /proc, never by a log line."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from taskpool.observe import events as ev

from harness import (
    ROOT,
    PoolRun,
    group_members,
    read_results,
    wait_for_files,
    write_job_file,
)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def wait_until_ended(pids: list[int], timeout: float = 60.0) -> list[int]:
    """Block (select on pidfds) until every process of `pids` has ended; those still
    running after `timeout`, which only bounds a failure."""
    pidfds = []
    for pid in pids:
        try:
            pidfds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass  # gone already
    try:
        waiting = list(pidfds)
        while waiting:
            ready, _, _ = select.select(waiting, [], [], timeout)
            if not ready:
                break
            waiting = [fd for fd in waiting if fd not in ready]
        return [pid for pid, fd in zip(pids, pidfds) if fd in waiting]
    finally:
        for fd in pidfds:
            os.close(fd)


def by_job(path: Path) -> dict[int, dict[str, Any]]:
    return {r["job"]: r for r in read_results(path)}


@dataclass
class MidCommand:
    """A run (of either engine) whose job 1 is a command tree held mid-way in its first
    attempt, and whose job 2 keeps the run open until the test releases it."""

    run: PoolRun
    marks: Path
    kept: Path
    results: Path
    out: Path
    leader: int  # the command's first process: its process group's id
    tree: list[int]  # the processes of its group
    worker: int  # the worker whose child it is


def start_mid_command(tmp_path: Path, engine: list[str]) -> MidCommand:
    marks, kept = tmp_path / "marks", tmp_path / "kept"
    marks.mkdir()
    os.mkfifo(marks / "release")
    # Attempt 1: a shell, a subshell and its sleep, all in the command's group; it says so
    # in files, then waits. Attempt 2 prints and ends. Job 2 keeps the run going until the
    # test has seen the first tree end: its death is the engine's doing, not the run's end.
    first = (f"if [ -e {marks}/first ]; then echo second attempt; else echo first attempt; "
             f"echo $$ > {marks}/leader; (sleep 300 & touch {marks}/first; wait) & wait; fi")
    jobs = write_job_file(tmp_path, [f"sh {first}", f"sh read line < {marks}/release"])
    results, out = tmp_path / "r.jsonl", tmp_path / "out.txt"
    run = PoolRun([*engine, "--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--output-dir", str(kept)], events=tmp_path / "events.jsonl", stdout=out)
    wait_for_files(marks, lambda: (marks / "first").exists() or None, "the first attempt")
    leader = int((marks / "leader").read_text())
    tree = group_members(leader)
    assert len(tree) >= 3, f"the shell, the subshell and its sleep: {tree}"
    return MidCommand(run, marks, kept, results, out, leader, tree, parent_of(leader))


def kill_its_worker(case: MidCommand) -> None:
    """SIGKILL the worker mid-command: the command's tree ends with it, the job is resent."""
    os.kill(case.worker, signal.SIGKILL)
    assert wait_until_ended(case.tree) == [], "the command's tree outlived its worker"
    [resent] = case.run.wait_for_event(ev.JOB_RESENT)
    assert (resent["job"], resent["worker"]) == (1, case.worker)


def finish_mid_command(case: MidCommand) -> None:
    """Release job 2; job 1 is done on its second attempt, its output kept once."""
    with open(case.marks / "release", "w") as release:
        release.write("go\n")
    assert case.run.finish() == 0
    record = by_job(case.results)[1]
    assert (record["status"], record["attempts"], record["exit_status"]) == ("done", 2, 0)
    assert (case.kept / "1.out").read_text() == "second attempt\n", "its output, once"
    assert case.out.read_text() == ""


def test_worker_killed_mid_command_takes_the_command_tree_and_the_job_is_resent(
        tmp_path: Path) -> None:
    case = start_mid_command(tmp_path, [])
    assert case.worker in case.run.worker_pids(), "the command is a child of its worker"
    [run_dir] = case.kept.glob("taskpool-run-*")
    assert (run_dir / f"1.{case.worker}.out").read_text() == "first attempt\n"
    kill_its_worker(case)
    assert not (run_dir / f"1.{case.worker}.out").exists(), "the cut attempt's output is dropped"
    finish_mid_command(case)
    assert group_members(case.leader) == []


def run_a_command_past_its_timeout(tmp_path: Path, engine: list[str]
                                   ) -> tuple[PoolRun, dict[int, dict[str, Any]], int]:
    """A command that ignores SIGTERM run past its timeout, on one attempt, and a job after
    it: the first fails for its timeout, the other is done. The run, its records, and the
    command's first process (its process group's id)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    jobs = write_job_file(tmp_path, [
        f"timeout=0.5 sh trap '' TERM; echo $$ > {marks}/leader; sleep 300", "sh echo fine"])
    results = tmp_path / "r.jsonl"
    run = PoolRun([*engine, "--workers", "1", "--jobs", str(jobs), "--results", str(results),
                   "--max-attempts", "1"], events=tmp_path / "events.jsonl")
    assert run.finish() == 1
    records = by_job(results)
    assert records[1]["status"] == "failed"
    assert records[1]["reason"] == "ran job 1 past its timeout of 0.5 s on 1 attempts"
    assert "exit_status" not in records[1]
    assert records[2]["status"] == "done"
    return run, records, int((marks / "leader").read_text())


def test_timeout_ends_a_command_that_ignores_sigterm(tmp_path: Path) -> None:
    run, _, leader = run_a_command_past_its_timeout(tmp_path, [])
    assert group_members(leader) == []
    [failed] = run.events_named(ev.JOB_FAILED, job=1)
    assert failed["attempts"] == 1


def test_command_killed_by_sigkill_counts_as_a_crash(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sh echo dying; kill -9 $$", "exec true"])
    results, out = tmp_path / "r.jsonl", tmp_path / "out.txt"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--max-attempts", "2"], events=tmp_path / "events.jsonl", stdout=out)
    assert run.finish() == 1
    records = by_job(results)
    assert records[1]["status"] == "failed"
    assert records[1]["attempts"] == 2
    assert records[1]["reason"] == "its command was killed by signal 9 (SIGKILL) on 2 attempts"
    assert len(run.events_named(ev.JOB_RESENT, job=1)) == 1, "resent once, then failed"
    assert records[2]["status"] == "done"
    assert "dying" not in out.read_text(), "a crashed attempt's output is never printed"


def test_nonzero_exit_is_failed_with_its_exit_status_and_not_run_again(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sh echo out-3; echo err-3 >&2; exit 3",
                                     "exec printf '%s\\n' 'two words'", "exec no-such-program-x"])
    results, out = tmp_path / "r.jsonl", tmp_path / "out.txt"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results)],
                  events=tmp_path / "events.jsonl", stdout=out)
    assert run.finish() == 1
    records = by_job(results)
    assert records[1]["status"] == "failed"
    assert records[1]["reason"] == "exit status 3"
    assert (records[1]["exit_status"], records[1]["attempts"]) == (3, 1)
    assert isinstance(records[1]["duration"], float) and records[1]["duration"] >= 0
    assert records[1]["arg"] == "echo out-3; echo err-3 >&2; exit 3"
    assert (records[2]["status"], records[2]["exit_status"]) == ("done", 0)
    assert (records[3]["status"], records[3]["reason"]) == ("failed", "exit status 127")
    assert run.events_named(ev.JOB_RESENT) == []
    printed = out.read_text().splitlines()
    assert sorted(printed) == ["out-3", "two words"]
    assert "err-3" in run.log_text().splitlines()
    assert "taskpool: cannot run 'no-such-program-x': No such file or directory" in \
        run.log_text().splitlines()


def test_call_returns_its_value_and_a_raising_or_unimportable_call_fails_alone(
        tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ['call tests.call_targets:fail "bad size"',
                                     "call no_such_module_for_taskpool:f 1",
                                     "call tests.call_targets:square 7",
                                     "sh echo after"])
    results, out = tmp_path / "r.jsonl", tmp_path / "out.txt"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--results", str(results)],
                  events=tmp_path / "events.jsonl", stdout=out)
    assert run.finish() == 1
    records = by_job(results)
    assert (records[1]["status"], records[1]["reason"]) == ("failed", "ValueError: bad size")
    assert records[2]["status"] == "failed"
    assert records[2]["reason"].startswith(
        "cannot import no_such_module_for_taskpool:f: ModuleNotFoundError")
    assert (records[3]["status"], records[3]["result"]) == ("done", 49)
    assert records[3]["kind"] == "call"
    assert records[4]["status"] == "done"
    assert len(run.worker_pids()) == 1, "no call cost the pool its worker"
    assert out.read_text().splitlines() == ["squaring 7", "after"]
    assert "to stderr 7" in run.log_text().splitlines()


def test_output_dir_keeps_each_jobs_output_and_results_name_the_files(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sh echo one; echo uno >&2", "exec echo two",
                                     "sh exit 4", "fib 10"])
    results, out, kept = tmp_path / "r.jsonl", tmp_path / "out.txt", tmp_path / "kept"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results),
                   "--output-dir", str(kept)], stdout=out)
    assert run.finish() == 1
    records = by_job(results)
    for job in (1, 2, 3):
        assert records[job]["stdout"] == str(kept / f"{job}.out")
        assert records[job]["stderr"] == str(kept / f"{job}.err")
    assert "stdout" not in records[4]
    assert (kept / "1.out").read_text() == "one\n"
    assert (kept / "1.err").read_text() == "uno\n"
    assert (kept / "2.out").read_text() == "two\n"
    assert (kept / "3.out").read_text() == "" and records[3]["exit_status"] == 4
    assert sorted(os.listdir(kept)) == ["1.err", "1.out", "2.err", "2.out", "3.err", "3.out"], \
        "the run's own directory is gone"
    assert out.read_text() == "", "kept, not printed"


def test_bad_command_lines_are_named_and_nothing_runs(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sh echo fine", "sh", "sh echo 'open", "exec",
                                     "call no_colon", "call m:f in.png", "exec echo \"x"])
    results = tmp_path / "r.jsonl"
    proc = subprocess.run([sys.executable, "-m", "taskpool", "run", "--jobs", str(jobs),
                           "--results", str(results)], cwd=ROOT, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"taskpool: {jobs}:2: sh: empty command (expected 'sh COMMAND')",
        f"taskpool: {jobs}:3: sh: unbalanced quote: no closing quotation",
        f"taskpool: {jobs}:4: exec: empty command (expected 'exec PROGRAM [ARGS...]')",
        f"taskpool: {jobs}:5: call: expected 'call module:function [JSON ARGS...]', got "
        "'no_colon'",
        f"taskpool: {jobs}:6: call: argument 1 ('in.png') is not a JSON value (a string "
        "needs double quotes: \"in.png\")",
        f"taskpool: {jobs}:7: exec: unbalanced quote: no closing quotation",
        f"taskpool: {jobs}: 6 bad line(s); nothing was run",
    ]
    assert not results.exists()


def test_a_bad_command_line_on_stdin_is_skipped_and_the_others_run(tmp_path: Path) -> None:
    results, out = tmp_path / "r.jsonl", tmp_path / "out.txt"
    run = PoolRun(["--workers", "1", "--results", str(results)],
                  stdin=b"sh echo a\ncall nothing\nsh echo b\n", stdout=out)
    assert run.finish() == 2
    assert sorted(r["arg"] for r in read_results(results)) == ["echo a", "echo b"]
    assert "taskpool: <stdin>:2: call: expected 'call module:function [JSON ARGS...]', got " \
           "'nothing'" in run.log_text().splitlines()
    assert sorted(out.read_text().splitlines()) == ["a", "b"]


def test_dispatch_runs_sh_jobs_on_the_workers_of_their_type(tmp_path: Path) -> None:
    results, out = tmp_path / "r.jsonl", tmp_path / "out.txt"
    lines = b"type=1 sh echo one\ntype=2 priority=3 sh echo two type=9\n2 0.1\n"
    run = PoolRun(["1", "2", "--results", str(results)], command_name="dispatch",
                  stdin=lines, events=tmp_path / "events.jsonl", stdout=out)
    assert run.finish() == 0
    records = by_job(results)
    types = run.worker_types()
    assert (records[1]["type"], types[records[1]["worker"]]) == (1, "1")
    assert (records[2]["type"], types[records[2]["worker"]]) == (2, "2")
    assert (records[2]["priority"], records[2]["arg"]) == (3, "echo two type=9")
    assert sorted(out.read_text().splitlines()) == ["one", "two type=9"]


def test_resume_catches_a_changed_command(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sh echo a", "sh echo b"])
    journal, results = tmp_path / "run.db", tmp_path / "r.jsonl"

    def taskpool(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "taskpool", "run", "--jobs", str(jobs),
                               "--journal", str(journal), "--results", str(results), *extra],
                              cwd=ROOT, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)

    assert taskpool().returncode == 0
    jobs.write_text("sh echo a\nsh echo B\n")
    resumed = taskpool("--resume")
    assert resumed.returncode == 2
    assert f"{jobs}:2: job 2 is 'sh echo B' here but 'sh echo b' in the journal" in \
        resumed.stderr


def test_results_on_stdout_with_the_jobs_output_on_stdout_is_refused(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["fib 3", "sh echo a"])

    def taskpool(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "taskpool", "run", "--jobs", str(jobs),
                               "--results", "-", *extra], cwd=ROOT, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=60)

    refused = taskpool()
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"taskpool: {jobs}:2: with --results -, a command's output would mix with the "
        "results on standard output: keep it in files with --output-dir DIR",
        f"taskpool: {jobs}: nothing was run"]
    kept = tmp_path / "kept"
    apart = taskpool("--output-dir", str(kept))
    assert apart.returncode == 0
    assert sorted(json.loads(line)["job"] for line in apart.stdout.splitlines()) == [1, 2]
    assert (kept / "2.out").read_text() == "a\n"
    streamed = subprocess.run([sys.executable, "-m", "taskpool", "run", "--results", "-"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60,
                              input="fib 3\nsh echo a\n")
    assert streamed.returncode == 2, "the command's line is skipped and reported"
    assert [json.loads(line)["kind"] for line in streamed.stdout.splitlines()] == ["fib"]
    assert "taskpool: <stdin>:2: with --results -, a command's output would mix" in \
        streamed.stderr


@pytest.mark.parametrize("role", ["Dealer", "main"])
def test_a_lost_dealer_or_main_takes_the_running_commands_with_it(tmp_path: Path,
                                                                   role: str) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    jobs = write_job_file(tmp_path, [
        f"sh sleep 300 & echo $$ > {marks}/{n}.tmp; mv {marks}/{n}.tmp {marks}/{n}; wait"
        for n in (1, 2)])
    run = PoolRun(["--workers", "2", "--jobs", str(jobs)], events=tmp_path / "events.jsonl")
    wait_for_files(marks, lambda: all((marks / str(n)).exists() for n in (1, 2)) or None,
                   "two commands")
    trees = [m for n in (1, 2) for m in group_members(int((marks / str(n)).read_text()))]
    assert len(trees) >= 4, f"two shells and their sleeps: {trees}"
    os.kill(run.role_pid("Dealer") if role == "Dealer" else run.pid, signal.SIGKILL)
    assert wait_until_ended(trees) == [], f"a command outlived the lost {role}"
    assert run.finish() == (1 if role == "Dealer" else -signal.SIGKILL)


def test_a_worker_waiting_for_its_command_keeps_its_heartbeat(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, ["sh sleep 2"])
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "1", "--jobs", str(jobs), "--results", str(results),
                   "--heartbeat", "0.6"], events=tmp_path / "events.jsonl")
    assert run.finish() == 0
    assert by_job(results)[1]["status"] == "done"
    assert run.events_named(ev.WORKER_KILLED) == [], "a command's wait is no hang"
