"""Ctrl-C and SIGTERM: the run ends cleanly with 130 or 143, workers are not reported as
crashed, completed results are kept, the rest are reported not done, nothing is left."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from taskpool.observe import events as ev

from harness import PoolRun, assert_done_right, assert_exactly_once, read_results

JOBS = 30


def _start(tmp_path: Path) -> tuple[PoolRun, Path]:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("sleep 0.1\n" * JOBS)
    results = tmp_path / "r.jsonl"
    run = PoolRun(["--workers", "2", "--jobs", str(jobs), "--results", str(results)],
                  events=tmp_path / "events.jsonl")
    run.wait_for_event(ev.JOB_DONE, count=2)
    return run, results


def _assert_interrupted_cleanly(run: PoolRun, results: Path, signame: str) -> None:
    assert not run.events_named(ev.SIMULATED_CRASH)
    assert not [e for e in run.events_named(ev.WORKER_EXITED) if e["crash"]], \
        "a stopped worker is not a crash"
    assert not run.events_named(ev.WORKER_KILLED)
    assert run.one_event(ev.INTERRUPTED, role="Main")["signal"] == signame
    assert "Traceback" not in run.log_text()
    records = read_results(results)
    assert_exactly_once(records, range(1, JOBS + 1))
    done = [r for r in records if r["status"] == "done"]
    assert len(done) >= 2
    assert_done_right(done)
    not_done = [r for r in records if r["status"] != "done"]
    assert not_done, "the run was cut short: some jobs cannot have completed"
    assert all(r["status"] == "not_done" and r["reason"] == f"interrupted by {signame}"
               for r in not_done)


def test_ctrl_c_to_the_process_group_ends_the_run_with_130(tmp_path: Path) -> None:
    run, results = _start(tmp_path)
    os.killpg(run.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    assert run.finish() == 130
    _assert_interrupted_cleanly(run, results, "SIGINT")


def test_sigint_to_main_alone_ends_the_run_with_130(tmp_path: Path) -> None:
    run, results = _start(tmp_path)
    os.kill(run.pid, signal.SIGINT)
    assert run.finish() == 130
    _assert_interrupted_cleanly(run, results, "SIGINT")


def test_sigterm_to_main_ends_the_run_with_143(tmp_path: Path) -> None:
    run, results = _start(tmp_path)
    os.kill(run.pid, signal.SIGTERM)
    assert run.finish() == 143
    _assert_interrupted_cleanly(run, results, "SIGTERM")


def test_sigterm_to_the_whole_group_ends_the_run_with_143(tmp_path: Path) -> None:
    # As a service manager stopping a unit does: every process gets SIGTERM at once.
    run, results = _start(tmp_path)
    os.killpg(run.pid, signal.SIGTERM)
    assert run.finish() == 143
    records = read_results(results)
    assert_exactly_once(records, range(1, JOBS + 1))
    assert_done_right([r for r in records if r["status"] == "done"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_kills_the_pool_at_once(tmp_path: Path, sig: int) -> None:
    run, results = _start(tmp_path)
    os.kill(run.pid, sig)
    os.kill(run.pid, sig)
    assert run.finish() == 128 + sig
    records = read_results(results)
    assert_exactly_once(records, range(1, JOBS + 1))
