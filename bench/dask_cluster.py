"""Per-job cost of `--engine dask --scheduler` against raw Dask, on the same real cluster.

    python bench/dask_cluster.py [--workers 2] [--jobs 2000] [--repeat 5]

Starts a `dask scheduler` and `dask worker` processes (one thread each) on loopback, then,
alternately, `repeat` times each:
  raw       a Python process that connects a Client, `client.map`s N no-op tasks
            (`time.sleep(0)`), gathers them and closes;
  taskpool  `taskpool run --engine dask --scheduler ADDR` on N `sleep 0` jobs (results and
            log to files).
Each is run on N jobs and on 10; the difference of the two wall times over N - 10 is the
cost of one more job, start-up and close excluded. Prints a Markdown table of the medians
and ranges, and the ratio of the medians. `make bench` runs it (bench.py).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASK = Path(sys.executable).parent / "dask"
SMALL = 10

RAW = """
import sys, time
from distributed import Client
client = Client(sys.argv[1], set_as_default=False)
futures = client.map(time.sleep, [0] * int(sys.argv[2]), pure=False)
client.gather(futures)
client.close()
"""


def _start(command: list[str], pattern: str,
           env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """A process of the cluster, once its stderr has said `pattern` (the line's match)."""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(pattern, line)
        if found:
            # What it says from now on goes nowhere (a full pipe would block it).
            os.set_blocking(proc.stderr.fileno(), True)
            subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
            return proc, found.group(0)
    raise SystemExit(f"{command[:2]} exited before {pattern!r}")


def _timed(command: list[str]) -> float:
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return time.monotonic() - started


def _taskpool(address: str, jobs: int, scratch: Path) -> list[str]:
    job_file = scratch / f"jobs-{jobs}.txt"
    job_file.write_text("sleep 0\n" * jobs)
    return [sys.executable, "-m", "taskpool", "run", "--engine", "dask", "--scheduler",
            address, "--jobs", str(job_file), "--quiet", "--log", str(scratch / "log"),
            "--results", str(scratch / "results.jsonl")]


def measure(workers: int, jobs: int, repeat: int) -> dict[str, list[float]]:
    """Milliseconds of wall time per extra job, `repeat` figures for each of raw and
    taskpool, measured alternately on one cluster."""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        env = dict(os.environ, TMPDIR=tmp)
        started = []
        try:
            scheduler, line = _start([str(DASK), "scheduler", "--host", "127.0.0.1", "--port",
                                      "0", "--no-dashboard"], r"tcp://[\d.]+:\d+", env)
            started.append(scheduler)
            address = line
            for _ in range(workers):
                worker, _ = _start([str(DASK), "worker", address, "--nthreads", "1",
                                    "--no-dashboard", "--host", "127.0.0.1"],
                                   "Registered to", env)
                started.append(worker)
            raw = [sys.executable, "-c", RAW, address]
            figures: dict[str, list[float]] = {"raw client.map": [], "taskpool": []}
            for _ in range(repeat):
                for name, full, small in (
                        ("raw client.map", raw + [str(jobs)], raw + [str(SMALL)]),
                        ("taskpool", _taskpool(address, jobs, scratch),
                         _taskpool(address, SMALL, scratch))):
                    marginal = (_timed(full) - _timed(small)) / (jobs - SMALL)
                    figures[name].append(marginal * 1000)
            return figures
        finally:
            for proc in started:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def overhead_table(workers: int = 2, jobs: int = 2000, repeat: int = 5) -> str:
    figures = measure(workers, jobs, repeat)
    medians = {name: statistics.median(ms) for name, ms in figures.items()}
    lines = [
        f"{workers} `dask worker` processes of 1 thread and a `dask scheduler` on loopback, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}; {jobs:,} no-op jobs "
        f"against {SMALL}; {repeat} runs of each, alternately.",
        "",
        "| | wall time per extra job: median | range |",
        "| --- | ---: | ---: |",
    ]
    for name, ms in figures.items():
        lines.append(f"| {name} | {medians[name]:.3f} ms | {min(ms):.3f}-{max(ms):.3f} ms |")
    ratio = medians["taskpool"] / medians["raw client.map"]
    lines += ["", f"taskpool / raw: {ratio:.2f}x (medians)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(overhead_table(args.workers, args.jobs, args.repeat))


if __name__ == "__main__":
    main()
