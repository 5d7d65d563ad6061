"""Standard error (or output) closed by the caller: the run works; only its log is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT, assert_done_right, write_job_file


@pytest.mark.parametrize("closed", [(2,), (1, 2)])
def test_a_run_with_stderr_closed_records_every_job_and_nothing_else(
        tmp_path: Path, closed: tuple[int, ...]) -> None:
    jobs = write_job_file(tmp_path, [f"fib {n}" for n in range(20)])
    results = tmp_path / "r.jsonl"

    def close_outputs() -> None:
        for fd in closed:
            os.close(fd)

    code = subprocess.run(
        [sys.executable, "-m", "taskpool", "run", "--workers", "2", "--jobs", str(jobs),
         "--results", str(results)],
        cwd=ROOT, stdin=subprocess.DEVNULL, preexec_fn=close_outputs, timeout=60).returncode
    assert code == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]  # no log line
    assert sorted(r["job"] for r in records) == list(range(1, 21))
    assert_done_right(records)
