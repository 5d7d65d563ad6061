"""A results file that cannot be written is said plainly, once, and the run exits 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import ROOT, write_job_file


def test_a_results_file_on_a_full_disk_is_one_plain_error_and_exit_1(tmp_path: Path) -> None:
    jobs = write_job_file(tmp_path, [f"fib {n}" for n in range(10)])
    proc = subprocess.run(
        [sys.executable, "-m", "taskpool", "run", "--workers", "2", "--jobs", str(jobs),
         "--results", "/dev/full"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "/dev/full" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0]
