"""`make bench`: measured figures, printed as a Markdown table and written to bench/results.md.

A benchmark, not a test: it asserts nothing, and states the machine it ran on. Each figure
is the best of REPEATS runs (the least disturbed by the rest of the machine).

Now: CLI dispatch throughput (20,000 `sleep 0` jobs, 2 workers, log to a file), with the
results journal off and on; and the makespan of typed pools (`taskpool dispatch`) on sleep
workloads against the ideal schedule.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import random
import re
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


# Seed 000's pools: 1, 3, 1, 1 and 1 workers for types 1..5.
POOLS = [1, 3, 1, 1, 1]


def equal_jobs_workload() -> list[tuple[int, float]]:
    """Per type, n equal jobs: the ideal makespan is exact, ceil(n / workers) x duration."""
    return ([(1, 0.5)] * 4 + [(2, 0.5)] * 12 + [(3, 1.0)] * 2 + [(4, 0.25)] * 8
            + [(5, 2.0)])


def random_workload() -> list[tuple[int, float]]:
    rng = random.Random(7)
    return [(rng.randint(1, 5), round(rng.uniform(0, 0.2), 3)) for _ in range(300)]


def ideal_makespan(jobs: list[tuple[int, float]], exact: bool) -> float:
    """The exact optimum for equal jobs per type; otherwise a lower bound on it (no pool
    can beat its total work spread over its workers, nor its longest job)."""
    best = 0.0
    for number, workers in enumerate(POOLS, start=1):
        durations = [d for t, d in jobs if t == number]
        if not durations:
            continue
        if exact:
            best = max(best, math.ceil(len(durations) / workers) * durations[0])
        else:
            best = max(best, sum(durations) / workers, max(durations))
    return best


def dispatch_makespan(workdir: Path, jobs: list[tuple[int, float]]) -> float:
    """The run's own wall time (its Summary line: from start to the last result), best of
    REPEATS."""
    path = workdir / "typed.txt"
    path.write_text("".join(f"{t} {d}\n" for t, d in jobs))
    best = math.inf
    for _ in range(REPEATS):
        log = workdir / "typed.log"
        subprocess.run([sys.executable, "-m", "taskpool", "dispatch", *map(str, POOLS),
                        "--jobs", str(path), "--log", str(log)],
                       cwd=ROOT, check=True, stdin=subprocess.DEVNULL)
        found = re.search(r"wall time ([\d.]+) s", log.read_text())
        assert found is not None
        best = min(best, float(found.group(1)))
    return best


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        off = cli_jobs_per_second(workdir, journal=False)
        on = cli_jobs_per_second(workdir, journal=True)
        typed = []
        for name, jobs, exact in [
            ("27 sleeps, equal within each type (ideal exact: 2.0 s)", equal_jobs_workload(), True),
            ("300 random sleeps 0-0.2 s over 5 types (vs a lower bound)", random_workload(),
             False),
        ]:
            ideal = ideal_makespan(jobs, exact)
            typed.append((name, dispatch_makespan(workdir, jobs), ideal))
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
        "",
        f"Typed pools, `taskpool dispatch {' '.join(map(str, POOLS))}`, sleep jobs:",
        "",
        "| workload | makespan | ideal | ratio |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {measured:.2f} s | {ideal:.2f} s | {measured / ideal:.3f} |"
          for name, measured, ideal in typed],
        "",
        "Makespan: the run's own wall time from its Summary line (fork of the pool to the "
        "last result), best of "
        f"{REPEATS}. The ratio's excess is start-up (forking 7 workers) and dispatch latency.",
    ])
    print(table)
    (ROOT / "bench" / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
