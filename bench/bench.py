"""`make bench`: measured figures, printed as a Markdown table and written to bench/results.md.

A benchmark, not a test: it asserts nothing, and states the machine it ran on. Each figure
is the best of REPEATS runs (the least disturbed by the rest of the machine).

Now: CLI dispatch throughput (20,000 `sleep 0` jobs, 2 workers, log to a file), with the
results journal off and on.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = 20_000
REPEATS = 3


def cli_jobs_per_second(workdir: Path, journal: bool) -> float:
    jobs = workdir / "jobs.txt"
    jobs.write_text("sleep 0\n" * JOBS)
    best = 0.0
    for attempt in range(REPEATS):
        args = [sys.executable, "-m", "taskpool", "run", "--workers", "2", "--jobs", str(jobs),
                "--log", str(workdir / "run.log"), "--results", str(workdir / "r.jsonl")]
        if journal:
            db = workdir / f"run{attempt}.db"
            args += ["--journal", str(db)]
        started = time.perf_counter()
        subprocess.run(args, cwd=ROOT, check=True, stdin=subprocess.DEVNULL)
        best = max(best, JOBS / (time.perf_counter() - started))
    return best


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        off = cli_jobs_per_second(workdir, journal=False)
        on = cli_jobs_per_second(workdir, journal=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
               f"Python {platform.python_version()}, {datetime.date.today()}")
    table = "\n".join([
        f"Machine: {machine}",
        "",
        "| benchmark | jobs/s | vs journal off |",
        "| --- | ---: | ---: |",
        f"| CLI, {JOBS:,} `sleep 0` jobs, 2 workers, log to a file, journal off | "
        f"{off:,.0f} | 1.00 |",
        f"| the same with `--journal` (batches of 500 or 50 ms) | {on:,.0f} | "
        f"{on / off:.2f} ({(1 - on / off) * 100:.1f}% loss) |",
        "",
        f"Best of {REPEATS} runs each, whole command wall time (start-up included). "
        "Command: `make bench`.",
    ])
    print(table)
    (ROOT / "bench" / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
