"""When the log's reader goes away (`taskpool run ... 2>&1 | head -1`), the log is lost, never
the jobs: every result is recorded and the exit status is the run's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT, assert_done_right, read_results, write_job_file


@pytest.mark.parametrize(("crash_args", "expected_exit"), [
    ([], 0),
    # Replacement workers are forked and log "Starting up" after the reader is gone; a job
    # that crashes three workers fails, as it would with the log read to its end.
    (["--crash-rate", "0.3", "--seed", "5"], 1),
])
def test_a_closed_log_pipe_loses_no_job(tmp_path: Path, crash_args: list[str],
                                        expected_exit: int) -> None:
    jobs = write_job_file(tmp_path, [f"fib {n % 20}" for n in range(40)])
    results = tmp_path / "results.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskpool", "run", "--workers", "2", "--jobs", str(jobs),
         "--results", str(results), *crash_args],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    assert proc.stderr.readline()  # the first line, as `head -1` reads it...
    proc.stderr.close()  # ...and goes away
    assert proc.wait(timeout=60) == expected_exit
    records = read_results(results)
    assert sorted(r["job"] for r in records) == list(range(1, 41))
    done = [r for r in records if r["status"] == "done"]
    assert_done_right(done)
    if not crash_args:
        assert len(done) == 40
    else:  # the same seed with the log read to its end fails the same two jobs
        assert {r["job"] for r in records if r["status"] == "failed"} == {1, 19}
