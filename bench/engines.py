"""Per-job overhead of taskpool's two engines, through the CLI, on this machine.

    python bench/engines.py [--workers 2] [--noop-jobs 2000] [--fib-jobs 400] [--fib-n 25]

For each engine (local: the fork pool; dask: a LocalCluster of one-thread worker processes)
and each workload (`sleep 0` no-ops; `fib N`), it runs `taskpool run --engine E` twice: on
the workload, and on 10 jobs of it. The difference of the two wall times over the
difference of the job counts is the marginal cost of one job (start-up excluded); the run of
10 shows the fixed cost (start-up and shut-down). For fib, the overhead is what a job costs
on top of its computation: marginal wall time x workers - the time fib(N) takes here, in one
process. Prints a Markdown table; best of --repeat runs for each figure. `make bench` runs
it too (bench.py calls `overhead_table`) and writes its table to bench/results.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = 10


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def fib_seconds(n: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fib(n)
        best = min(best, time.perf_counter() - started)
    return best


def run_once(engine: str, workers: int, lines: list[str], scratch: Path) -> float:
    jobs = scratch / "jobs.txt"
    jobs.write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "taskpool", "run", "--engine", engine, "--workers",
               str(workers), "--jobs", str(jobs), "--quiet", "--log", str(scratch / "log"),
               "--results", str(scratch / "results.jsonl")]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr}"
                         f"{(scratch / 'log').read_text()[-2000:]}")
    results = (scratch / "results.jsonl").read_text().splitlines()
    if len(results) != len(lines):
        raise SystemExit(f"{engine}: {len(results)} results for {len(lines)} jobs")
    return wall


def best_of(repeat: int, engine: str, workers: int, lines: list[str], scratch: Path) -> float:
    return min(run_once(engine, workers, lines, scratch) for _ in range(repeat))


def available_engines() -> list[str]:
    """local, and dask if its extra is installed."""
    return ["local"] + (["dask"] if importlib.util.find_spec("distributed") else [])


def overhead_table(workers: int = 2, noop_jobs: int = 2000, fib_jobs: int = 400,
                   fib_n: int = 25, repeat: int = 2, engines: list[str] | None = None) -> str:
    """Measure each engine on each workload; the figures as a Markdown table, with a line
    saying what was measured where."""
    engines = engines or available_engines()
    workloads = [("no-op (`sleep 0`)", "sleep 0", noop_jobs, 0.0),
                 (f"`fib {fib_n}`", f"fib {fib_n}", fib_jobs, fib_seconds(fib_n))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for title, line, count, compute in workloads:
            for engine in engines:
                full = best_of(repeat, engine, workers, [line] * count, scratch)
                small = best_of(repeat, engine, workers, [line] * SMALL, scratch)
                marginal = (full - small) / (count - SMALL)
                overhead = max(0.0, marginal * workers - compute)
                rows.append((title, engine, count, full, count / full, small,
                             marginal * 1000, overhead * 1000))
                print(f"{engine:5} {title}: {full:.2f} s", file=sys.stderr)
    lines = [
        f"{workers} workers, {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
        f"fib({fib_n}) takes {workloads[1][3] * 1000:.1f} ms here in one process; best of "
        f"{repeat}.",
        "",
        "| workload | engine | jobs | wall time | jobs/s | fixed cost (10 jobs) "
        "| wall time per extra job | overhead per job (worker time) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for title, engine, count, full, rate, small, marginal, overhead in rows:
        lines.append(f"| {title} | {engine} | {count:,} | {full:.2f} s | {rate:,.0f} "
                     f"| {small:.2f} s | {marginal:.3f} ms | {overhead:.3f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--noop-jobs", type=int, default=2000)
    parser.add_argument("--fib-jobs", type=int, default=400)
    parser.add_argument("--fib-n", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--engines", default=",".join(available_engines()))
    args = parser.parse_args()
    print(overhead_table(args.workers, args.noop_jobs, args.fib_jobs, args.fib_n, args.repeat,
                         args.engines.split(",")))


if __name__ == "__main__":
    main()
