"""The cost of watching a run on a terminal: `taskpool run` on no-op jobs, its stderr a
pseudo-terminal (the live view) against the log to a file (no terminal), side by side.

    python bench/terminal.py [--jobs 2000] [--workers 2] [--rounds 7]

Each round runs every variant once, in turn, so that a disturbance of the machine (2 cores,
shared) falls on all of them alike; each variant's figure is the median of its rounds, with
the range. The time is the whole command's, from its start to its exit. A reader thread
drains the pseudo-terminal as a terminal would, so the command never waits on a full one.
`make bench` runs it too (bench.py calls `terminal_table`).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Label, the flags beside the job file, whether stderr is a pseudo-terminal.
VARIANTS = [
    ("log to a file, no terminal (the reference)", ["--log", "{log}"], False),
    ("terminal, default (progress line, warnings, failures)", [], True),
    ("terminal, `--log FILE` (the progress line stays on the terminal)", ["--log", "{log}"],
     True),
    ("terminal, `-v` (every job's lines above the progress line)", ["-v"], True),
]


def _drain(fd: int, sink: list[int]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the last writer of the pseudo-terminal closed it
            return
        if not chunk:
            return
        sink[0] += len(chunk)


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(jobs: Path, workers: int, flags: list[str], on_pty: bool,
             scratch: Path) -> tuple[float, float]:
    """The command's wall time, and the CPU time of all its processes (every one of them
    is waited for, down the tree: main reaps the Dealer, which reaps the workers)."""
    command = [sys.executable, "-m", "taskpool", "run", "--workers", str(workers), "--jobs",
               str(jobs), *[flag.format(log=scratch / "run.log") for flag in flags]]
    drained = [0]
    if on_pty:
        master, slave = os.openpty()
        reader = threading.Thread(target=_drain, args=(master, drained), daemon=True)
        reader.start()
        stderr: int = slave
    else:
        stderr = subprocess.DEVNULL
    started, cpu = time.perf_counter(), _cpu_of_children()
    try:
        subprocess.run(command, cwd=ROOT, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=stderr)
        return time.perf_counter() - started, _cpu_of_children() - cpu
    finally:
        if on_pty:
            os.close(slave)
            reader.join()
            os.close(master)


def terminal_table(jobs: int = 2000, workers: int = 2, rounds: int = 7) -> str:
    times: dict[str, list[float]] = {label: [] for label, _, _ in VARIANTS}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        job_file = scratch / "jobs.txt"
        job_file.write_text("sleep 0\n" * jobs)
        for _ in range(rounds):
            for label, flags, on_pty in VARIANTS:
                wall, used = run_once(job_file, workers, flags, on_pty, scratch)
                times[label].append(wall)
                cpu[label].append(used)
    reference = statistics.median(times[VARIANTS[0][0]])
    cpu_reference = statistics.median(cpu[VARIANTS[0][0]])
    lines = [
        f"{jobs:,} `sleep 0` jobs, `taskpool run --workers {workers}`, whole command; "
        f"stderr a pseudo-terminal or not; median of {rounds} rounds (range), the variants "
        "in turn each round. CPU: the user and system time of all the command's processes, "
        "less disturbed than wall time by the rest of the machine.",
        "",
        "| variant | wall time | range | vs reference | CPU time | vs reference |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, _, _ in VARIANTS:
        median, used = statistics.median(times[label]), statistics.median(cpu[label])
        lines.append(f"| {label} | {median:.2f} s | {min(times[label]):.2f}-"
                     f"{max(times[label]):.2f} s | {median / reference:.2f} | {used:.2f} s "
                     f"| {used / cpu_reference:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(terminal_table(args.jobs, args.workers, args.rounds))


if __name__ == "__main__":
    main()
