"""The command line's edges: flag values out of range, an output pipe closed early, a
signal after the summary."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from taskpool.observe import events as ev

from harness import ROOT, PoolRun, kill_quietly, write_job_file


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskpool", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--heartbeat", "1e10", "over the limit of 2592000 (30 days)"),
    ("--timeout", "1e10", "over the limit of 2592000 (30 days)"),
    ("--grace", "1e10", "over the limit of 2592000 (30 days)"),
    ("--restart-window", "1e10", "over the limit of 2592000 (30 days)"),
    ("--max-memory", "10000000000000", "is more than this machine's memory"),
    ("--max-attempts", "70000", "70000 is out of range 0..65535"),
])
def test_a_flag_value_out_of_range_is_a_usage_error_before_anything_runs(
        flag: str, value: str, says: str) -> None:
    proc = _run("run", flag, value, "--jobs", "/dev/null")
    assert proc.returncode == 2
    assert f"argument {flag}: " in proc.stderr and says in proc.stderr


def test_results_piped_into_a_reader_that_leaves_ends_quietly(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, [f"fib {n % 20}" for n in range(3000)])
    journal = tmp_path / "run.db"
    assert _run("run", "--workers", "2", "--jobs", str(jobs), "--journal",
                str(journal)).returncode == 0
    reader = subprocess.Popen(
        [sys.executable, "-m", "taskpool", "results", str(journal), "--format", "csv"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stderr is not None
    assert reader.stdout.readline().startswith(b"job,kind,arg")  # `head -1`...
    reader.stdout.close()  # ...and gone
    assert reader.wait(timeout=60) == 128 + signal.SIGPIPE
    assert b"Traceback" not in reader.stderr.read()


def test_a_sigterm_after_the_summary_gives_143_not_a_death_by_the_signal(
        tmp_path: Path) -> None:
    """The signal comes while the run writes its summary or ends: it changes nothing of the
    run, and the command exits 143, as an interrupted run, never killed by it (-15). (A
    SIGTERM that comes after the process has exited finds nothing: 0.)"""
    jobs = write_job_file(tmp_path, [f"fib {n}" for n in range(10)])
    run = PoolRun(["--workers", "2", "--jobs", str(jobs)], events=tmp_path / "events.jsonl")
    run.wait_for_event(ev.SUMMARY)
    kill_quietly(run.pid, signal.SIGTERM)
    assert run.finish() in (0, 128 + signal.SIGTERM)


def test_an_interrupt_held_at_the_exit_makes_the_status_an_interrupted_runs() -> None:
    from taskpool.cli import _unless_interrupted_late

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        signal.raise_signal(signal.SIGTERM)  # held: blocked in this thread
        assert _unless_interrupted_late(0) == 128 + signal.SIGTERM
        assert _unless_interrupted_late(2) == 128 + signal.SIGTERM
        signal.sigwait({signal.SIGTERM})  # taken, so that it never reaches pytest
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
